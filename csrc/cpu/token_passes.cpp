// The fused CPU backend: SPEC.md's forward and its analytic backward, tile by tile.
//
// Work is split into items (frame f, block of BN tokens); a fixed number of chunks of
// consecutive items run under at::parallel_for. Every per-token [N, C] intermediate
// (x1, qv1, xc, qv2, xm, y, u, ...) lives only in a chunk's tile buffers. Reductions over
// tokens go to per-item partials (per-frame vectors) or per-chunk partials (weight
// gradients) that are summed in a fixed order afterwards, so results do not depend on
// thread scheduling. Matrix products on tiles call BLAS (sgemm_/dgemm_ of the BLAS torch
// links, else at::addmm_ on views); the frame-level products are ATen ops.
//
// Forward passes over the tokens:
//   channel      x -> x1 -> qv1, token sums of relu(x1 W1^T + b1)        (then ch per frame)
//   bottleneck   x -> x1 -> xc -> s; xm, ln_before, z = down(y) stored [F, N, H]
//   moments      (training with BatchNorm) z -> h -> u: bn2's batch sums
//   output       z -> h -> u -> bn2, ln_post, gate -> o
// Backward: given the forward's kept state (guide path, per-frame vectors, batch statistics;
// nothing [F, N, C]) it re-runs only channel and bottleneck, to refill the transient
// [F, N, *] buffers; given none (the plain fused_backward op) it recomputes everything:
//   tail         z -> h -> u -> ub -> o; dO -> d(ln_post) -> d(bn2) -> du -> dh -> dzb [F, N, H]
//                (a first sweep gathers bn2's global sums in training)
//   front 1      x -> x1 ... y; dz -> dy -> d(ln_before) -> dxm -> modulation, spatial
//                attention, dxc -> dx1 (a transient [F, N, C] buffer of the backward)
//   front 2      after ch's backward per frame: dqv1 -> dx1, prompt attention -> dx, dR
#include "cpu/dgsct_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>

extern "C" {
// Fortran BLAS of the library torch links (MKL on x86 wheels); weak, so a torch without
// them still loads this extension and the products fall back to ATen.
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

// Sums over a row vectorise only when the compiler may reorder them (OpenMP simd).
#if DGSCT_OPENMP
#define DGSCT_PRAGMA(text) _Pragma(#text)
#define DGSCT_SIMD_SUM(v) DGSCT_PRAGMA(omp simd reduction(+ : v))
#define DGSCT_SIMD_SUM2(a, b) DGSCT_PRAGMA(omp simd reduction(+ : a, b))
#define DGSCT_SIMD DGSCT_PRAGMA(omp simd)
#else
#define DGSCT_SIMD
#define DGSCT_SIMD_SUM(v)
#define DGSCT_SIMD_SUM2(a, b)
#endif

namespace dgsct::cpu {

using at::Tensor;

namespace {

// Row-major C[m, n] = alpha op(A) op(B) + beta C (op: transpose when ta/tb).
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* Cm, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) Cm[i * ldc + j] = beta == T(0) ? T(0) : beta * Cm[i * ldc + j];
    return;
  }
  const char opb = tb ? 'T' : 'N', opa = ta ? 'T' : 'N';
  const int M_ = static_cast<int>(n), N_ = static_cast<int>(m), K_ = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&opb, &opa, &M_, &N_, &K_, &alpha, B, &la, A, &lb, &beta, Cm, &lc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&opb, &opa, &M_, &N_, &K_, &alpha, B, &la, A, &lb, &beta, Cm, &lc);
      return;
    }
  }
  TORCH_WARN_ONCE("dgsct_kernels cpu: the torch libraries export no Fortran BLAS (sgemm_/dgemm_); tile "
                  "products fall back to at::addmm_ on views, which is slower");
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor At = ta ? at::from_blob(const_cast<T*>(A), {k, m}, {lda, 1}, opts).t()
                 : at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opts);
  Tensor Bt = tb ? at::from_blob(const_cast<T*>(B), {n, k}, {ldb, 1}, opts).t()
                 : at::from_blob(const_cast<T*>(B), {k, n}, {ldb, 1}, opts);
  Tensor Ct = at::from_blob(Cm, {m, n}, {ldc, 1}, opts);
  if (beta == T(0)) Ct.zero_();
  Ct.addmm_(At, Bt, beta == T(0) ? T(1) : beta, alpha);
}

// DGSCT_CPU_PROFILE=1 prints each phase's wall time to stderr (for benchmarks/NOTES.md).
struct PhaseTimer {
  bool on = std::getenv("DGSCT_CPU_PROFILE") != nullptr;
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  void operator()(const char* what) {
    if (!on) return;
    auto now = std::chrono::steady_clock::now();
    std::fprintf(stderr, "  [dgsct cpu] %-14s %8.2f ms\n", what,
                 std::chrono::duration<double, std::milli>(now - t).count());
    t = now;
  }
};

template <typename T>
inline T sigmoid(T v) {
  if (v >= T(0)) return T(1) / (T(1) + std::exp(-v));
  const T e = std::exp(v);
  return e / (T(1) + e);
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() && t.numel() ? t.data_ptr<T>() : nullptr;
}

// Everything the token passes read, in the accumulation dtype acc_t.
template <typename scalar_t, typename acc_t>
struct Net {
  int64_t F, N, C, K, H, G, Ch, Cg, Hg, Cog, BN, ntiles, items, nchunks;
  const scalar_t* x;
  const acc_t* R;
  acc_t gav;
  const acc_t *W1, *b1, *W2, *b2, *ws;
  acc_t bs;
  const acc_t *Wd, *Wu, *lnbw, *lnbb, *lnpw, *lnpb;
  acc_t gate;
  bool has_gate, has_bn, batch_stats;
  acc_t alpha, beta, gamma, eps_b, eps_p;
  const acc_t *qa1, *qa2, *tg, *ch;  // per frame [F, C], [F, Ch], [F], [F, C]
  // h = relu(z sc1 + sh1); ub = u sc2 + sh2; z_hat = (z - mu1) rs1; u_hat = (u - mu2) rs2
  const acc_t *sc1, *sh1, *mu1, *rs1, *sc2, *sh2, *mu2, *rs2;
  // Backward only: transient [F, N, *] buffers the recompute passes fill (null in the
  // forward, which keeps these intermediates in tile buffers only).
  acc_t* X1 = nullptr;      // x1 [F, N, C]
  acc_t* Pst = nullptr;     // prompt probabilities [F, N, K]
  uint8_t* M1 = nullptr;    // qv1 > 0 [F, N, C]
  acc_t* V2 = nullptr;      // pre-relu qv2 [F, N, Ch]; front 1 overwrites it with dqv2
  acc_t* DV1 = nullptr;     // dqv1 (pre-relu) [F, N, C], written by front 2

