// The CUDA kernels of the fused forward: one thread block per (frame, token tile) runs
// one tile function of dgsct_tiles.h with its tile in shared memory. Only CUDA headers.
//
//   channel     x -> x1 (prompt softmax over K) -> token sums of relu(x1 W1^T + b1)
//   bottleneck  x -> x1 -> qv2 -> s; modulation -> xm; ln_before; down projection -> z
//   moments     z -> h -> u: bn2's per-tile sums (training with BatchNorm only)
//   output      z -> h -> u -> bn2 -> ln_post -> gate -> o
// x1, qv1, xc, qv2 and xm live in shared memory and registers only. The token x channel
// products run on tensor cores (mma.sync tf32 with a 3xTF32 split, see dgsct_tiles.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launch.h"

namespace dgsct::cuda {
namespace {

constexpr int kThreads = 32 * kBlockWarps;
constexpr int64_t kMaxSharedBytes = 96 * 1024;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) channel_kernel(TileArgs a) {
  extern __shared__ __align__(16) float smem[];
  channel_tile<scalar_t>(a, blockIdx.x, smem);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bottleneck_kernel(TileArgs a) {
  extern __shared__ __align__(16) float smem[];
  bottleneck_tile<scalar_t>(a, blockIdx.x, smem);
}

__global__ void __launch_bounds__(kThreads) moments_kernel(TileArgs a) {
  extern __shared__ __align__(16) float smem[];
  moments_tile(a, blockIdx.x, smem);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) output_kernel(TileArgs a) {
  extern __shared__ __align__(16) float smem[];
  output_tile<scalar_t>(a, blockIdx.x, smem);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, int64_t shared_floats, const TileArgs& a, cudaStream_t stream) {
  const int64_t bytes = shared_floats * static_cast<int64_t>(sizeof(float));
  if (bytes > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = static_cast<int64_t>(a.F) * a.ntiles;
  if (blocks <= 0) return cudaSuccess;
  kernel<<<static_cast<unsigned>(blocks), kThreads, static_cast<size_t>(bytes), stream>>>(a);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_typed(Pass pass, const TileArgs& a, cudaStream_t stream) {
  switch (pass) {
    case Pass::kChannel:
      return launch(channel_kernel<scalar_t>, channel_shared_floats(a, a.BT), a, stream);
    case Pass::kBottleneck:
      return launch(bottleneck_kernel<scalar_t>, bottleneck_shared_floats(a, a.BT), a, stream);
    case Pass::kMoments:
      return launch(moments_kernel, moments_shared_floats(a, a.BT), a, stream);
    case Pass::kOutput:
      return launch(output_kernel<scalar_t>, output_shared_floats(a, a.BT), a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t shared_budget_floats(int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess || optin <= 0)
    optin = 48 * 1024;
  const int64_t bytes = optin < kMaxSharedBytes ? optin : kMaxSharedBytes;
  return bytes / static_cast<int64_t>(sizeof(float));
}

cudaError_t launch_pass(Pass pass, Dtype dtype, const TileArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat:
      return launch_typed<float>(pass, args, stream);
    case Dtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(pass, args, stream);
    case Dtype::kHalf:
      return launch_typed<__half>(pass, args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dgsct::cuda
