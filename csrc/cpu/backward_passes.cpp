// The cpu backend's backward token passes (declared in passes.h; tiles in tiles.h). Given
// the forward's kept state (guide path, per-frame vectors, batch statistics; nothing
// [F, N, C]) the backward re-runs only the channel and bottleneck passes, to refill the
// transient [F, N, *] buffers; given none (the plain fused_backward op) it recomputes
// everything. Then:
//   tail         z -> h -> u -> ub -> o; dO -> d(ln_post) -> d(bn2) -> du -> dh -> dzb [F, N, H]
//                (a first sweep gathers bn2's global sums in training)
//   front 1      x -> x1 ... y; dz -> dy -> d(ln_before) -> dxm -> modulation, spatial
//                attention, dxc -> dx1 (a transient [F, N, C] buffer of the backward)
//   front 2      after ch's backward per frame: dqv1 -> dx1, prompt attention -> dx, dR
#include "cpu/passes.h"

#include "core/norms.h"

namespace dgsct::cpu {

using core::layer_norm_tile;
using core::layer_norm_tile_backward;

// The tail's backward: dO -> dzb [F, N, H] (the gradient of relu's input). With
// `sums_only` it only gathers the global sums bn2's training backward needs first.
template <typename scalar_t, typename acc_t>
void tail_pass(const Net<scalar_t, acc_t>& n, const Tensor& z, const scalar_t* dO, bool accumulate, bool sums_only,
               const acc_t* Sdub, const acc_t* Sdubu, TailAccums& acc, Tensor& dzb_out, Tensor& dWu_part,
               acc_t* DUB) {
  // DUB (training with BatchNorm): the first sweep stores d(bn2 output) [F, N, C] there and
  // the second reads it back instead of redoing ln_post's forward and backward.
  const int64_t BN = n.BN, C = n.C, H = n.H, Hg = n.Hg, Cog = n.Cog;
  const acc_t* zp = z.data_ptr<acc_t>();
  const double cnt = static_cast<double>(n.F * n.N);
  acc_t* dzbp = sums_only ? nullptr : dzb_out.data_ptr<acc_t>();
  acc_t* dwu = dWu_part.defined() && !sums_only ? dWu_part.data_ptr<acc_t>() : nullptr;
  n.for_chunks([&](int64_t chunk, int64_t b, int64_t e) {
    std::vector<acc_t> zb(BN * H), h(BN * H), u(BN * C), ub(BN * C), xh(BN * C), rs(BN), dol(BN * C), dub(BN * C),
        dh(BN * H);
    for (int64_t it = b; it < e; ++it) {
      const int64_t rows = n.rows(it), g0 = n.row0(it);
      const acc_t* zt = zp + g0 * H;
      hidden_and_up(n, zt, rows, zb.data(), h.data(), u.data());
      if (DUB && !sums_only) {
        std::copy(DUB + g0 * C, DUB + (g0 + rows) * C, dub.begin());
      } else {
        for (int64_t r = 0; r < rows; ++r)
          DGSCT_SIMD
          for (int64_t c = 0; c < C; ++c) ub[r * C + c] = u[r * C + c] * n.sc2[c] + n.sh2[c];
        const acc_t* pre_gate = ub.data();
        if (n.lnpw) {
          layer_norm_tile<acc_t>(ub.data(), rows, C, n.lnpw, n.lnpb, n.eps_p, dub.data(), xh.data(), rs.data());
          pre_gate = dub.data();  // ln_post's output, overwritten below
        }
        const scalar_t* d = dO + g0 * C;
        const acc_t gate = n.has_gate ? n.gate : acc_t(1);
        acc_t gsum = 0;
        DGSCT_SIMD_SUM(gsum)
        for (int64_t i = 0; i < rows * C; ++i) {
          const acc_t dv = static_cast<acc_t>(d[i]);
          gsum += dv * pre_gate[i];
          dol[i] = dv * gate;
        }
        if (accumulate && n.has_gate) acc.dgate.data_ptr<acc_t>()[it] = gsum;
        if (n.lnpw) {
          acc_t* dw = accumulate ? acc.dlnpw.data_ptr<acc_t>() + it * C : nullptr;
          acc_t* db = accumulate ? acc.dlnpb.data_ptr<acc_t>() + it * C : nullptr;
          layer_norm_tile_backward<acc_t>(dol.data(), xh.data(), rs.data(), rows, C, n.lnpw, dw, db, dub.data());
        } else {
          std::copy(dol.begin(), dol.begin() + rows * C, dub.begin());
        }
        if (n.has_bn && accumulate) {
          acc_t* s1 = acc.dub.data_ptr<acc_t>() + it * C;
          acc_t* s2 = acc.dubu.data_ptr<acc_t>() + it * C;
          for (int64_t r = 0; r < rows; ++r)
            DGSCT_SIMD
            for (int64_t c = 0; c < C; ++c) {
              const acc_t g_ = dub[r * C + c];
              s1[c] += g_;
              s2[c] += g_ * (u[r * C + c] - n.mu2[c]) * n.rs2[c];
            }
        }
        if (sums_only) {
          if (DUB) std::copy(dub.begin(), dub.begin() + rows * C, DUB + g0 * C);
          continue;
        }
      }  // dub recomputed
      // du into dub (in place)
      if (n.batch_stats) {
        for (int64_t r = 0; r < rows; ++r)
          DGSCT_SIMD
          for (int64_t c = 0; c < C; ++c) {
            const acc_t uh = (u[r * C + c] - n.mu2[c]) * n.rs2[c];
            dub[r * C + c] = n.sc2[c] * (dub[r * C + c] - acc_t(Sdub[c] / cnt) - uh * acc_t(Sdubu[c] / cnt));
          }
      } else if (n.has_bn) {
        for (int64_t r = 0; r < rows; ++r)
          DGSCT_SIMD
          for (int64_t c = 0; c < C; ++c) dub[r * C + c] *= n.sc2[c];
      }
      for (int64_t grp = 0; grp < n.G; ++grp) {
        if (dwu)
          gemm<acc_t>(true, false, Cog, Hg, rows, 1, dub.data() + grp * Cog, C, h.data() + grp * Hg, H, 1,
                      dwu + chunk * C * Hg + grp * Cog * Hg, Hg);
        gemm<acc_t>(false, false, rows, Hg, Cog, 1, dub.data() + grp * Cog, C, n.Wu + grp * Cog * Hg, Hg, 0,
                    dh.data() + grp * Hg, H);
      }
      acc_t* out = dzbp + g0 * H;
      acc_t* s1 = n.has_bn ? acc.dzb.data_ptr<acc_t>() + it * H : nullptr;
      acc_t* s2 = n.has_bn ? acc.dzbz.data_ptr<acc_t>() + it * H : nullptr;
      for (int64_t r = 0; r < rows; ++r)
        DGSCT_SIMD
        for (int64_t j = 0; j < H; ++j) {
          const acc_t v = zb[r * H + j] > acc_t(0) ? dh[r * H + j] : acc_t(0);
          out[r * H + j] = v;
          if (s1) {
            s1[j] += v;
            s2[j] += v * (zt[r * H + j] - n.mu1[j]) * n.rs1[j];
          }
        }
    }
  });
}

// Front sweep 1: from dz (bn1's backward as dz = k1 dzb + k2 z_hat + k3) back to dx1
// except for the channel attention's share, which needs dch summed over the frame first.
template <typename scalar_t, typename acc_t>
void front1_pass(const Net<scalar_t, acc_t>& n, const Tensor& s, const Tensor& spmap, const Tensor& dsp,
                 const Tensor& dotf, const Tensor& z, const Tensor& dzb, const acc_t* k1, const acc_t* k2,
                 const acc_t* k3, FrontAccums& acc, Tensor& dx1) {
  const int64_t BN = n.BN, C = n.C, K = n.K, H = n.H, Ch = n.Ch, Hg = n.Hg, Cg = n.Cg;
  const acc_t *sp = s.data_ptr<acc_t>(), *mp = spmap.data_ptr<acc_t>(), *dsp_ = dsp.data_ptr<acc_t>();
  const acc_t *dotp = dotf.data_ptr<acc_t>(), *zp = z.data_ptr<acc_t>(), *dzbp = dzb.data_ptr<acc_t>();
  acc_t* dx1p = dx1.data_ptr<acc_t>();
  acc_t* dWd = acc.dWd.defined() ? acc.dWd.data_ptr<acc_t>() : nullptr;
  n.for_chunks([&](int64_t chunk, int64_t b, int64_t e) {
    std::vector<acc_t> xc(BN * C), xm(BN * C), y(BN * C), xh(BN * C), rs(BN), dz(BN * H), dy(BN * C),
        dscale_r(BN), dlogit(BN), scale_b(BN);
    for (int64_t it = b; it < e; ++it) {
      const int64_t f = n.frame(it), rows = n.rows(it), g0 = n.row0(it);
      const acc_t* x1 = n.X1 + g0 * C;
      acc_t* v = n.V2 + g0 * Ch;  // pre-relu qv2, then (in place) its gradient
      acc_t* dv2 = v;
      const acc_t* chf = n.ch + f * C;
      for (int64_t r = 0; r < rows; ++r)
        DGSCT_SIMD
        for (int64_t c = 0; c < C; ++c) xc[r * C + c] = x1[r * C + c] * (acc_t(1) + chf[c]);
      for (int64_t r = 0; r < rows; ++r) {
        scale_b[r] = n.beta * sigmoid(sp[g0 + r]) + n.gamma * n.tg[f] + acc_t(1) - n.alpha;
        DGSCT_SIMD
        for (int64_t c = 0; c < C; ++c) xm[r * C + c] = x1[r * C + c] * (n.alpha * chf[c] + scale_b[r]);
      }
      const acc_t* yy = xm.data();
      if (n.lnbw) {
        layer_norm_tile<acc_t>(xm.data(), rows, C, n.lnbw, n.lnbb, n.eps_b, y.data(), xh.data(), rs.data());
        yy = y.data();
      }
      // dz from dzb through bn1
      const acc_t* zt = zp + g0 * H;
      const acc_t* dzt = dzbp + g0 * H;
      for (int64_t r = 0; r < rows; ++r)
        DGSCT_SIMD
        for (int64_t j = 0; j < H; ++j) {
          const acc_t zh = n.batch_stats ? (zt[r * H + j] - n.mu1[j]) * n.rs1[j] : acc_t(0);
          dz[r * H + j] = k1[j] * dzt[r * H + j] + k2[j] * zh + k3[j];
        }
      for (int64_t grp = 0; grp < n.G; ++grp) {
        if (dWd)
          gemm<acc_t>(true, false, Hg, Cg, rows, 1, dz.data() + grp * Hg, H, yy + grp * Cg, C, 1,
                      dWd + chunk * H * Cg + grp * Hg * Cg, Cg);
        gemm<acc_t>(false, false, rows, Cg, Hg, 1, dz.data() + grp * Hg, H, n.Wd + grp * Hg * Cg, Cg, 0,
                    dy.data() + grp * Cg, C);
      }
      acc_t* dxm = dy.data();  // d(xm), in place
      if (n.lnbw)
        layer_norm_tile_backward<acc_t>(dy.data(), xh.data(), rs.data(), rows, C, n.lnbw,
                                                  acc.dlnbw.data_ptr<acc_t>() + it * C,
                                                  acc.dlnbb.data_ptr<acc_t>() + it * C, dxm);
      // modulation: dx1 = dxm scale, dscale = dxm x1
      acc_t* o = dx1p + g0 * C;
      acc_t* dchA = acc.dchA.data_ptr<acc_t>() + it * C;
      acc_t tgsum = 0;
      for (int64_t r = 0; r < rows; ++r) {
        acc_t rsum = 0;
        DGSCT_SIMD_SUM(rsum)
        for (int64_t c = 0; c < C; ++c) {
          const acc_t ds = dxm[r * C + c] * x1[r * C + c];
          dchA[c] += ds;
          rsum += ds;
          o[r * C + c] = dxm[r * C + c] * (n.alpha * chf[c] + scale_b[r]);
        }
        dscale_r[r] = rsum;
        tgsum += rsum;
      }
      acc.dtgA.data_ptr<acc_t>()[it] = tgsum;
      // spatial attention: s -> sigmoid (modulation) and softmax(tanh s) (the map)
      const acc_t dot = dotp[f];
      acc_t* dqa2 = acc.dqa2.data_ptr<acc_t>() + it * Ch;
      acc_t* dws = acc.dws.data_ptr<acc_t>() + it * Ch;
      acc_t* db2 = acc.db2.data_ptr<acc_t>() + it * Ch;
      acc_t bsum = 0;
      const acc_t* qa2f = n.qa2 + f * Ch;
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t sr = sp[g0 + r], sg = sigmoid(sr), th = std::tanh(sr);
        const acc_t dl = n.beta * dscale_r[r] * sg * (acc_t(1) - sg) +
                         (acc_t(1) - th * th) * mp[g0 + r] * (dsp_[g0 + r] - dot);
        bsum += dl;
        DGSCT_SIMD
        for (int64_t j = 0; j < Ch; ++j) {
          const acc_t pre = v[r * Ch + j];
          const acc_t v2 = std::max(pre, acc_t(0));
          dqa2[j] += dl * n.ws[j] * v2;
          dws[j] += dl * v2 * qa2f[j];
          const acc_t g_ = pre > acc_t(0) ? dl * n.ws[j] * qa2f[j] : acc_t(0);
          dv2[r * Ch + j] = g_;
          db2[j] += g_;
        }
      }
      acc.dbs.data_ptr<acc_t>()[it] = bsum;
      // dW2 is one batched product over all tokens after this pass (V2 holds dqv2)
      gemm<acc_t>(false, false, rows, C, Ch, 1, dv2, Ch, n.W2, C, 0, y.data(), C);  // dxc
      acc_t* dchB = acc.dchB.data_ptr<acc_t>() + it * C;
      for (int64_t r = 0; r < rows; ++r)
        DGSCT_SIMD
        for (int64_t c = 0; c < C; ++c) {
          const acc_t dxc = y[r * C + c];
          dchB[c] += dxc * x1[r * C + c];
          o[r * C + c] += dxc * (acc_t(1) + chf[c]);
        }
    }
  });
}

