// The op's arguments and results for every backend (see op_io.h).
#include "core/op_io.h"

#include <c10/util/Exception.h>

#include <array>
#include <initializer_list>

namespace dgsct::core {

using at::Tensor;

namespace {

bool is_running_stat(int i) { return i == kBn1Rm || i == kBn1Rv || i == kBn2Rm || i == kBn2Rv; }

constexpr int kRequired[] = {kWtok, kBtok, kWfc, kBfc, kTokens, kGateAv, kWa1, kBa1, kWv1, kBv1, kWb, kBb,
                             kWc,   kBc,   kWv2, kBv2, kWa2,    kBa2,    kWs,  kBs,  kWt,  kBt,  kWd, kWu};

}  // namespace

Prepared prepare(const BackendRules& rules, const Tensor& x, const Tensor& g,
                 const c10::List<std::optional<Tensor>>& params, at::ArrayRef<double> hyper, bool training) {
  const char* who = rules.who;
  TORCH_CHECK(x.defined() && x.dim() == 3, "dgsct_kernels ", who, ": x must be [F, N, C], got shape ",
              x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK(g.defined() && g.dim() == 3, "dgsct_kernels ", who, ": g must be [F, M, D], got shape ",
              g.defined() ? g.sizes() : at::IntArrayRef{});
  if (rules.cpu_only)
    TORCH_CHECK(x.device().is_cpu() && g.device().is_cpu(), "dgsct_kernels ", who,
                ": x and g must be CPU tensors, got ", x.device(), " and ", g.device());
  TORCH_CHECK(g.device() == x.device(), "dgsct_kernels ", who, ": g is on ", g.device(), ", expected x's device ",
              x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || (rules.allow_float64 && dt == at::kDouble),
              "dgsct_kernels ", who, ": x has dtype ", dt, "; expected ",
              rules.allow_float64 ? "float64, float32, bfloat16 or float16" : "float32, bfloat16 or float16");
  TORCH_CHECK(g.scalar_type() == dt, "dgsct_kernels ", who, ": x and g dtypes differ: g has dtype ", g.scalar_type(),
              ", expected x's dtype ", dt);
  TORCH_CHECK(g.size(0) == x.size(0), "dgsct_kernels ", who, ": x has F=", x.size(0), " frames (shape ", x.sizes(),
              ") but g has F=", g.size(0), " (shape ", g.sizes(),
              "); expected x [F, N, C] and g [F, M, D] with the same F");
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 1 && g.size(1) > 0 && g.size(2) > 0,
              "dgsct_kernels ", who, ": empty or degenerate inputs: x ", x.sizes(), ", g ", g.sizes());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kNumParams, "dgsct_kernels ", who, ": params has ",
              params.size(), " slots, expected ", static_cast<int>(kNumParams),
              " parameter slots (config.OP_PARAM_NAMES)");
  TORCH_CHECK(hyper.size() == 7, "dgsct_kernels ", who, ": hyper has ", hyper.size(),
              " values, expected 7 hyper-parameters (config.Hyper: alpha, beta, gamma, ln_before_eps, bn1_eps, "
              "bn2_eps, ln_post_eps)");
  Prepared pr;
  pr.who = who;
  pr.acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  pr.ao = x.options().dtype(pr.acc);
  pr.p.resize(kNumParams);
  for (int i = 0; i < kNumParams; ++i) {
    std::optional<Tensor> t = params.get(i);
    if (!t.has_value() || !t->defined()) continue;
    TORCH_CHECK(t->device() == x.device(), "dgsct_kernels ", who, ": params[", kParamNames[i], "] (slot ", i,
                ") is on ", t->device(), ", expected x's device ", x.device());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "dgsct_kernels ", who, ": params[", kParamNames[i],
                "] has dtype ", t->scalar_type(), ", expected a floating dtype");
    pr.p[i] = t->to(pr.acc).contiguous();
  }
  for (int i : kRequired)
    TORCH_CHECK(pr.p[i].defined(), "dgsct_kernels ", who, ": required parameter ", kParamNames[i],
                " is missing (required parameter slot ", i, " of config.OP_PARAM_NAMES)");
  pr.F = x.size(0);
  pr.N = x.size(1);
  pr.C = x.size(2);
  pr.M = g.size(1);
  pr.D = g.size(2);
  TORCH_CHECK(pr.p[kTokens].dim() == 2 && pr.p[kWd].dim() == 4, "dgsct_kernels ", who,
              ": my_tokens must be [K, C] and down_sampler.weight [H, C/G, 1, 1], got ", pr.p[kTokens].sizes(),
              " and ", pr.p[kWd].sizes());
  pr.K = pr.p[kTokens].size(0);
  pr.H = pr.p[kWd].size(0);
  const int64_t Cg = pr.p[kWd].size(1);
  TORCH_CHECK(Cg > 0 && pr.C % Cg == 0, "dgsct_kernels ", who, ": down_sampler.weight has shape ",
              pr.p[kWd].sizes(), "; its second size C/G must divide C=", pr.C);
  pr.G = pr.C / Cg;
  TORCH_CHECK(pr.H > 0 && pr.H % pr.G == 0, "dgsct_kernels ", who, ": down_sampler.weight has shape ",
              pr.p[kWd].sizes(), "; H=", pr.H, " must be a positive multiple of G=", pr.G);
  pr.Ch = pr.C / 2;
  const int64_t N = pr.N, C = pr.C, M = pr.M, D = pr.D, K = pr.K, H = pr.H, G = pr.G, Ch = pr.Ch;
  const std::array<std::vector<int64_t>, kNumParams> shapes = {{
      {N, M, 1, 1}, {N}, {C, D}, {C}, {K, C}, {1}, {C, C}, {C}, {C, C}, {C}, {Ch, C}, {Ch}, {C, Ch}, {C},
      {Ch, C}, {Ch}, {Ch, C}, {Ch}, {1, Ch}, {1}, {1, C}, {1}, {C}, {C}, {H, C / G, 1, 1}, {H}, {H}, {H}, {H},
      {C, H / G, 1, 1}, {C}, {C}, {C}, {C}, {C}, {C}, {1}}};
  for (int i = 0; i < kNumParams; ++i) {
    const Tensor& t = pr.p[i];
    if (!t.defined()) continue;
    if (training && is_running_stat(i) && t.numel() == 0) continue;  // not read in training (ops.py drops them)
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shapes[i]), "dgsct_kernels ", who, ": params[", kParamNames[i],
                "] has shape ", t.sizes(), ", expected ", at::IntArrayRef(shapes[i]), " for x ", x.sizes(), " and g ",
                g.sizes());
  }
  auto group = [&](std::initializer_list<int> ids, const char* layer) {
    int present = 0, total = 0;
    for (int i : ids) {
      present += pr.p[i].defined();
      ++total;
    }
    TORCH_CHECK(present == 0 || present == total, "dgsct_kernels ", who, ": optional layer ", layer,
                " is partly given (", present, " of ", total, " tensors)");
  };
  group({kLnbW, kLnbB}, "ln_before");
  group({kBn1W, kBn1B, kBn1Rm, kBn1Rv, kBn2W, kBn2B, kBn2Rm, kBn2Rv}, "bn");
  group({kLnpW, kLnpB}, "ln_post");
  pr.has_lnb = pr.p[kLnbW].defined();
  pr.has_bn = pr.p[kBn1W].defined();
  pr.has_lnp = pr.p[kLnpW].defined();
  pr.has_gate = pr.p[kGate].defined();
  pr.batch_stats = training && pr.has_bn;
  pr.hy = Hyper{hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5], hyper[6]};
  return pr;
}

