// The fused op's arguments and results, the same for every backend (csrc/cpu and the CUDA
// driver, csrc/cuda/portable): one check and preparation of the inputs (prepare ->
// Prepared), one check of the backward's extra arguments, and the assembly of the outputs
// in the order the schema (csrc/ops.cpp) returns them. Every message starts with
// "dgsct_kernels <who>:" and names the argument, what it is and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "param_slots.h"

namespace dgsct::core {

// Hyper-parameters in config.Hyper order.
struct Hyper {
  double alpha, beta, gamma, ln_before_eps, bn1_eps, bn2_eps, ln_post_eps;
};

// What differs between the backends' inputs; everything else is checked alike.
struct BackendRules {
  const char* who;     // names the backend in messages: "cpu", "cuda", "cuda (host check)"
  bool cpu_only;       // x and g must be CPU tensors (the cpu backend)
  bool allow_float64;  // float64 inputs are accepted (and accumulated in float64)
};

// The checked inputs: parameters in the accumulation dtype, on x's device, contiguous, and
// the sizes read off x, g and the parameters.
struct Prepared {
  const char* who;            // the backend, as BackendRules::who
  std::vector<at::Tensor> p;  // one per Param slot; undefined where absent (the running
                              // statistics may be empty in training: they are not read)
  Hyper hy;
  at::ScalarType acc;  // float64 for float64 inputs, else float32
  int64_t F, N, C, M, D, K, H, G, Ch;  // x [F, N, C], g [F, M, D], K prompts, H hidden, G groups, C/2
  bool has_lnb, has_bn, has_lnp, has_gate;
  bool batch_stats;  // training with BatchNorm: bn1 and bn2 normalise with the batch's statistics
  at::TensorOptions ao;  // the accumulation dtype on x's device
};

// Checks, naming the argument: x [F, N, C] and g [F, M, D] (rank, device, dtype, the same F,
// no empty size, C > 1), the number of parameter slots and hyper-parameters, each given
// parameter's device, dtype and shape (SPEC.md's, from x and g), that every required slot is
// given and every optional layer (ln_before, bn, ln_post) wholly or not at all.
Prepared prepare(const BackendRules& rules, const at::Tensor& x, const at::Tensor& g,
                 const c10::List<std::optional<at::Tensor>>& params, at::ArrayRef<double> hyper, bool training);

// The backward's incoming gradients and `wanted` flags (x, g, then the parameter slots).
void check_backward_args(const Prepared& pr, const at::Tensor& x, const at::Tensor& grad_residual,
                         const at::Tensor& grad_spatial_map, const at::Tensor& grad_temporal_gate,
                         at::IntArrayRef wanted);

// The forward's seven results: o (x's dtype), the spatial map and the temporal gate
// (converted to x's dtype), then bn1 mean and var, bn2 mean and var in training with
// BatchNorm (accumulation dtype), else four empty tensors.
std::vector<at::Tensor> forward_outputs(const Prepared& pr, const at::Tensor& x, const at::Tensor& o,
                                        const at::Tensor& spmap, const at::Tensor& tg, const at::Tensor& mean1,
                                        const at::Tensor& var1, const at::Tensor& mean2, const at::Tensor& var2);

// The backward's results: dx, dg, then one gradient per parameter slot, each in x's dtype and
// shaped like its input; an empty tensor where not wanted or the slot is absent. `grads`
// holds a gradient (any shape with the slot's number of elements) for every wanted slot.
std::vector<at::Tensor> backward_outputs(const Prepared& pr, const at::Tensor& x, at::IntArrayRef wanted,
                                         const at::Tensor& dx, const at::Tensor& dg,
                                         const std::vector<at::Tensor>& grads);

}  // namespace dgsct::core