  int64_t frame(int64_t item) const { return item / ntiles; }
  int64_t first(int64_t item) const { return (item % ntiles) * BN; }
  int64_t rows(int64_t item) const { return std::min(BN, N - first(item)); }
  int64_t row0(int64_t item) const { return frame(item) * N + first(item); }  // global token index

  // Chunks of consecutive items go to whichever thread asks next: on a shared CPU a
  // descheduled thread no longer holds back its fixed share. Results do not depend on
  // which thread ran a chunk (partials are per item or per chunk, summed in order).
  template <class Fn>
  void for_chunks(const Fn& fn) const {
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(nchunks, at::get_num_threads());
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      for (int64_t c = next++; c < nchunks; c = next++) fn(c, c * items / nchunks, (c + 1) * items / nchunks);
    });
  }

  const acc_t* load_x(int64_t item, acc_t* buf) const {
    const scalar_t* src = x + row0(item) * C;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      const int64_t n = rows(item) * C;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
      return buf;
    }
  }

  // P = softmax(x R^T) [rows, K], PR = P R, x1 = x + gate_av PR [rows, C]
  void prompt(const acc_t* xt, int64_t f, int64_t rows, acc_t* P, acc_t* PR, acc_t* x1) const {
    const acc_t* Rf = R + f * K * C;
    gemm<acc_t>(false, true, rows, K, C, 1, xt, C, Rf, C, 0, P, K);
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* p = P + r * K;
      acc_t mx = p[0];
      for (int64_t k = 1; k < K; ++k) mx = std::max(mx, p[k]);
      acc_t sum = 0;
      DGSCT_SIMD_SUM(sum)
      for (int64_t k = 0; k < K; ++k) {
        p[k] = std::exp(p[k] - mx);
        sum += p[k];
      }
      const acc_t inv = acc_t(1) / sum;
      DGSCT_SIMD
      for (int64_t k = 0; k < K; ++k) p[k] *= inv;
    }
    gemm<acc_t>(false, false, rows, C, K, 1, P, K, Rf, C, 0, PR, C);
    const int64_t n = rows * C;
    for (int64_t i = 0; i < n; ++i) x1[i] = xt[i] + gav * PR[i];
  }

  // Grouped 1x1 convolutions on a tile: out[:, grp] = in[:, grp] W_grp^T.
  void down(const acc_t* y, int64_t rows, acc_t* z) const {  // [rows, C] -> [rows, H]
    for (int64_t grp = 0; grp < G; ++grp)
      gemm<acc_t>(false, true, rows, Hg, Cg, 1, y + grp * Cg, C, Wd + grp * Hg * Cg, Cg, 0, z + grp * Hg, H);
  }
  void up(const acc_t* h, int64_t rows, acc_t* u) const {  // [rows, H] -> [rows, C]
    for (int64_t grp = 0; grp < G; ++grp)
      gemm<acc_t>(false, true, rows, Cog, Hg, 1, h + grp * Hg, H, Wu + grp * Cog * Hg, Hg, 0, u + grp * Cog, C);
  }

  // LayerNorm of rows of v (in place when out == v); keeps x_hat and rstd when asked.
  static void layer_norm(const acc_t* v, int64_t rows, int64_t C, const acc_t* w, const acc_t* b, acc_t eps,
                         acc_t* out, acc_t* xhat, acc_t* rstd) {
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* vr = v + r * C;
      acc_t mean = 0;
      DGSCT_SIMD_SUM(mean)
      for (int64_t c = 0; c < C; ++c) mean += vr[c];
      mean /= C;
      acc_t var = 0;
      DGSCT_SIMD_SUM(var)
      for (int64_t c = 0; c < C; ++c) var += (vr[c] - mean) * (vr[c] - mean);
      var /= C;
      const acc_t rs = acc_t(1) / std::sqrt(var + eps);
      if (rstd) rstd[r] = rs;
      acc_t* o = out + r * C;
      acc_t* xh = xhat ? xhat + r * C : nullptr;
      DGSCT_SIMD
      for (int64_t c = 0; c < C; ++c) {
        const acc_t h = (vr[c] - mean) * rs;
        if (xh) xh[c] = h;
        o[c] = h * w[c] + b[c];
      }
    }
  }

  // LayerNorm backward: dx = rstd (dxh - mean(dxh) - xhat mean(dxh xhat)), dxh = dy w.
  static void layer_norm_backward(const acc_t* dy, const acc_t* xhat, const acc_t* rstd, int64_t rows, int64_t C,
                                  const acc_t* w, acc_t* dw, acc_t* db, acc_t* dx) {
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* d = dy + r * C;
      const acc_t* xh = xhat + r * C;
      acc_t m1 = 0, m2 = 0;
      DGSCT_SIMD_SUM2(m1, m2)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t dxh = d[c] * w[c];
        m1 += dxh;
        m2 += dxh * xh[c];
        if (dw) {
          dw[c] += d[c] * xh[c];
          db[c] += d[c];
        }
      }
      m1 /= C;
      m2 /= C;
      acc_t* o = dx + r * C;
      DGSCT_SIMD
      for (int64_t c = 0; c < C; ++c) o[c] = rstd[r] * (d[c] * w[c] - m1 - xh[c] * m2);
    }
  }
};

// Transient [F, N, *] buffers come from a per-thread cache that keeps each slot's largest
// allocation: fresh multi-megabyte allocations are mmap'ed by malloc and page-faulted on
// every call (15% of the backward's token passes at s2-visual). The cache holds at most
// DGSCT_CPU_WORKSPACE_MB (default 512) per thread; 0 turns it off. It never backs an output.
enum Slot : int { kSlotS, kSlotZ, kSlotX1, kSlotP, kSlotM1, kSlotV2, kSlotDub, kSlotDzb, kSlotDx1, kSlotDv1, kNumSlots };

