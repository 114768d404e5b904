// The cpu backend's forward token passes (declared in passes.h; tiles in tiles.h):
//   channel      x -> x1 -> qv1, token sums of relu(x1 W1^T + b1)        (then ch per frame)
//   bottleneck   x -> x1 -> xc -> s; xm, ln_before, z = down(y) stored [F, N, H]
//   moments      (training with BatchNorm) z -> h -> u: bn2's batch sums
//   output       z -> h -> u -> bn2, ln_post, gate -> o
// The backward re-runs bottleneck with the Net's transient buffers set, to fill x1, P,
// qv1 > 0 (from the kept bits) and qv2 for all tokens; without kept state (fused_backward)
// it re-runs channel too, for x1, P and qv1 > 0.
#include "cpu/passes.h"

#include "core/norms.h"

namespace dgsct::cpu {

using core::layer_norm_tile;

// Token sums of qv1 = relu(x1 W1^T + b1): [F, C] (zeros when n.ch is already set).
template <typename scalar_t, typename acc_t>
Tensor channel_pass(const Net<scalar_t, acc_t>& n) {
  const int64_t BN = n.BN, C = n.C, K = n.K;
  Tensor part = zeros<acc_t>({n.items, C});
  acc_t* pp = part.data_ptr<acc_t>();
  n.for_chunks([&](int64_t, int64_t b, int64_t e) {
    std::vector<acc_t> xb(BN * C), P(BN * K), PR(BN * C), x1(BN * C), v(BN * C);
    for (int64_t it = b; it < e; ++it) {
      const int64_t f = n.frame(it), rows = n.rows(it);
      const acc_t* xt = n.load_x(it, xb.data());
      n.prompt(xt, f, rows, P.data(), PR.data(), x1.data());
      n.weight_product(true, rows, C, C, x1.data(), n.W1, n.W1low, 0, v.data());
      acc_t* out = pp + it * C;
      if (!n.ch)  // else the channel attention is known (the kept state)
        for (int64_t r = 0; r < rows; ++r)
          DGSCT_SIMD
          for (int64_t c = 0; c < C; ++c) out[c] += std::max(v[r * C + c] + n.b1[c], acc_t(0));
      if (n.M1bits) {  // forward keeping state: the relu mask as bits
        uint8_t* bits = n.M1bits + n.row0(it) * n.CB;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c0 = 0; c0 < C; c0 += 8) {
            uint8_t byte = 0;
            for (int64_t c = c0; c < std::min(c0 + 8, C); ++c)
              byte |= static_cast<uint8_t>(v[r * C + c] + n.b1[c] > acc_t(0)) << (c - c0);
            bits[r * n.CB + c0 / 8] = byte;
          }
      }
      if (n.X1) {
        const int64_t g0 = n.row0(it);
        std::copy(x1.begin(), x1.begin() + rows * C, n.X1 + g0 * C);
        std::copy(P.begin(), P.begin() + rows * K, n.Pst + g0 * K);
        uint8_t* m = n.M1 + g0 * C;
        for (int64_t r = 0; r < rows; ++r)
          DGSCT_SIMD
          for (int64_t c = 0; c < C; ++c) m[r * C + c] = v[r * C + c] + n.b1[c] > acc_t(0);
      }
    }
  });
  return part.view({n.F, n.ntiles, C}).sum(1);
}

