// The CUDA kernels' launchers (kernels.cu), callable from the op glue (ops_cuda.cpp).
// Plain C++ types only, so neither side needs the other's headers.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/dgsct_tiles.h"

namespace dgsct::cuda {

enum class Pass : int { kChannel = 0, kBottleneck = 1, kMoments = 2, kOutput = 3 };
enum class Dtype : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// Shared floats a block may use on the current device (opt-in limit, capped at 96 KiB).
int64_t shared_budget_floats(int device);

// One thread block per (frame, token tile): F * ntiles blocks. Returns the launch error.
cudaError_t launch_pass(Pass pass, Dtype dtype, const TileArgs& args, cudaStream_t stream);

}  // namespace dgsct::cuda