Tensor workspace(Slot slot, at::IntArrayRef size, at::ScalarType dtype) {
  static const int64_t limit = [] {
    const char* v = std::getenv("DGSCT_CPU_WORKSPACE_MB");
    return (v ? std::atoll(v) : 512) << 20;
  }();
  thread_local std::vector<Tensor> cache(kNumSlots);
  int64_t numel = 1;
  for (int64_t d : size) numel *= d;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  Tensor& held = cache[slot];
  if (held.defined() && held.nbytes() >= static_cast<size_t>(bytes))
    return held.narrow(0, 0, bytes).view(dtype).view(size);
  held = Tensor();
  int64_t total = bytes;
  for (const Tensor& t : cache) total += t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
  if (total > limit) return at::empty(size, at::TensorOptions().dtype(dtype));
  held = at::empty({std::max<int64_t>(bytes, 64)}, at::kByte);
  return held.narrow(0, 0, bytes).view(dtype).view(size);
}

template <typename T>
Tensor zeros(std::initializer_list<int64_t> size) {
  return at::zeros(size, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// ---------------------------------------------------------------- forward passes

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
      gemm<acc_t>(false, true, rows, C, C, 1, x1.data(), C, n.W1, C, 0, v.data(), C);
      acc_t* out = pp + it * C;
      if (!n.ch)  // else the channel attention is known (the kept state)
        for (int64_t r = 0; r < rows; ++r)
          DGSCT_SIMD
          for (int64_t c = 0; c < C; ++c) out[c] += std::max(v[r * C + c] + n.b1[c], acc_t(0));
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
      if (n.X1) {
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
      if (n.lnbw) Net<scalar_t, acc_t>::layer_norm(xc.data(), rows, C, n.lnbw, n.lnbb, n.eps_b, xc.data(), nullptr, nullptr);
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

// h = relu(z sc1 + sh1) and u = up(h) for one tile (zb keeps the pre-relu values).
template <typename scalar_t, typename acc_t>
void hidden_and_up(const Net<scalar_t, acc_t>& n, const acc_t* zt, int64_t rows, acc_t* zb, acc_t* h, acc_t* u) {
  const int64_t H = n.H;
  for (int64_t r = 0; r < rows; ++r)
    DGSCT_SIMD
    for (int64_t j = 0; j < H; ++j) {
      const acc_t v = zt[r * H + j] * n.sc1[j] + n.sh1[j];
      zb[r * H + j] = v;
      h[r * H + j] = std::max(v, acc_t(0));
    }
  n.up(h, rows, u);
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
      if (n.lnpw) Net<scalar_t, acc_t>::layer_norm(u.data(), rows, C, n.lnpw, n.lnpb, n.eps_p, u.data(), nullptr, nullptr);
      const acc_t gate = n.has_gate ? n.gate : acc_t(1);
      scalar_t* out = op + g0 * C;
      for (int64_t i = 0; i < rows * C; ++i) out[i] = static_cast<scalar_t>(gate * u[i]);
    }
  });
}

// ---------------------------------------------------------------- backward passes

struct TailAccums {  // per item partials, [items, len]
  Tensor dgate, dlnpw, dlnpb, dub, dubu, dzb, dzbz;
};

// The tail's backward: dO -> dzb [F, N, H] (the gradient of relu's input). With
// `sums_only` it only gathers the global sums bn2's training backward needs first.
template <typename scalar_t, typename acc_t>
void tail_pass(const Net<scalar_t, acc_t>& n, const Tensor& z, const scalar_t* dO, bool accumulate, bool sums_only,
               const acc_t* Sdub, const acc_t* Sdubu, TailAccums& acc, Tensor& dzb_out, Tensor& dWu_part,
               acc_t* DUB = nullptr) {
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
          Net<scalar_t, acc_t>::layer_norm(ub.data(), rows, C, n.lnpw, n.lnpb, n.eps_p, dub.data(), xh.data(), rs.data());
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
          Net<scalar_t, acc_t>::layer_norm_backward(dol.data(), xh.data(), rs.data(), rows, C, n.lnpw, dw, db, dub.data());
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

struct FrontAccums {
  Tensor dchA, dchB, dtgA, dqa2, dws, dbs, db2, dlnbw, dlnbb;  // per item
  Tensor dWd;                                                    // per chunk
};

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
        Net<scalar_t, acc_t>::layer_norm(xm.data(), rows, C, n.lnbw, n.lnbb, n.eps_b, y.data(), xh.data(), rs.data());
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
        Net<scalar_t, acc_t>::layer_norm_backward(dy.data(), xh.data(), rs.data(), rows, C, n.lnbw,
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
      gemm<acc_t>(false, false, rows, C, C, 1, v, C, n.W1, C, 1, d1, C);
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

// ---------------------------------------------------------------- the op

struct Prepared {
  std::vector<Tensor> p;  // accumulation dtype, contiguous; undefined where absent
  Hyper hy;
  at::ScalarType acc;
  bool has_lnb, has_bn, has_lnp, has_gate;
};

Prepared prepare(const Tensor& x, const Tensor& g, const c10::List<std::optional<Tensor>>& params,
                 at::ArrayRef<double> hyper) {
  TORCH_CHECK(x.device().is_cpu() && g.device().is_cpu(), "dgsct_kernels cpu: x and g must be CPU tensors, got ",
              x.device(), " and ", g.device());
  TORCH_CHECK(x.dim() == 3 && g.dim() == 3 && x.size(0) == g.size(0),
              "dgsct_kernels cpu: expected x [F, N, C] and g [F, M, D] with the same F, got ", x.sizes(), " and ",
              g.sizes());
  TORCH_CHECK(x.scalar_type() == g.scalar_type(), "dgsct_kernels cpu: x and g dtypes differ (", x.scalar_type(),
              ", ", g.scalar_type(), ")");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "dgsct_kernels cpu: unsupported dtype ", x.scalar_type());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kNumParams, "dgsct_kernels cpu: expected ", int(kNumParams),
              " parameter slots (config.OP_PARAM_NAMES), got ", params.size());
  TORCH_CHECK(hyper.size() == 7, "dgsct_kernels cpu: expected 7 hyper-parameters (config.Hyper), got ", hyper.size());
  Prepared pr;
  pr.acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  pr.p.resize(kNumParams);
  for (int i = 0; i < kNumParams; ++i) {
    std::optional<Tensor> t = params.get(i);
    if (t.has_value() && t->defined()) {
      TORCH_CHECK(t->device().is_cpu(), "dgsct_kernels cpu: parameter ", i, " is on ", t->device());
      pr.p[i] = t->to(pr.acc).contiguous();
    }
  }
  for (int i : {int(kWtok), int(kBtok), int(kWfc), int(kBfc), int(kTokens), int(kGateAv), int(kWa1), int(kBa1),
                int(kWv1), int(kBv1), int(kWb), int(kBb), int(kWc), int(kBc), int(kWv2), int(kBv2), int(kWa2),
                int(kBa2), int(kWs), int(kBs), int(kWt), int(kBt), int(kWd), int(kWu)})
    TORCH_CHECK(pr.p[i].defined(), "dgsct_kernels cpu: required parameter slot ", i, " is missing");
  pr.hy = Hyper{hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5], hyper[6]};
  pr.has_lnb = pr.p[kLnbW].defined();
  pr.has_bn = pr.p[kBn1W].defined();
  pr.has_lnp = pr.p[kLnpW].defined();
  pr.has_gate = pr.p[kGate].defined();
  return pr;
}

