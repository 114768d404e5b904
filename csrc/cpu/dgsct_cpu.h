// The guide path in ATen (guide_path.cpp), shared by the cpu backend (csrc/cpu) and the CUDA
// driver (csrc/cuda/portable), and the parameter slots as dgsct::cpu names them.
//
// The op receives the parameters as one list in config.OP_PARAM_NAMES order, with an
// undefined tensor where an optional layer is absent; `Param` (param_slots.h) names the
// positions. The checks and the BatchNorm / LayerNorm maths both backends share are in
// csrc/core.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "cpu/products.h"
#include "param_slots.h"
#include "precision_plan.h"

namespace dgsct::cpu {

// The slots themselves are declared once, in dgsct_kernels/param_slots.def (see
// param_slots.h); they are visible here as dgsct::cpu::Param, dgsct::cpu::kWtok, ...
using ::dgsct::Param;
using ::dgsct::kNumParams;
using ::dgsct::kParamNames;
#define DGSCT_SLOT(id, name) using ::dgsct::id;
#include "param_slots.def"
#undef DGSCT_SLOT
// and the precision plan's products (precision_plan.def) as dgsct::cpu::kGuide, ...
using ::dgsct::Product;
using ::dgsct::low_precision;
#define DGSCT_PRODUCT(id, name, low) using ::dgsct::id;
#include "precision_plan.def"
#undef DGSCT_PRODUCT

// SPEC.md steps 1, 2 and 4 without forming P (guide_path.py's orders), in the
// accumulation dtype, with what the analytic backward needs kept.
struct GuideState {
  std::string order;
  at::Tensor g;  // [F, M, D], accumulation dtype
  at::Tensor R;  // [F, K, C] prompts
  at::Tensor a;  // [F, C] pooled guide
  // rewritten order
  at::Tensor Q, qsum, wsum, Sg, A, B, applied, ab, wbar, ga;
  // tokens-first order
  at::Tensor U, AU, ubar;
};

struct GuideGrads {
  at::Tensor g, Wtok, btok, Wfc, bfc, tokens;  // undefined where not asked for
};

// Which of the plan's low-precision products this backend runs so (backends/cpu.py states
// the same set): only channel. Not spatial: ATen's bf16 product also rounds its result to
// bf16, and with that rounding of the pre-relu qv2 the W_video_2 gradient's error reached
// 0.33 in the parity test against a bound of 0.10 (3x eager bf16's).
inline bool cpu_runs_low(Product product) { return product == kChannel; }

// The operand dtype of the products the precision plan names `product`, for inputs of
// dtype `input` computed in `acc`: the input's bf16/fp16 where the plan allows it and the
// cpu backend runs it so, else acc.
inline at::ScalarType operand_dtype(Product product, at::ScalarType input, at::ScalarType acc) {
  if (!cpu_runs_low(product)) return acc;
  if (input == at::kBFloat16) return low_precision(product, "bf16") ? input : acc;
  if (input == at::kHalf) return low_precision(product, "fp16") ? input : acc;
  return acc;
}

// a @ b with `operands` as the operand dtype (bf16/fp16 through ATen: oneDNN on the CPU's
// bf16 units, result rounded to it), returned in a's dtype.
inline at::Tensor matmul_in(const at::Tensor& a, const at::Tensor& b, at::ScalarType operands) {
  if (operands == a.scalar_type()) return cpu::matmul(a, b);
  return at::matmul(a.to(operands), b.to(operands)).to(a.scalar_type());
}

// float32 products for every input dtype (precision_plan.def: guide).
GuideState guide_forward(const at::Tensor& g, const std::vector<at::Tensor>& p, const std::string& order);
// The guide path's share of the state the forward keeps for the backward: rewritten
// A [F, K, N], B [F, K, M] (where guide_keeps_b), applied [F, K, D], ab [F, K], ga [F, D]; tokens-first
// U [F, N, D] only when D < C (so it is smaller than x), A, AU [F, K, D], ubar [F, D].
inline bool guide_keeps_u(int64_t D, int64_t C) { return D < C; }
// B = A Wtok [F, K, M] is kept unless it exceeds a quarter of x (K M > N C / 4: the stage-1
// visual module, where it alone is 0.30x of x); the backward then recomputes it (2 F K N M).
inline bool guide_keeps_b(int64_t K, int64_t M, int64_t N, int64_t C) { return 4 * K * M <= N * C; }
std::vector<at::Tensor> guide_kept(const GuideState& s, int64_t C);
std::vector<std::vector<int64_t>> guide_kept_shapes(const std::string& order, int64_t F, int64_t N, int64_t M,
                                                    int64_t D, int64_t K, int64_t C);
// guide_forward's state from guide_kept's tensors; recomputes only the frame-independent
// products, Sg = Q g^T (2FKMD FLOPs) and, when U was not kept, U = Wtok g + btok.
GuideState guide_restore(const at::Tensor& g, const std::vector<at::Tensor>& p, const std::string& order,
                         const at::Tensor& R, const at::Tensor& a, at::ArrayRef<at::Tensor> kept);
GuideGrads guide_backward(const GuideState& s, const std::vector<at::Tensor>& p, const at::Tensor& dR,
                          const at::Tensor& da, bool want_g);

}  // namespace dgsct::cpu
