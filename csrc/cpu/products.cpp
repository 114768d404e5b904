#include "cpu/products.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>

// Exported by libtorch_cpu (ATen/native/mkldnn/Matmul.h, not installed): result = beta result +
// alpha mat1 mat2 on oneDNN. Weak: a torch without it leaves the address null.
namespace at::native {
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                   float alpha) __attribute__((weak));
}

namespace dgsct::cpu {
namespace {

using at::Tensor;

struct Choice {
  GemmProvider provider;
  std::string reason;
};

bool fits(const Tensor& t) {  // contiguous, or the last two dims transposed
  if (t.is_contiguous()) return true;
  const int64_t d = t.dim();
  return t.stride(d - 2) == 1 && t.stride(d - 1) == t.size(d - 2) &&
         (d == 2 || t.stride(0) == t.size(1) * t.size(2));
}

double seconds_of(const std::function<void()>& fn) {
  fn();  // warm-up (oneDNN builds its kernel here)
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

Choice choose() {
  const char* env = std::getenv("DGSCT_CPU_GEMM");
  const std::string want = env == nullptr ? "auto" : env;
  TORCH_CHECK(want == "auto" || want == "blas" || want == "onednn", "DGSCT_CPU_GEMM=", want,
              ": expected auto, blas or onednn");
  if (want == "blas") return {GemmProvider::kBlas, "DGSCT_CPU_GEMM=blas"};
  if (&at::native::mkldnn_matmul == nullptr) return {GemmProvider::kBlas, "this torch exports no oneDNN matmul"};
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn())
    return {GemmProvider::kBlas, "oneDNN is not built into or is disabled in this torch"};
  // A tile-sized product (the channel product of a stage-2 visual tile).
  const int64_t m = 256, k = 384, n = 384;
  Tensor a = at::sin(at::arange(m * k, at::kFloat)).view({m, k});
  Tensor b = at::cos(at::arange(n * k, at::kFloat).mul_(0.37f)).view({n, k}).t();  // transposed, as W^T
  Tensor ours = at::empty({m, n}, at::kFloat);
  try {
    at::native::mkldnn_matmul(a, b, ours, 0.f, 1.f);
  } catch (const c10::Error& e) {
    std::string what = e.what_without_backtrace();
    return {GemmProvider::kBlas, "oneDNN refused a float32 product: " + what.substr(0, what.find('\n'))};
  }
  const Tensor expect = at::mm(a.to(at::kDouble), b.to(at::kDouble));
  const double err = (ours.to(at::kDouble) - expect).abs().max().item<double>() / expect.abs().max().item<double>();
  if (!(err < 1e-5)) {
    char buf[128];
    std::snprintf(buf, sizeof buf, "oneDNN's float32 product is off by %.1e (relative)", err);
    return {GemmProvider::kBlas, buf};
  }
  if (want == "onednn") return {GemmProvider::kOneDnn, "DGSCT_CPU_GEMM=onednn"};
  Tensor blas = at::empty({m, n}, at::kFloat);
  const double t_dnn = seconds_of([&] { at::native::mkldnn_matmul(a, b, ours, 0.f, 1.f); });
  const double t_blas = seconds_of([&] { at::mm_out(blas, a, b); });
  char buf[160];
  std::snprintf(buf, sizeof buf, "oneDNN %.0f vs BLAS %.0f GFLOP/s on a %lldx%lldx%lld float32 product",
                2e-9 * m * n * k / t_dnn, 2e-9 * m * n * k / t_blas, (long long)m, (long long)k, (long long)n);
  // oneDNN only where it is clearly faster: elsewhere (MKL on Intel) BLAS has no setup cost
  return {t_dnn < 0.9 * t_blas ? GemmProvider::kOneDnn : GemmProvider::kBlas, buf};
}

const Choice& choice() {
  static const Choice chosen = choose();
  return chosen;
}

}  // namespace

GemmProvider gemm_provider() { return choice().provider; }
std::string gemm_provider_name() { return gemm_provider() == GemmProvider::kOneDnn ? "onednn" : "blas"; }
std::string gemm_provider_reason() { return choice().reason; }

bool onednn_product(const Tensor& A, const Tensor& B, const Tensor& C, float beta, float alpha) {
  if (gemm_provider() != GemmProvider::kOneDnn) return false;
  if (A.scalar_type() != at::kFloat || B.scalar_type() != at::kFloat || C.scalar_type() != at::kFloat) return false;
  const int64_t d = A.dim();
  if ((d != 2 && d != 3) || B.dim() != d || C.dim() != d) return false;
  const int64_t batch = d == 3 ? A.size(0) : 1;
  if (A.size(d - 2) * A.size(d - 1) * B.size(d - 1) * batch < kOneDnnMinWork) return false;
  if (!fits(A) || !fits(B) || !C.is_contiguous()) return false;
  at::native::mkldnn_matmul(A, B, C, beta, alpha);
  return true;
}

Tensor matmul(const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && gemm_provider() == GemmProvider::kOneDnn) {
    if (a.dim() == 2 && b.dim() == 2) {
      Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
      if (onednn_product(a, b, c, 0.f, 1.f)) return c;
    } else if (a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0)) {
      Tensor c = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
      if (onednn_product(a, b, c, 0.f, 1.f)) return c;
    } else if (a.dim() == 2 && b.dim() == 3) {  // one matrix against each of a batch
      Tensor c = at::empty({b.size(0), a.size(0), b.size(2)}, a.options());
      bool done = true;
      for (int64_t i = 0; i < b.size(0) && done; ++i) done = onednn_product(a, b[i], c[i], 0.f, 1.f);
      if (done) return c;
    } else if (a.dim() == 3 && b.dim() == 2 && a.is_contiguous()) {
      Tensor c = at::empty({a.size(0) * a.size(1), b.size(1)}, a.options());
      if (onednn_product(a.view({-1, a.size(2)}), b, c, 0.f, 1.f)) return c.view({a.size(0), a.size(1), b.size(1)});
    }
  }
  return at::matmul(a, b);
}

}  // namespace dgsct::cpu