// Per-frame vectors from the pooled guide a [F, C].
struct FrameVectors {
  Tensor qa1_pre, qa1, qa2_pre, qa2, tg;  // [F, C], [F, C], [F, Ch], [F, Ch], [F]
  Tensor joint, hid_pre, hid, ch;         // after the channel pass
};

FrameVectors frame_vectors(const std::vector<Tensor>& p, const Tensor& a) {
  FrameVectors v;
  v.qa1_pre = at::addmm(p[kBa1], a, p[kWa1].t());
  v.qa1 = at::relu(v.qa1_pre);
  v.qa2_pre = at::addmm(p[kBa2], a, p[kWa2].t());
  v.qa2 = at::relu(v.qa2_pre);
  v.tg = at::sigmoid(at::addmm(p[kBt], a, p[kWt].t())).view({-1}).contiguous();
  return v;
}

void channel_mlp(const std::vector<Tensor>& p, FrameVectors& v, const Tensor& colsum, int64_t N) {
  v.joint = v.qa1 * colsum / static_cast<double>(N);
  v.hid_pre = at::addmm(p[kBb], v.joint, p[kWb].t());
  v.hid = at::relu(v.hid_pre);
  v.ch = at::sigmoid(at::addmm(p[kBc], v.hid, p[kWc].t())).contiguous();
}

// Batch mean and biased variance from per-item (sum, sum of squares) in double.
std::pair<Tensor, Tensor> batch_stats(const Tensor& sums, int64_t width, int64_t count, at::ScalarType acc) {
  Tensor total = sums.sum(0);
  Tensor mean = total.slice(0, 0, width) / static_cast<double>(count);
  Tensor var = (total.slice(0, width, 2 * width) / static_cast<double>(count) - mean * mean).clamp_min(0.0);
  return {mean.to(acc), var.to(acc)};
}

template <typename scalar_t, typename acc_t>
Net<scalar_t, acc_t> make_net(const Tensor& x, const Prepared& pr, const Tensor& R, const FrameVectors& fv) {
  const auto& p = pr.p;
  Net<scalar_t, acc_t> n{};
  n.F = x.size(0);
  n.N = x.size(1);
  n.C = x.size(2);
  n.K = p[kTokens].size(0);
  n.H = p[kWd].size(0);
  n.Cg = p[kWd].size(1);
  n.G = n.C / n.Cg;
  n.Hg = n.H / n.G;
  n.Cog = n.C / n.G;
  n.Ch = p[kWv2].size(0);
  // tiles of ~48K floats per [rows, C] buffer (64 to 256 tokens): large enough for
  // efficient BLAS calls, small enough that a chunk's working set stays in L2
  n.BN = std::max<int64_t>(64, std::min<int64_t>(256, 49152 / std::max<int64_t>(n.C, 1)));
  if (const char* tile = std::getenv("DGSCT_CPU_TILE")) n.BN = std::max<int64_t>(1, std::atoll(tile));
  n.BN = std::min(n.BN, n.N);
  n.ntiles = (n.N + n.BN - 1) / n.BN;
  n.items = n.F * n.ntiles;
  n.nchunks = std::max<int64_t>(1, std::min<int64_t>(n.items, 4 * at::get_num_threads()));
  n.x = x.data_ptr<scalar_t>();
  n.R = R.data_ptr<acc_t>();
  n.gav = p[kGateAv].item<acc_t>();
  n.W1 = p[kWv1].data_ptr<acc_t>();
  n.b1 = p[kBv1].data_ptr<acc_t>();
  n.W2 = p[kWv2].data_ptr<acc_t>();
  n.b2 = p[kBv2].data_ptr<acc_t>();
  n.ws = p[kWs].data_ptr<acc_t>();
  n.bs = p[kBs].item<acc_t>();
  n.Wd = p[kWd].data_ptr<acc_t>();
  n.Wu = p[kWu].data_ptr<acc_t>();
  n.lnbw = pr.has_lnb ? p[kLnbW].data_ptr<acc_t>() : nullptr;
  n.lnbb = pr.has_lnb ? p[kLnbB].data_ptr<acc_t>() : nullptr;
  n.lnpw = pr.has_lnp ? p[kLnpW].data_ptr<acc_t>() : nullptr;
  n.lnpb = pr.has_lnp ? p[kLnpB].data_ptr<acc_t>() : nullptr;
  n.has_gate = pr.has_gate;
  n.gate = pr.has_gate ? p[kGate].item<acc_t>() : acc_t(1);
  n.has_bn = pr.has_bn;
  n.alpha = static_cast<acc_t>(pr.hy.alpha);
  n.beta = static_cast<acc_t>(pr.hy.beta);
  n.gamma = static_cast<acc_t>(pr.hy.gamma);
  n.eps_b = static_cast<acc_t>(pr.hy.ln_before_eps);
  n.eps_p = static_cast<acc_t>(pr.hy.ln_post_eps);
  n.qa1 = fv.qa1.data_ptr<acc_t>();
  n.qa2 = fv.qa2.data_ptr<acc_t>();
  n.tg = fv.tg.data_ptr<acc_t>();
  return n;
}

template <typename scalar_t, typename acc_t>
void set_affines(Net<scalar_t, acc_t>& n, const BnAffine& a1, const BnAffine& a2) {
  n.sc1 = a1.sc.data_ptr<acc_t>();
  n.sh1 = a1.sh.data_ptr<acc_t>();
  n.mu1 = a1.mu.data_ptr<acc_t>();
  n.rs1 = a1.rs.data_ptr<acc_t>();
  n.sc2 = a2.sc.data_ptr<acc_t>();
  n.sh2 = a2.sh.data_ptr<acc_t>();
  n.mu2 = a2.mu.data_ptr<acc_t>();
  n.rs2 = a2.rs.data_ptr<acc_t>();
}

