// Which library runs the cpu backend's float32 matrix products, and the products themselves.
//
// torch's x86 wheels send float32 matmuls to MKL, whose kernels on AMD CPUs are AVX2: on a
// Zen 5 core (full-width AVX-512) that is about half of what the core does. oneDNN, also in
// libtorch_cpu, picks its kernels by ISA and runs AVX-512 there (2.1-2.4x MKL's rate on the
// op's shapes, benchmarks/NOTES.md). ATen exports oneDNN's matmul as at::native::mkldnn_matmul;
// its header is not installed, so it is declared here, weak, and used only where a one-time
// probe found it present, correct and faster (or DGSCT_CPU_GEMM=onednn|blas says which).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace dgsct::cpu {

enum class GemmProvider { kBlas, kOneDnn };

// Chosen once per process (thread-safe); call it outside parallel regions first, since the
// probe times both libraries.
GemmProvider gemm_provider();
// "onednn" or "blas", and why (the probe's rates, the environment, or what was missing).
std::string gemm_provider_name();
std::string gemm_provider_reason();

// Products smaller than this many multiply-adds stay on BLAS: oneDNN's per-call setup
// (a few microseconds) is not repaid below it.
constexpr int64_t kOneDnnMinWork = 64 * 64 * 64;

// C = beta C + alpha A B on oneDNN for float32 2-D (or 3-D, batched) tensors whose A and B
// are contiguous or transposed-contiguous and whose C is contiguous. False (nothing written)
// where the provider is BLAS, the product is small or the layouts do not fit.
bool onednn_product(const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, float beta, float alpha);

// at::matmul for the frame-level products: float32 2-D x 2-D, 3-D x 3-D (same batch), 2-D x
// 3-D and 3-D x 2-D go through onednn_product where it applies; everything else is at::matmul.
at::Tensor matmul(const at::Tensor& a, const at::Tensor& b);

}  // namespace dgsct::cpu
