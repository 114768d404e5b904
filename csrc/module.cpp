// The Python module dgsct_kernels._C: what this build contains. Operator kernels
// register themselves with torch.library in their own files (csrc/cpu, csrc/cuda).
#include <torch/extension.h>

#include <string>

#include "param_slots.h"
#include "cpu/dgsct_cpu.h"
#include "cpu/products.h"
#include "precision_plan.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::string(DGSCT_TORCH_VERSION);
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown compiler");
#endif
  info["openmp"] = static_cast<bool>(DGSCT_OPENMP);
  info["cpu_arch"] = std::string(DGSCT_CPU_ARCH);
  info["cuda_built"] = static_cast<bool>(DGSCT_CUDA_BUILT);
  info["cuda_archs"] = std::string(DGSCT_CUDA_ARCHS);
  info["cuda_reason"] = std::string(DGSCT_CUDA_REASON);
  return info;
}

// The state-dict name of each parameter slot, in the op's order (param_slots.def).
pybind11::list param_slot_names() {
  pybind11::list names;
  for (const char* name : dgsct::kParamNames) names.append(name);
  return names;
}

// The precision plan as the C++ side sees it (precision_plan.def): {product: [dtypes]}.
pybind11::dict precision_plan() {
  pybind11::dict plan;
  for (int i = 0; i < dgsct::kNumProducts; ++i) {
    pybind11::list dtypes;
    for (const char* name : {"bf16", "fp16"})
      if (dgsct::low_precision(static_cast<dgsct::Product>(i), name)) dtypes.append(name);
    plan[dgsct::kProductNames[i]] = dtypes;
  }
  return plan;
}

// The plan's products the cpu backend runs with bf16/fp16 operands (cpu/dgsct_cpu.h).
pybind11::list cpu_low_precision_products() {
  pybind11::list names;
  for (int i = 0; i < dgsct::kNumProducts; ++i) {
    const auto product = static_cast<dgsct::Product>(i);
    if (dgsct::cpu::cpu_runs_low(product) && *dgsct::kLowDtypes[i] != '\0') names.append(dgsct::kProductNames[i]);
  }
  return names;
}

// Which library runs the cpu backend's float32 products, and why (cpu/products.h).
pybind11::tuple cpu_gemm_provider() {
  return pybind11::make_tuple(dgsct::cpu::gemm_provider_name(), dgsct::cpu::gemm_provider_reason());
}

// The cpu backend's guide path alone (steps 1, 2 and 4: prompts R and pooled guide a), for
// the benchmark's guide columns; g and the weights in the accumulation dtype.
pybind11::tuple cpu_guide_forward(const at::Tensor& g, const at::Tensor& conv_weight, const at::Tensor& conv_bias,
                                  const at::Tensor& fc_weight, const at::Tensor& fc_bias,
                                  const at::Tensor& my_tokens, const std::string& order) {
  std::vector<at::Tensor> p(dgsct::kNumParams);
  p[dgsct::kWtok] = conv_weight;
  p[dgsct::kBtok] = conv_bias;
  p[dgsct::kWfc] = fc_weight;
  p[dgsct::kBfc] = fc_bias;
  p[dgsct::kTokens] = my_tokens;
  (void)dgsct::cpu::gemm_provider();
  const dgsct::cpu::GuideState s = dgsct::cpu::guide_forward(g, p, order);
  return pybind11::make_tuple(s.R, s.a);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dgsct_kernels compiled extension";
  m.def("build_info", &build_info, "what this build of dgsct_kernels._C contains");
  m.def("param_slot_names", &param_slot_names,
        "the op's parameter slots as the C++ side sees them (dgsct_kernels/param_slots.def)");
  m.def("precision_plan", &precision_plan,
        "which products may take bf16/fp16 operands, as the C++ side sees it (precision_plan.def)");
  m.def("cpu_low_precision_products", &cpu_low_precision_products,
        "the plan's products the cpu backend runs with bf16/fp16 operands");
  m.def("cpu_matmul", &dgsct::cpu::matmul,
        "a @ b as the cpu backend runs its frame-level float32 products (for the GEMM-rate "
        "measurement of benchmarks/run.py)");
  m.def("cpu_guide_forward", &cpu_guide_forward,
        "(R, a): the cpu backend's guide path alone (for the benchmark's guide columns)");
  m.def("cpu_gemm_provider", &cpu_gemm_provider,
        "(name, reason): the library that runs the cpu backend's float32 products (oneDNN or BLAS)");
}