// Everything up to z: guide path, frame vectors, channel pass, bottleneck pass, bn1 stats.
template <typename scalar_t, typename acc_t>
struct FrontState {
  GuideState guide;
  FrameVectors fv;
  Tensor colsum, s, z, spmap;
  Tensor X1, Pst, M1, V2;  // backward only
  Tensor mean1, var1, mean2, var2;
  BnAffine a1, a2;
  Net<scalar_t, acc_t> net;
};

// What the forward keeps for the backward (the `saved` list of fused_forward_saving and
// fused_backward_saved, in the accumulation dtype), then guide_kept's tensors.
// backends/cpu.py (CpuBackend.saved_state_shapes) states the same shapes for the fake op.
enum Kept : int {
  kKeptR = 0, kKeptPooled, kKeptQa1Pre, kKeptQa1, kKeptQa2Pre, kKeptQa2, kKeptTg, kKeptColsum, kKeptJoint,
  kKeptHidPre, kKeptHid, kKeptCh, kKeptMean1, kKeptVar1, kKeptMean2, kKeptVar2, kNumKeptCommon
};
constexpr const char* kKeptNames[kNumKeptCommon] = {
    "R", "a", "qa1_pre", "qa1", "qa2_pre", "qa2", "tg", "colsum", "joint", "hid_pre", "hid", "ch",
    "bn1 mean", "bn1 var", "bn2 mean", "bn2 var"};

std::vector<std::vector<int64_t>> kept_shapes(const Prepared& pr, const Tensor& x, const Tensor& g, bool training,
                                              const std::string& order) {
  const auto& p = pr.p;
  const int64_t F = x.size(0), N = x.size(1), C = x.size(2), M = g.size(1), D = g.size(2);
  const int64_t K = p[kTokens].size(0), Ch = p[kWv2].size(0), Cb = p[kWb].size(0), H = p[kWd].size(0);
  const bool stats = training && pr.has_bn;
  std::vector<std::vector<int64_t>> shapes{{F, K, C}, {F, C},  {F, C}, {F, C},  {F, Ch}, {F, Ch},
                                           {F},       {F, C},  {F, C}, {F, Cb}, {F, Cb}, {F, C}};
  for (int64_t n : {H, H, C, C}) shapes.push_back({stats ? n : 0});
  for (auto& s : guide_kept_shapes(order, F, N, M, D, K, C)) shapes.push_back(s);
  return shapes;
}

void check_kept(const std::vector<Tensor>& kept, const std::vector<std::vector<int64_t>>& shapes, at::ScalarType acc) {
  TORCH_CHECK(kept.size() == shapes.size(), "dgsct_kernels cpu: saved has ", kept.size(), " tensors, expected ",
              shapes.size(), " (what fused_forward_saving returns for these shapes, training flag and guide_order)");
  for (size_t i = 0; i < kept.size(); ++i) {
    const Tensor& t = kept[i];
    const char* name = i < kNumKeptCommon ? kKeptNames[i] : "guide path state";
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == acc && t.sizes() == at::IntArrayRef(shapes[i]),
                "dgsct_kernels cpu: saved[", i, "] (", name, ") is ",
                t.defined() ? t.toString() + " " + c10::str(t.sizes()) : std::string("undefined"), ", expected a CPU ",
                acc, " tensor of shape ", at::IntArrayRef(shapes[i]));
  }
}

// Contiguous with the default strides, as the op's fake implementation makes its outputs.
Tensor dense(const Tensor& t) {
  int64_t stride = 1;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    if (t.stride(d) != stride) return t.clone(at::MemoryFormat::Contiguous);
    stride *= t.size(d);
  }
  return t;
}

template <typename scalar_t, typename acc_t>
FrontState<scalar_t, acc_t> run_front(const Tensor& x, const Tensor& g, const Prepared& pr, bool training,
                                      const std::string& order, bool for_backward = false,
                                      const std::vector<Tensor>& kept = {}) {
  FrontState<scalar_t, acc_t> st;
  PhaseTimer timer;
  const auto& p = pr.p;
  const bool restored = !kept.empty();
  const Tensor gacc = g.to(pr.acc).contiguous();
  const at::ScalarType guide_operands = operand_dtype(kGuide, x.scalar_type(), pr.acc);
  if (restored) {
    auto c = [&](int i) { return kept[i].contiguous(); };
    st.guide = guide_restore(gacc, p, order, c(kKeptR), c(kKeptPooled),
                             at::ArrayRef<Tensor>(kept).slice(kNumKeptCommon), guide_operands);
    st.fv = FrameVectors{c(kKeptQa1Pre), c(kKeptQa1), c(kKeptQa2Pre), c(kKeptQa2), c(kKeptTg),
                         c(kKeptJoint),  c(kKeptHidPre), c(kKeptHid), c(kKeptCh)};
    st.colsum = c(kKeptColsum);
    timer("restore");
  } else {
    st.guide = guide_forward(gacc, p, order, guide_operands);
    timer("guide");
    st.fv = frame_vectors(p, st.guide.a);
  }
  auto& n = st.net;
  n = make_net<scalar_t, acc_t>(x, pr, st.guide.R, st.fv);
  n.batch_stats = training && pr.has_bn;
  if (for_backward) {  // transient buffers, freed when the backward returns
    st.X1 = workspace(kSlotX1, {n.F, n.N, n.C}, pr.acc);
    st.Pst = workspace(kSlotP, {n.F, n.N, n.K}, pr.acc);
    st.M1 = workspace(kSlotM1, {n.F, n.N, n.C}, at::kByte);
    st.V2 = workspace(kSlotV2, {n.F, n.N, n.Ch}, pr.acc);
    n.X1 = st.X1.template data_ptr<acc_t>();
    n.Pst = st.Pst.template data_ptr<acc_t>();
    n.M1 = st.M1.template data_ptr<uint8_t>();
    n.V2 = st.V2.template data_ptr<acc_t>();
  }
  if (restored) n.ch = st.fv.ch.template data_ptr<acc_t>();
  Tensor colsum = channel_pass(n);
  timer("channel");
  if (!restored) {
    st.colsum = colsum;
    channel_mlp(p, st.fv, st.colsum, n.N);
    n.ch = st.fv.ch.template data_ptr<acc_t>();
  }
  st.s = workspace(kSlotS, {n.F, n.N}, pr.acc);
  st.z = workspace(kSlotZ, {n.F, n.N, n.H}, pr.acc);
  Tensor zsums = n.batch_stats && !restored ? at::zeros({n.items, 2 * n.H}, at::kDouble) : Tensor();
  bottleneck_pass(n, st.s, st.z, zsums);
  timer("bottleneck");
  st.spmap = at::softmax(at::tanh(st.s), -1);
  const int64_t count = n.F * n.N;
  if (n.batch_stats && restored) {
    st.mean1 = kept[kKeptMean1];
    st.var1 = kept[kKeptVar1];
    st.mean2 = kept[kKeptMean2];
    st.var2 = kept[kKeptVar2];
    st.a1 = bn_affine(p[kBn1W], p[kBn1B], st.mean1, st.var1, pr.hy.bn1_eps);
    st.a2 = bn_affine(p[kBn2W], p[kBn2B], st.mean2, st.var2, pr.hy.bn2_eps);
  } else if (n.batch_stats) {
    std::tie(st.mean1, st.var1) = batch_stats(zsums, n.H, count, pr.acc);
    st.a1 = bn_affine(p[kBn1W], p[kBn1B], st.mean1, st.var1, pr.hy.bn1_eps);
    st.a2 = identity_affine(n.C, at::TensorOptions().dtype(pr.acc));
    set_affines(n, st.a1, st.a2);
    Tensor usums = moments_pass(n, st.z);
    std::tie(st.mean2, st.var2) = batch_stats(usums, n.C, count, pr.acc);
    st.a2 = bn_affine(p[kBn2W], p[kBn2B], st.mean2, st.var2, pr.hy.bn2_eps);
    timer("moments");
  } else if (pr.has_bn) {
    st.a1 = bn_affine(p[kBn1W], p[kBn1B], p[kBn1Rm], p[kBn1Rv], pr.hy.bn1_eps);
    st.a2 = bn_affine(p[kBn2W], p[kBn2B], p[kBn2Rm], p[kBn2Rv], pr.hy.bn2_eps);
  } else {
    st.a1 = identity_affine(n.H, at::TensorOptions().dtype(pr.acc));
    st.a2 = identity_affine(n.C, at::TensorOptions().dtype(pr.acc));
  }
  set_affines(n, st.a1, st.a2);
  return st;
}

