// The CUDA implementation of the fused op (schema in csrc/ops.cpp): the driver
// (portable/driver.cpp) with a Runner that launches the kernels of kernels.cu on the
// current stream. The backward is the driver's ATen backward on CUDA tensors.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "cuda/portable/driver.h"

namespace dgsct::cuda {
namespace {

class CudaRunner final : public Runner {
 public:
  explicit CudaRunner(int device) : budget_(dgsct::cuda::shared_budget_floats(device)) {}
  const char* name() const override { return "cuda"; }
  int64_t shared_budget_floats() const override { return budget_; }
  void run(PassKind pass, const TileArgs& a, at::ScalarType dtype) override {
    Dtype d = Dtype::kFloat;
    if (dtype == at::kBFloat16) {
      d = Dtype::kBFloat16;
    } else if (dtype == at::kHalf) {
      d = Dtype::kHalf;
    } else {
      TORCH_CHECK(dtype == at::kFloat, "dgsct_kernels cuda: unsupported dtype ", dtype);
    }
    const cudaError_t err = launch_pass(static_cast<Pass>(static_cast<int>(pass)), d, a,
                                        at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "dgsct_kernels cuda: launching pass ", static_cast<int>(pass), " failed: ",
                cudaGetErrorString(err));
  }

 private:
  int64_t budget_;
};

void check_cuda(const at::Tensor& x, const at::Tensor& g) {
  TORCH_CHECK(x.is_cuda(), "dgsct_kernels cuda: x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(g.is_cuda(), "dgsct_kernels cuda: g must be a CUDA tensor, got one on ", g.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_forward_cuda(
    const at::Tensor& x, const at::Tensor& g, const c10::List<std::optional<at::Tensor>>& params,
    at::ArrayRef<double> hyper, bool training, c10::string_view guide_order) {
  check_cuda(x, g);
  const c10::cuda::CUDAGuard guard(x.device());
  CudaRunner runner(x.get_device());
  auto out = forward_design(x, g, params, hyper, training, std::string(guide_order), runner);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

std::vector<at::Tensor> fused_backward_cuda(const at::Tensor& grad_residual, const at::Tensor& grad_spatial_map,
                                            const at::Tensor& grad_temporal_gate, const at::Tensor& x,
                                            const at::Tensor& g, const c10::List<std::optional<at::Tensor>>& params,
                                            at::ArrayRef<double> hyper, bool training, c10::string_view guide_order,
                                            at::IntArrayRef wanted) {
  check_cuda(x, g);
  const c10::cuda::CUDAGuard guard(x.device());
  return backward_design(grad_residual, grad_spatial_map, grad_temporal_gate, x, g, params, hyper, training,
                         std::string(guide_order), wanted, "cuda");
}

}  // namespace

TORCH_LIBRARY_IMPL(dgsct_kernels, CUDA, m) {
  m.impl("fused_forward", &fused_forward_cuda);
  m.impl("fused_backward", &fused_backward_cuda);
}

}  // namespace dgsct::cuda
