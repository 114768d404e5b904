// The cpu backend's implementation of the fused op (schema in csrc/ops.cpp): its four entry
// points check and prepare their arguments (core/op_io.h) and the saved state, then run the
// forward or backward of fused.cpp.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "core/op_io.h"
#include "cpu/fused.h"
#include "cpu/products.h"

namespace dgsct::cpu {

using at::Tensor;

namespace {

constexpr core::BackendRules kRules{"cpu", /*cpu_only=*/true, /*allow_float64=*/true};

// `saved` against the layout fused_forward_saving returns for these inputs (fused.h: enum Kept).
void check_kept(const std::vector<Tensor>& kept, const std::vector<std::vector<int64_t>>& shapes, at::ScalarType acc) {
  TORCH_CHECK(kept.size() == shapes.size(), "dgsct_kernels cpu: saved has ", kept.size(), " tensors, expected ",
              shapes.size(), " (what fused_forward_saving returns for these shapes, training flag and guide_order)");
  for (size_t i = 0; i < kept.size(); ++i) {
    const Tensor& t = kept[i];
    const char* name = i < kNumKeptCommon ? kKeptNames[i] : "guide path state";
    const at::ScalarType dtype = kept_dtype(static_cast<int>(i), acc);
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == at::IntArrayRef(shapes[i]),
                "dgsct_kernels cpu: saved[", i, "] (", name, ") is ",
                t.defined() ? t.toString() + " " + c10::str(t.sizes()) : std::string("undefined"), ", expected a CPU ",
                dtype, " tensor of shape ", at::IntArrayRef(shapes[i]));
  }
}

std::vector<Tensor> forward_cpu(const Tensor& x_in, const Tensor& g, const c10::List<std::optional<Tensor>>& params,
                                at::ArrayRef<double> hyper, bool training, c10::string_view guide_order,
                                std::vector<Tensor>* kept) {
  const core::Prepared pr = core::prepare(kRules, x_in, g, params, hyper, training);
  (void)gemm_provider();  // the one-time probe, outside the parallel regions
  return run_forward(x_in.contiguous(), g, pr, std::string(guide_order), kept);
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
                                 at::IntArrayRef wanted) {
  const core::Prepared pr = core::prepare(kRules, x_in, g, params, hyper, training);
  (void)gemm_provider();
  const Tensor x = x_in.contiguous();
  core::check_backward_args(pr, x, grad_residual, grad_spatial_map, grad_temporal_gate, wanted);
  const std::string order(guide_order);
  if (kept) check_kept(*kept, kept_shapes(pr, order), pr.acc);
  return run_backward(grad_residual, grad_spatial_map, grad_temporal_gate, x, g, pr, order, wanted,
                      kept ? *kept : std::vector<Tensor>{});
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