// The kept state (enum Kept): fresh tensors that alias no output of the op.
template <typename scalar_t, typename acc_t>
std::vector<Tensor> kept_state(const FrontState<scalar_t, acc_t>& st, at::ScalarType acc) {
  const auto& fv = st.fv;
  std::vector<Tensor> kept{st.guide.R, st.guide.a, fv.qa1_pre, fv.qa1, fv.qa2_pre, fv.qa2, fv.tg.clone(),
                           st.colsum, fv.joint, fv.hid_pre, fv.hid, fv.ch};
  for (const Tensor& t : {st.mean1, st.var1, st.mean2, st.var2})
    kept.push_back(st.net.batch_stats ? t.clone() : at::empty({0}, at::TensorOptions().dtype(acc)));
  for (const Tensor& t : guide_kept(st.guide, st.net.C)) kept.push_back(t);
  for (Tensor& t : kept) t = dense(t);
  return kept;
}

template <typename scalar_t, typename acc_t>
std::vector<Tensor> forward_impl(const Tensor& x, const Tensor& g, const Prepared& pr, bool training,
                                 const std::string& order, std::vector<Tensor>* kept = nullptr) {
  auto st = run_front<scalar_t, acc_t>(x, g, pr, training, order);
  PhaseTimer timer;
  Tensor o = at::empty(x.sizes(), x.options());
  output_pass(st.net, st.z, o);
  timer("output");
  if (kept) *kept = kept_state(st, pr.acc);
  Tensor empty = at::empty({0}, x.options());
  std::vector<Tensor> out{o, st.spmap.to(x.scalar_type()), st.fv.tg.to(x.scalar_type())};
  if (st.net.batch_stats) {
    out.insert(out.end(), {st.mean1, st.var1, st.mean2, st.var2});
  } else {
    out.insert(out.end(), {empty, empty.clone(), empty.clone(), empty.clone()});
  }
  return out;
}

