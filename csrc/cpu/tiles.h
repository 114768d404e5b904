// What the cpu backend's token passes see of one call: `Net` (sizes, tile geometry, pointers
// to the parameters and per-frame vectors in the accumulation dtype acc_t) and the helpers a
// tile uses: BLAS products (gemm), the prompt attention, the grouped 1x1 convolutions.
//
// Work is split into items (frame f, block of BN tokens); a fixed number of chunks of
// consecutive items run under at::parallel_for. Every per-token [N, C] intermediate
// (x1, qv1, xc, qv2, xm, y, u, ...) lives only in a chunk's tile buffers. Reductions over
// tokens go to per-item partials (per-frame vectors) or per-chunk partials (weight
// gradients) that are summed in a fixed order afterwards, so results do not depend on
// thread scheduling. Matrix products on tiles call oneDNN or BLAS (products.h picks; sgemm_/
// dgemm_ of the BLAS torch links, else at::addmm_ on views); the frame-level products go
// through products.h's matmul.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "core/simd.h"
#include "cpu/dgsct_cpu.h"
#include "cpu/products.h"

extern "C" {
// Fortran BLAS of the library torch links (MKL on x86 wheels); weak, so a torch without
// them still loads this extension and the products fall back to ATen.
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace dgsct::cpu {

using at::Tensor;

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
    // oneDNN where gemm_provider() chose it (AVX-512 on CPUs where MKL runs AVX2); onednn_product
    // decides on layouts and sizes, the guard only spares small products the tensor views
    if (m * n * k >= kOneDnnMinWork && gemm_provider() == GemmProvider::kOneDnn) {
      const auto opts = at::TensorOptions().dtype(at::kFloat);
      float* a = const_cast<float*>(A);
      float* b = const_cast<float*>(B);
      Tensor At = ta ? at::from_blob(a, {k, m}, {lda, 1}, opts).t() : at::from_blob(a, {m, k}, {lda, 1}, opts);
      Tensor Bt = tb ? at::from_blob(b, {n, k}, {ldb, 1}, opts).t() : at::from_blob(b, {k, n}, {ldb, 1}, opts);
      if (onednn_product(At, Bt, at::from_blob(Cm, {m, n}, {ldc, 1}, opts), beta, alpha)) return;
    }
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

// Everything the token passes read, in the accumulation dtype acc_t.
template <typename scalar_t, typename acc_t>
struct Net {
  int64_t F, N, C, K, H, G, Ch, Cg, Hg, Cog, BN, ntiles, items, nchunks;
  const scalar_t* x;
  const acc_t* R;
  acc_t gav;
  const acc_t *W1, *b1, *W2, *b2, *ws;
  // W1 in scalar_t where the cpu backend runs the channel product with bf16/fp16 operands
  // (precision_plan.def, cpu_runs_low), else null (float32 BLAS on W1)
  const scalar_t* W1low = nullptr;
  Tensor W1low_owner;
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
  // qv1 > 0 as bits [F, N, CB], CB = ceil(C / 8): the forward writes them for the backward
  // (kept state), which then unpacks them into M1 instead of rerunning the channel product
  uint8_t* M1bits = nullptr;
  int64_t CB = 0;
  bool refill_x1 = false;  // backward from kept state: the bottleneck pass fills X1, Pst, M1
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

  // out[rows, m] = A[rows, k] op(W) + beta out, op(W) = W^T for W [m, k] (tb), else W [k, m].
  // With Wlow (W in scalar_t) A is rounded to scalar_t and the product runs through ATen,
  // whose oneDNN matmul uses the CPU's bf16 units (float32 accumulation, result rounded to
  // scalar_t); without, BLAS in acc_t on W.
  void weight_product(bool tb, int64_t rows, int64_t m, int64_t k, const acc_t* A, const acc_t* W,
                      const scalar_t* Wlow, acc_t beta, acc_t* out) const {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      if (Wlow != nullptr) {
        static thread_local std::vector<scalar_t> a_low, c_low;
        a_low.resize(rows * k);
        c_low.resize(rows * m);
        for (int64_t i = 0; i < rows * k; ++i) a_low[i] = static_cast<scalar_t>(A[i]);
        const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
        scalar_t* w = const_cast<scalar_t*>(Wlow);
        Tensor Wt = tb ? at::from_blob(w, {m, k}, opts).t() : at::from_blob(w, {k, m}, opts);
        Tensor Ct = at::from_blob(c_low.data(), {rows, m}, opts);
        at::mm_out(Ct, at::from_blob(a_low.data(), {rows, k}, opts), Wt);
        if (beta == acc_t(0)) {
          for (int64_t i = 0; i < rows * m; ++i) out[i] = static_cast<acc_t>(c_low[i]);
        } else {
          for (int64_t i = 0; i < rows * m; ++i) out[i] = beta * out[i] + static_cast<acc_t>(c_low[i]);
        }
        return;
      }
    }
    gemm<acc_t>(false, tb, rows, m, k, 1, A, k, W, tb ? k : m, beta, out, m);
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
};

template <typename T>
Tensor zeros(std::initializer_list<int64_t> size) {
  return at::zeros(size, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
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

}  // namespace dgsct::cpu