void check_backward_args(const Prepared& pr, const Tensor& x, const Tensor& grad_residual,
                         const Tensor& grad_spatial_map, const Tensor& grad_temporal_gate, at::IntArrayRef wanted) {
  const char* who = pr.who;
  const int64_t F = pr.F, N = pr.N;
  TORCH_CHECK(static_cast<int64_t>(wanted.size()) == 2 + kNumParams, "dgsct_kernels ", who, ": wanted has ",
              wanted.size(), " flags, expected ", 2 + kNumParams, " wanted flags (x, g, then config.OP_PARAM_NAMES)");
  TORCH_CHECK(grad_residual.sizes() == x.sizes(), "dgsct_kernels ", who, ": grad_residual has shape ",
              grad_residual.sizes(), ", expected x's shape ", x.sizes());
  TORCH_CHECK(grad_spatial_map.numel() == F * N, "dgsct_kernels ", who, ": grad_spatial_map has shape ",
              grad_spatial_map.sizes(), ", expected [F, N] = [", F, ", ", N, "] (the wrong number of elements)");
  TORCH_CHECK(grad_temporal_gate.numel() == F, "dgsct_kernels ", who, ": grad_temporal_gate has shape ",
              grad_temporal_gate.sizes(), ", expected [F] = [", F, "] (the wrong number of elements)");
  for (const Tensor* t : {&grad_residual, &grad_spatial_map, &grad_temporal_gate})
    TORCH_CHECK(t->device() == x.device(), "dgsct_kernels ", who, ": a gradient is on ", t->device(),
                ", expected x's device ", x.device());
}

std::vector<Tensor> forward_outputs(const Prepared& pr, const Tensor& x, const Tensor& o, const Tensor& spmap,
                                    const Tensor& tg, const Tensor& mean1, const Tensor& var1, const Tensor& mean2,
                                    const Tensor& var2) {
  Tensor empty = at::empty({0}, x.options());
  std::vector<Tensor> out{o, spmap.to(x.scalar_type()), tg.to(x.scalar_type())};
  if (pr.batch_stats) {
    out.insert(out.end(), {mean1, var1, mean2, var2});
  } else {
    out.insert(out.end(), {empty, empty.clone(), empty.clone(), empty.clone()});
  }
  return out;
}

std::vector<Tensor> backward_outputs(const Prepared& pr, const Tensor& x, at::IntArrayRef wanted, const Tensor& dx,
                                     const Tensor& dg, const std::vector<Tensor>& grads) {
  const bool want_x = wanted[0] != 0, want_g = wanted[1] != 0;
  std::vector<Tensor> out;
  out.reserve(2 + kNumParams);
  Tensor empty = at::empty({0}, x.options());
  out.push_back(want_x ? dx.to(x.scalar_type()).contiguous() : empty);
  out.push_back(want_g && dg.defined() ? dg.to(x.scalar_type()).contiguous() : empty.clone());
  for (int i = 0; i < kNumParams; ++i) {
    if (wanted[2 + i] == 0 || !pr.p[i].defined()) {
      out.push_back(empty.clone());
      continue;
    }
    TORCH_CHECK(grads[i].defined(), "dgsct_kernels ", pr.who, ": internal error, no gradient for ", kParamNames[i],
                " (parameter slot ", i, ")");
    out.push_back(grads[i].reshape(pr.p[i].sizes()).to(x.scalar_type()).contiguous());
  }
  return out;
}

}  // namespace dgsct::core