template <typename scalar_t, typename acc_t>
std::vector<Tensor> backward_impl(const Tensor& dO_in, const Tensor& dsp_in, const Tensor& dtg_in, const Tensor& x,
                                  const Tensor& g, const Prepared& pr, bool training, const std::string& order,
                                  const std::vector<bool>& wanted, const std::vector<Tensor>& kept) {
  const auto& p = pr.p;
  auto want = [&](int param) { return wanted[2 + param]; };
  const bool want_x = wanted[0], want_g = wanted[1];
  auto st = run_front<scalar_t, acc_t>(x, g, pr, training, order, true, kept);
  PhaseTimer timer;
  auto& n = st.net;
  const int64_t F = n.F, N = n.N, C = n.C, H = n.H, K = n.K, Ch = n.Ch, items = n.items, nch = n.nchunks;
  const double count = static_cast<double>(F * N);
  auto ao = at::TensorOptions().dtype(pr.acc);
  auto per = [&](int64_t len) { return at::zeros({items, len}, ao); };

  Tensor dO = dO_in.to(x.scalar_type()).contiguous();
  Tensor dsp = dsp_in.to(pr.acc).contiguous();
  Tensor dotf = (st.spmap * dsp).sum(1).contiguous();
  timer("grads in");

  // tail: dO -> dzb
  TailAccums ta;
  ta.dgate = per(1);
  ta.dlnpw = per(C);
  ta.dlnpb = per(C);
  ta.dub = per(C);
  ta.dubu = per(C);
  ta.dzb = per(H);
  ta.dzbz = per(H);
  Tensor dzb = workspace(kSlotDzb, {F, N, H}, pr.acc);
  Tensor dWu_part = want(kWu) ? at::zeros({nch, C, n.Hg}, ao) : Tensor();
  Tensor Sdub, Sdubu;
  const scalar_t* dOp = dO.data_ptr<scalar_t>();
  if (n.batch_stats) {
    Tensor DUB = workspace(kSlotDub, {F, N, C}, pr.acc);
    acc_t* dubp = DUB.data_ptr<acc_t>();
    tail_pass(n, st.z, dOp, true, true, (const acc_t*)nullptr, (const acc_t*)nullptr, ta, dzb, dWu_part, dubp);
    timer("tail sums");
    Sdub = ta.dub.sum(0).contiguous();
    Sdubu = ta.dubu.sum(0).contiguous();
    tail_pass(n, st.z, dOp, false, false, Sdub.data_ptr<acc_t>(), Sdubu.data_ptr<acc_t>(), ta, dzb, dWu_part,
              dubp);
  } else {
    tail_pass(n, st.z, dOp, true, false, (const acc_t*)nullptr, (const acc_t*)nullptr, ta, dzb, dWu_part);
    Sdub = ta.dub.sum(0);
    Sdubu = ta.dubu.sum(0);
  }
  timer("tail");
  // bn1 backward as dz = k1 dzb + k2 z_hat + k3
  Tensor Sdzb = ta.dzb.sum(0), Sdzbz = ta.dzbz.sum(0);
  Tensor k1, k2, k3;
  if (n.batch_stats) {
    k1 = st.a1.sc.clone();
    k2 = (-st.a1.sc * Sdzbz / count).contiguous();
    k3 = (-st.a1.sc * Sdzb / count).contiguous();
  } else {
    k1 = st.a1.sc.clone();
    k2 = at::zeros({H}, ao);
    k3 = at::zeros({H}, ao);
  }
  // front sweep 1
  FrontAccums fa;
  fa.dchA = per(C);
  fa.dchB = per(C);
  fa.dtgA = per(1);
  fa.dqa2 = per(Ch);
  fa.dws = per(Ch);
  fa.dbs = per(1);
  fa.db2 = per(Ch);
  fa.dlnbw = per(C);
  fa.dlnbb = per(C);
  if (want(kWd)) fa.dWd = at::zeros({nch, H, n.Cg}, ao);
  Tensor dx1 = workspace(kSlotDx1, {F, N, C}, pr.acc);
  front1_pass(n, st.s, st.spmap, dsp, dotf, st.z, dzb, k1.data_ptr<acc_t>(), k2.data_ptr<acc_t>(),
              k3.data_ptr<acc_t>(), fa, dx1);
  timer("front1");
  auto by_frame = [&](const Tensor& t) { return t.view({F, n.ntiles, -1}).sum(1); };
  // channel attention backward per frame
  auto& fv = st.fv;
  Tensor dch = by_frame(fa.dchA) * pr.hy.alpha + by_frame(fa.dchB);        // [F, C]
  Tensor dcpre = dch * fv.ch * (1 - fv.ch);
  Tensor dhid_pre = at::mm(dcpre, p[kWc]) * (fv.hid_pre > 0);
  Tensor djoint = at::mm(dhid_pre, p[kWb]);                                // [F, C]
  Tensor dqa1 = djoint * st.colsum / static_cast<double>(N);
  Tensor gv = (djoint * fv.qa1 / static_cast<double>(N)).contiguous();
  // front sweep 2
  const bool guide_wanted = want_g || want(kWtok) || want(kBtok) || want(kWfc) || want(kBfc) || want(kTokens);
  Tensor dgav = per(1), dRi = at::empty({items, K, C}, ao), db1 = per(C);
  Tensor dx = want_x ? at::empty(x.sizes(), x.options()) : Tensor();
  Tensor DV1 = workspace(kSlotDv1, {F, N, C}, pr.acc);
  n.DV1 = DV1.data_ptr<acc_t>();
  front2_pass(n, gv, dx1, want_x ? dx.data_ptr<scalar_t>() : nullptr, dgav, dRi, db1);
  timer("front2");
  dx1 = Tensor();
  Tensor dR = dRi.view({F, n.ntiles, K, C}).sum(1);
  // per-frame vectors -> da
  const Tensor& a = st.guide.a;
  Tensor dtg = dtg_in.to(pr.acc).reshape({F}) + by_frame(fa.dtgA).view({F}) * pr.hy.gamma;
  Tensor dqa2 = by_frame(fa.dqa2);
  Tensor dqa1_pre = dqa1 * (fv.qa1_pre > 0);
  Tensor dqa2_pre = dqa2 * (fv.qa2_pre > 0);
  Tensor dtg_pre = (dtg * fv.tg * (1 - fv.tg)).unsqueeze(1);  // [F, 1]
  Tensor da = at::mm(dqa1_pre, p[kWa1]) + at::mm(dqa2_pre, p[kWa2]) + dtg_pre * p[kWt];
  GuideGrads gg;
  if (guide_wanted) gg = guide_backward(st.guide, p, dR, da, want_g);
  timer("guide bwd");

  // assemble
  std::vector<Tensor> grads(kNumParams);
  auto chunks = [&](const Tensor& t) { return t.sum(0); };
  grads[kWtok] = gg.Wtok;
  grads[kBtok] = gg.btok;
  grads[kWfc] = gg.Wfc;
  grads[kBfc] = gg.bfc;
  grads[kTokens] = gg.tokens;
  grads[kGateAv] = dgav.sum().view({1});
  grads[kWa1] = at::mm(dqa1_pre.t(), a);
  grads[kBa1] = dqa1_pre.sum(0);
  if (want(kWv1)) grads[kWv1] = at::mm(DV1.view({F * N, C}).t(), st.X1.view({F * N, C}));
  grads[kBv1] = db1.sum(0);
  grads[kWb] = at::mm(dhid_pre.t(), fv.joint);
  grads[kBb] = dhid_pre.sum(0);
  grads[kWc] = at::mm(dcpre.t(), fv.hid);
  grads[kBc] = dcpre.sum(0);
  if (want(kWv2))  // sum over frames of (dqv2_f^T x1_f) (1 + ch_f): xc never stored
    grads[kWv2] = (at::bmm(st.V2.transpose(1, 2), st.X1) * (fv.ch + 1).unsqueeze(1)).sum(0);
  grads[kBv2] = fa.db2.sum(0);
  grads[kWa2] = at::mm(dqa2_pre.t(), a);
  grads[kBa2] = dqa2_pre.sum(0);
  grads[kWs] = (fa.dws.sum(0) * 1).view({1, Ch});
  grads[kBs] = fa.dbs.sum().view({1});
  grads[kWt] = at::mm(dtg_pre.t(), a);
  grads[kBt] = dtg_pre.sum(0);
  if (pr.has_lnb) {
    grads[kLnbW] = fa.dlnbw.sum(0);
    grads[kLnbB] = fa.dlnbb.sum(0);
  }
  if (fa.dWd.defined()) grads[kWd] = chunks(fa.dWd);
  if (pr.has_bn) {
    grads[kBn1W] = Sdzbz;
    grads[kBn1B] = Sdzb;
    grads[kBn2W] = Sdubu;
    grads[kBn2B] = Sdub;
    if (n.batch_stats) {  // the running buffers are not read in training
      for (int i : {int(kBn1Rm), int(kBn1Rv), int(kBn2Rm), int(kBn2Rv)}) grads[i] = at::zeros_like(p[i]);
    } else {
      grads[kBn1Rm] = -st.a1.sc * Sdzb;
      grads[kBn1Rv] = -0.5 * st.a1.sc * st.a1.rs * Sdzbz;
      grads[kBn2Rm] = -st.a2.sc * Sdub;
      grads[kBn2Rv] = -0.5 * st.a2.sc * st.a2.rs * Sdubu;
    }
  }
  if (dWu_part.defined()) grads[kWu] = chunks(dWu_part);
  if (pr.has_lnp) {
    grads[kLnpW] = ta.dlnpw.sum(0);
    grads[kLnpB] = ta.dlnpb.sum(0);
  }
  if (pr.has_gate) grads[kGate] = ta.dgate.sum().view({1});

  std::vector<Tensor> out;
  out.reserve(2 + kNumParams);
  Tensor empty = at::empty({0}, x.options());
  out.push_back(want_x ? dx : empty);
  out.push_back(want_g && gg.g.defined() ? gg.g.to(x.scalar_type()) : empty.clone());
  for (int i = 0; i < kNumParams; ++i) {
    if (!want(i) || !p[i].defined()) {
      out.push_back(empty.clone());
      continue;
    }
    TORCH_CHECK(grads[i].defined(), "dgsct_kernels cpu: internal error, no gradient for parameter slot ", i);
    out.push_back(grads[i].reshape(p[i].sizes()).to(x.scalar_type()).contiguous());
  }
  return out;
}