// Front sweep 2: the channel attention's share of dx1, then the prompt attention -> dx, dR.
template <typename scalar_t, typename acc_t>
void front2_pass(const Net<scalar_t, acc_t>& n, const Tensor& gv, Tensor& dx1, scalar_t* dx, Tensor& dgav,
                 Tensor& dR, Tensor& db1) {
  const int64_t BN = n.BN, C = n.C, K = n.K;
  const acc_t* gvp = gv.data_ptr<acc_t>();
  acc_t* dx1p = dx1.data_ptr<acc_t>();
  n.for_chunks([&](int64_t, int64_t b, int64_t e) {
    std::vector<acc_t> xb(BN * C), PR(BN * C), dP(BN * K);
    for (int64_t it = b; it < e; ++it) {
      const int64_t f = n.frame(it), rows = n.rows(it), g0 = n.row0(it);
      const acc_t* xt = n.load_x(it, xb.data());
      const acc_t* x1 = n.X1 + g0 * C;
      const acc_t* P = n.Pst + g0 * K;
      const uint8_t* mask = n.M1 + g0 * C;
      const acc_t* gf = gvp + f * C;
      acc_t* db = db1.data_ptr<acc_t>() + it * C;
      acc_t* v = n.DV1 + g0 * C;  // dqv1 pre-activation; dW1 is one product over all tokens afterwards
      for (int64_t r = 0; r < rows; ++r)
        DGSCT_SIMD
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = mask[r * C + c] ? gf[c] : acc_t(0);
          v[r * C + c] = d;
          db[c] += d;
        }
      acc_t* d1 = dx1p + g0 * C;
      n.weight_product(false, rows, C, C, v, n.W1, n.W1low, 1, d1);
      // prompt attention: x1 = x + gav P R, P = softmax(x R^T)
      const acc_t* Rf = n.R + f * K * C;
      gemm<acc_t>(false, false, rows, C, K, 1, P, K, Rf, C, 0, PR.data(), C);
      acc_t gsum = 0;
      DGSCT_SIMD_SUM(gsum)
      for (int64_t i = 0; i < rows * C; ++i) gsum += d1[i] * PR[i];
      dgav.data_ptr<acc_t>()[it] = gsum;
      acc_t* dRi = dR.data_ptr<acc_t>() + it * K * C;
      gemm<acc_t>(false, true, rows, K, C, n.gav, d1, C, Rf, C, 0, dP.data(), K);
      gemm<acc_t>(true, false, K, C, rows, n.gav, P, K, d1, C, 0, dRi, C);
      for (int64_t r = 0; r < rows; ++r) {
        acc_t dot = 0;
        DGSCT_SIMD_SUM(dot)
        for (int64_t k = 0; k < K; ++k) dot += P[r * K + k] * dP[r * K + k];
        DGSCT_SIMD
        for (int64_t k = 0; k < K; ++k) dP[r * K + k] = P[r * K + k] * (dP[r * K + k] - dot);  // dL
      }
      gemm<acc_t>(true, false, K, C, rows, 1, dP.data(), K, xt, C, 1, dRi, C);
      if (dx) {
        gemm<acc_t>(false, false, rows, C, K, 1, dP.data(), K, Rf, C, 1, d1, C);
        scalar_t* out = dx + g0 * C;
        for (int64_t i = 0; i < rows * C; ++i) out[i] = static_cast<scalar_t>(d1[i]);
      }
    }
  });
}

#define DGSCT_CPU_INSTANTIATE(S, A)                                                                                \
  template void tail_pass<S, A>(const Net<S, A>&, const Tensor&, const S*, bool, bool, const A*, const A*,         \
                                TailAccums&, Tensor&, Tensor&, A*);                                                \
  template void front1_pass<S, A>(const Net<S, A>&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,    \
                                  const Tensor&, const Tensor&, const A*, const A*, const A*, FrontAccums&, Tensor&); \
  template void front2_pass<S, A>(const Net<S, A>&, const Tensor&, Tensor&, S*, Tensor&, Tensor&, Tensor&);
DGSCT_CPU_FOR_EACH_DTYPE(DGSCT_CPU_INSTANTIATE)
#undef DGSCT_CPU_INSTANTIATE

}  // namespace dgsct::cpu
