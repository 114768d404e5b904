// The CUDA backend's op logic in ATen, independent of the device: the guide path and
// per-frame vectors, the order of the tile passes (run by a Runner: CUDA kernels in
// ops_cuda.cpp, the same tile functions on the CPU in host_check.cpp), and the analytic
// backward, which recomputes from x, g and the parameters with ATen ops (cuBLAS products
// on CUDA tensors); argument checks, BatchNorm and LayerNorm come from csrc/core, shared
// with the cpu backend. Compiled into every build, so it is tested on CPUs.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "cuda/dgsct_tiles.h"

namespace dgsct::cuda {

enum class PassKind : int { kChannel = 0, kBottleneck = 1, kMoments = 2, kOutput = 3 };

// Executes the tile passes of dgsct_tiles.h over F * ntiles tiles.
class Runner {
 public:
  virtual ~Runner() = default;
  virtual const char* name() const = 0;          // for error messages: "cuda" or "cuda (host check)"
  virtual int64_t shared_budget_floats() const = 0;
  virtual void run(PassKind pass, const TileArgs& args, at::ScalarType dtype) = 0;
};

std::vector<at::Tensor> forward_design(const at::Tensor& x, const at::Tensor& g,
                                       const c10::List<std::optional<at::Tensor>>& params,
                                       at::ArrayRef<double> hyper, bool training, const std::string& order,
                                       Runner& runner);

std::vector<at::Tensor> backward_design(const at::Tensor& grad_residual, const at::Tensor& grad_spatial_map,
                                        const at::Tensor& grad_temporal_gate, const at::Tensor& x,
                                        const at::Tensor& g, const c10::List<std::optional<at::Tensor>>& params,
                                        at::ArrayRef<double> hyper, bool training, const std::string& order,
                                        at::IntArrayRef wanted, const char* who);

// Tokens per tile so that the largest pass fits `budget_floats` shared floats: at most 64
// and N rounded up to 16, a multiple of 16 (the tensor-core products' row block) unless
// fewer than 16 fit.
int tile_tokens(const TileArgs& a, int64_t budget_floats);

}  // namespace dgsct::cuda