// s [F, N] and z [F, N, H] (both accumulation dtype); bn1 sums per item when zsums is defined.
template <typename scalar_t, typename acc_t>
void bottleneck_pass(const Net<scalar_t, acc_t>& n, Tensor& s, Tensor& z, Tensor& zsums) {
  const int64_t BN = n.BN, C = n.C, K = n.K, H = n.H, Ch = n.Ch;
  acc_t* sp = s.data_ptr<acc_t>();
  acc_t* zp = z.data_ptr<acc_t>();
  double* zs = zsums.defined() ? zsums.data_ptr<double>() : nullptr;
  n.for_chunks([&](int64_t, int64_t b, int64_t e) {
    std::vector<acc_t> xb(BN * C), P(BN * K), PR(BN * C), x1buf(BN * C), xc(BN * C), vbuf(BN * Ch);
    for (int64_t it = b; it < e; ++it) {
      const int64_t f = n.frame(it), rows = n.rows(it), g0 = n.row0(it);
      const acc_t* x1 = x1buf.data();
      if (n.refill_x1) {  // backward from kept state: x1, P and the relu mask for the later passes
        acc_t* x1dst = n.X1 + g0 * C;
        const acc_t* xt = n.load_x(it, xb.data());
        n.prompt(xt, f, rows, n.Pst + g0 * K, PR.data(), x1dst);
        x1 = x1dst;
        const uint8_t* bits = n.M1bits + g0 * n.CB;
        uint8_t* m = n.M1 + g0 * C;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < C; ++c) m[r * C + c] = (bits[r * n.CB + c / 8] >> (c % 8)) & 1;
      } else if (n.X1) {
        x1 = n.X1 + g0 * C;
      } else {
        const acc_t* xt = n.load_x(it, xb.data());
        n.prompt(xt, f, rows, P.data(), PR.data(), x1buf.data());
      }
      acc_t* v = n.V2 ? n.V2 + g0 * Ch : vbuf.data();
      const acc_t* chf = n.ch + f * C;
      for (int64_t r = 0; r < rows; ++r)
        DGSCT_SIMD
        for (int64_t c = 0; c < C; ++c) xc[r * C + c] = x1[r * C + c] * (acc_t(1) + chf[c]);
      gemm<acc_t>(false, true, rows, Ch, C, 1, xc.data(), C, n.W2, C, 0, v, Ch);
      for (int64_t r = 0; r < rows; ++r)
        DGSCT_SIMD
        for (int64_t j = 0; j < Ch; ++j) v[r * Ch + j] += n.b2[j];  // pre-relu qv2
      const acc_t* qa2f = n.qa2 + f * Ch;
      for (int64_t r = 0; r < rows; ++r) {
        acc_t sr = n.bs;
        DGSCT_SIMD_SUM(sr)
        for (int64_t j = 0; j < Ch; ++j) sr += std::max(v[r * Ch + j], acc_t(0)) * qa2f[j] * n.ws[j];
        sp[g0 + r] = sr;
        const acc_t base = n.beta * sigmoid(sr) + n.gamma * n.tg[f] + acc_t(1) - n.alpha;
        DGSCT_SIMD
        for (int64_t c = 0; c < C; ++c) xc[r * C + c] = x1[r * C + c] * (n.alpha * chf[c] + base);  // xm
      }
      if (n.lnbw) layer_norm_tile<acc_t>(xc.data(), rows, C, n.lnbw, n.lnbb, n.eps_b, xc.data(), nullptr, nullptr);
      acc_t* zt = zp + g0 * H;
      n.down(xc.data(), rows, zt);
      if (zs) {
        double* o = zs + it * 2 * H;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t h = 0; h < H; ++h) {
            const double v_ = zt[r * H + h];
            o[h] += v_;
            o[H + h] += v_ * v_;
          }
      }
    }
  });
}

// bn2's batch sums of u per item: [items, 2C] (double).
template <typename scalar_t, typename acc_t>
Tensor moments_pass(const Net<scalar_t, acc_t>& n, const Tensor& z) {
  const int64_t BN = n.BN, C = n.C, H = n.H;
  Tensor sums = zeros<double>({n.items, 2 * C});
  double* sp = sums.data_ptr<double>();
  const acc_t* zp = z.data_ptr<acc_t>();
  n.for_chunks([&](int64_t, int64_t b, int64_t e) {
    std::vector<acc_t> zb(BN * H), h(BN * H), u(BN * C);
    for (int64_t it = b; it < e; ++it) {
      const int64_t rows = n.rows(it);
      hidden_and_up(n, zp + n.row0(it) * H, rows, zb.data(), h.data(), u.data());
      double* o = sp + it * 2 * C;
      for (int64_t r = 0; r < rows; ++r)
        DGSCT_SIMD
        for (int64_t c = 0; c < C; ++c) {
          const double v = u[r * C + c];
          o[c] += v;
          o[C + c] += v * v;
        }
    }
  });
  return sums;
}

// o = gate ln_post(bn2(up(relu(bn1(z))))) in x's dtype.
template <typename scalar_t, typename acc_t>
void output_pass(const Net<scalar_t, acc_t>& n, const Tensor& z, Tensor& o) {
  const int64_t BN = n.BN, C = n.C, H = n.H;
  const acc_t* zp = z.data_ptr<acc_t>();
  scalar_t* op = o.data_ptr<scalar_t>();
  n.for_chunks([&](int64_t, int64_t b, int64_t e) {
    std::vector<acc_t> zb(BN * H), h(BN * H), u(BN * C);
    for (int64_t it = b; it < e; ++it) {
      const int64_t rows = n.rows(it), g0 = n.row0(it);
      hidden_and_up(n, zp + g0 * H, rows, zb.data(), h.data(), u.data());
      for (int64_t r = 0; r < rows; ++r)
        DGSCT_SIMD
        for (int64_t c = 0; c < C; ++c) u[r * C + c] = u[r * C + c] * n.sc2[c] + n.sh2[c];
      if (n.lnpw) layer_norm_tile<acc_t>(u.data(), rows, C, n.lnpw, n.lnpb, n.eps_p, u.data(), nullptr, nullptr);
      const acc_t gate = n.has_gate ? n.gate : acc_t(1);
      scalar_t* out = op + g0 * C;
      for (int64_t i = 0; i < rows * C; ++i) out[i] = static_cast<scalar_t>(gate * u[i]);
    }
  });
}

#define DGSCT_CPU_INSTANTIATE(S, A)                                                    \
  template Tensor channel_pass<S, A>(const Net<S, A>&);                                \
  template void bottleneck_pass<S, A>(const Net<S, A>&, Tensor&, Tensor&, Tensor&);    \
  template Tensor moments_pass<S, A>(const Net<S, A>&, const Tensor&);                 \
  template void output_pass<S, A>(const Net<S, A>&, const Tensor&, Tensor&);
DGSCT_CPU_FOR_EACH_DTYPE(DGSCT_CPU_INSTANTIATE)
#undef DGSCT_CPU_INSTANTIATE

}  // namespace dgsct::cpu
