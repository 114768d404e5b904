// The CPU check of the CUDA backend (test-only ops, in every build of the extension):
//
//   dgsct_kernels::cuda_forward_on_host   the CUDA forward's driver with a Runner that runs
//                                          the kernels' tile functions (dgsct_tiles.h) on the
//                                          CPU, tile after tile, with a CPU buffer as shared memory
//   dgsct_kernels::cuda_backward_on_host  the CUDA backward (ATen) on CPU tensors
//
// Same schema as fused_forward / fused_backward; float32, bfloat16 and float16. The tile
// products run each lane's share of a warp item with the device's 3xTF32 operand rounding
// (mma_block in dgsct_tiles.h). What this cannot check: the CUDA specifics (launch
// configuration, shared-memory sizes, races between threads of a block, the mma.sync
// fragment layout); tests/test_gpu.py does, on a GPU.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "cuda/portable/driver.h"

namespace dgsct::cuda {
namespace {

// the tile size the CUDA kernels get on an sm_80 device (96 KiB of shared memory a block)
constexpr int64_t kHostSharedFloats = 96 * 1024 / 4;

class HostRunner final : public Runner {
 public:
  const char* name() const override { return "cuda (host check)"; }
  int64_t shared_budget_floats() const override { return kHostSharedFloats; }
  void run(PassKind pass, const TileArgs& a, at::ScalarType dtype) override {
    switch (dtype) {
      case at::kFloat:
        return run_typed<float>(pass, a);
      case at::kBFloat16:
        return run_typed<c10::BFloat16>(pass, a);
      case at::kHalf:
        return run_typed<c10::Half>(pass, a);
      default:
        TORCH_CHECK(false, "dgsct_kernels cuda (host check): unsupported dtype ", dtype);
    }
  }

 private:
  template <typename scalar_t>
  static void run_typed(PassKind pass, const TileArgs& a) {
    const int64_t items = static_cast<int64_t>(a.F) * a.ntiles;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> smem(kHostSharedFloats);
      for (int64_t item = begin; item < end; ++item) {
        switch (pass) {
          case PassKind::kChannel:
            channel_tile<scalar_t>(a, item, smem.data());
            break;
          case PassKind::kBottleneck:
            bottleneck_tile<scalar_t>(a, item, smem.data());
            break;
          case PassKind::kMoments:
            moments_tile(a, item, smem.data());
            break;
          case PassKind::kOutput:
            output_tile<scalar_t>(a, item, smem.data());
            break;
        }
      }
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_on_host(
    const at::Tensor& x, const at::Tensor& g, const c10::List<std::optional<at::Tensor>>& params,
    at::ArrayRef<double> hyper, bool training, c10::string_view guide_order) {
  HostRunner runner;
  auto out = forward_design(x, g, params, hyper, training, std::string(guide_order), runner);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

std::vector<at::Tensor> backward_on_host(const at::Tensor& grad_residual, const at::Tensor& grad_spatial_map,
                                         const at::Tensor& grad_temporal_gate, const at::Tensor& x,
                                         const at::Tensor& g, const c10::List<std::optional<at::Tensor>>& params,
                                         at::ArrayRef<double> hyper, bool training, c10::string_view guide_order,
                                         at::IntArrayRef wanted) {
  return backward_design(grad_residual, grad_spatial_map, grad_temporal_gate, x, g, params, hyper, training,
                         std::string(guide_order), wanted, "cuda (host check)");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dgsct_kernels, m) {
  m.def(
      "cuda_forward_on_host(Tensor x, Tensor g, Tensor?[] params, float[] hyper, bool training, str guide_order) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_backward_on_host(Tensor grad_residual, Tensor grad_spatial_map, Tensor grad_temporal_gate, Tensor x, "
      "Tensor g, Tensor?[] params, float[] hyper, bool training, str guide_order, int[] wanted) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(dgsct_kernels, CPU, m) {
  m.impl("cuda_forward_on_host", &forward_on_host);
  m.impl("cuda_backward_on_host", &backward_on_host);
}

}  // namespace dgsct::cuda