std::vector<Tensor> forward_cpu(const Tensor& x_in, const Tensor& g, const c10::List<std::optional<Tensor>>& params,
                                at::ArrayRef<double> hyper, bool training, c10::string_view guide_order,
                                std::vector<Tensor>* kept) {
  Prepared pr = prepare(x_in, g, params, hyper);
  const Tensor x = x_in.contiguous();
  const std::string order(guide_order);
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dgsct_cpu_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = forward_impl<scalar_t, acc_t>(x, g, pr, training, order, kept);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fused_forward_cpu(
    const Tensor& x, const Tensor& g, const c10::List<std::optional<Tensor>>& params, at::ArrayRef<double> hyper,
    bool training, c10::string_view guide_order) {
  auto out = forward_cpu(x, g, params, hyper, training, guide_order, nullptr);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, std::vector<Tensor>> fused_forward_saving_cpu(
    const Tensor& x, const Tensor& g, const c10::List<std::optional<Tensor>>& params, at::ArrayRef<double> hyper,
    bool training, c10::string_view guide_order) {
  std::vector<Tensor> kept;
  auto out = forward_cpu(x, g, params, hyper, training, guide_order, &kept);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], kept};
}

std::vector<Tensor> backward_cpu(const Tensor& grad_residual, const Tensor& grad_spatial_map,
                                 const Tensor& grad_temporal_gate, const Tensor& x_in, const Tensor& g,
                                 const c10::List<std::optional<Tensor>>& params, const std::vector<Tensor>* kept,
                                 at::ArrayRef<double> hyper, bool training, c10::string_view guide_order,
                                 at::IntArrayRef wanted_in) {
  Prepared pr = prepare(x_in, g, params, hyper);
  const Tensor x = x_in.contiguous();
  TORCH_CHECK(static_cast<int64_t>(wanted_in.size()) == 2 + kNumParams, "dgsct_kernels cpu: expected ",
              2 + kNumParams, " wanted flags (x, g, then config.OP_PARAM_NAMES), got ", wanted_in.size());
  TORCH_CHECK(grad_residual.sizes() == x.sizes(), "dgsct_kernels cpu: grad_residual has shape ",
              grad_residual.sizes(), ", expected ", x.sizes());
  TORCH_CHECK(grad_spatial_map.numel() == x.size(0) * x.size(1) && grad_temporal_gate.numel() == x.size(0),
              "dgsct_kernels cpu: grad_spatial_map / grad_temporal_gate have the wrong number of elements");
  std::vector<bool> wanted(wanted_in.begin(), wanted_in.end());
  for (size_t i = 0; i < wanted.size(); ++i) wanted[i] = wanted_in[i] != 0;
  const std::string order(guide_order);
  if (kept) check_kept(*kept, kept_shapes(pr, x, g, training, order), pr.acc);
  const std::vector<Tensor> none;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dgsct_cpu_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = backward_impl<scalar_t, acc_t>(grad_residual, grad_spatial_map.reshape({x.size(0), x.size(1)}),
                                         grad_temporal_gate, x, g, pr, training, order, wanted, kept ? *kept : none);
  });
  return out;
}

std::vector<Tensor> fused_backward_cpu(const Tensor& grad_residual, const Tensor& grad_spatial_map,
                                       const Tensor& grad_temporal_gate, const Tensor& x, const Tensor& g,
                                       const c10::List<std::optional<Tensor>>& params, at::ArrayRef<double> hyper,
                                       bool training, c10::string_view guide_order, at::IntArrayRef wanted) {
  return backward_cpu(grad_residual, grad_spatial_map, grad_temporal_gate, x, g, params, nullptr, hyper, training,
                      guide_order, wanted);
}

std::vector<Tensor> fused_backward_saved_cpu(const Tensor& grad_residual, const Tensor& grad_spatial_map,
                                             const Tensor& grad_temporal_gate, const Tensor& x, const Tensor& g,
                                             const c10::List<std::optional<Tensor>>& params, at::TensorList saved,
                                             at::ArrayRef<double> hyper, bool training, c10::string_view guide_order,
                                             at::IntArrayRef wanted) {
  const std::vector<Tensor> kept(saved.begin(), saved.end());
  return backward_cpu(grad_residual, grad_spatial_map, grad_temporal_gate, x, g, params, &kept, hyper, training,
                      guide_order, wanted);
}

}  // namespace

TORCH_LIBRARY_IMPL(dgsct_kernels, CPU, m) {
  m.impl("fused_forward", &fused_forward_cpu);
  m.impl("fused_backward", &fused_backward_cpu);
  m.impl("fused_forward_saving", &fused_forward_saving_cpu);
  m.impl("fused_backward_saved", &fused_backward_saved_cpu);
}

}  // namespace dgsct::cpu
