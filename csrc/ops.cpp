// The schema of the fused operator, declared once. Device kernels register their
// implementations in their own files (csrc/cpu/*.cpp: TORCH_LIBRARY_IMPL(..., CPU, ...)).
//
// The public, autograd-aware op is the Python custom op `dgsct_kernels::forward`
// (dgsct_kernels/ops.py); a compiled backend's Python binding calls these inside it.
// `params` holds one slot per name of config.OP_PARAM_NAMES (None: that optional layer
// is absent), `hyper` is config.Hyper, `guide_order` is guide_path.plan_guide_path's
// choice, `wanted` has one flag per gradient: x, g, then the parameter slots.
//
// fused_forward_saving also returns `saved`, small per-frame state (never an [F, N, C]
// tensor) that fused_backward_saved reads instead of recomputing it; its layout is the
// device's own (csrc/cpu: enum Kept). fused_backward recomputes everything from x, g and
// the parameters. Only the CPU implements the saving pair so far.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dgsct_kernels, m) {
  m.def(
      "fused_forward(Tensor x, Tensor g, Tensor?[] params, float[] hyper, bool training, str guide_order) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "fused_backward(Tensor grad_residual, Tensor grad_spatial_map, Tensor grad_temporal_gate, Tensor x, "
      "Tensor g, Tensor?[] params, float[] hyper, bool training, str guide_order, int[] wanted) -> Tensor[]");
  m.def(
      "fused_forward_saving(Tensor x, Tensor g, Tensor?[] params, float[] hyper, bool training, str guide_order) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[])");
  m.def(
      "fused_backward_saved(Tensor grad_residual, Tensor grad_spatial_map, Tensor grad_temporal_gate, Tensor x, "
      "Tensor g, Tensor?[] params, Tensor[] saved, float[] hyper, bool training, str guide_order, int[] wanted) "
      "-> Tensor[]");
}
