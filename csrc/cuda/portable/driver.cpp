// The CUDA backend's op logic (see driver.h): checks, frame-level ATen work between the
// tile passes, and the analytic backward. Device-independent: ATen runs it on CUDA
// tensors for the `cuda` backend and on CPU tensors for the host check.
#include "cuda/portable/driver.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "cpu/dgsct_cpu.h"  // the ATen guide path (shared with the cpu backend)
#include "param_slots.h"     // Param slots and kParamNames (from dgsct_kernels/param_slots.def)

namespace dgsct::cuda {

using at::Tensor;
using dgsct::cpu::Param;
namespace P = dgsct::cpu;

namespace {

struct Prepared {
  std::vector<Tensor> p;  // float32, contiguous, on x's device; undefined where absent
  double alpha, beta, gamma, eps_lnb, eps_bn1, eps_bn2, eps_lnp;
  int64_t F, N, C, M, D, K, H, G, Ch;
  bool has_lnb, has_bn, has_lnp, has_gate;
};

bool is_running(int i) {
  return i == P::kBn1Rm || i == P::kBn1Rv || i == P::kBn2Rm || i == P::kBn2Rv;
}

Prepared prepare(const char* who, const Tensor& x, const Tensor& g, const c10::List<std::optional<Tensor>>& params,
                 at::ArrayRef<double> hyper, bool training) {
  TORCH_CHECK(x.defined() && x.dim() == 3, "dgsct_kernels ", who, ": x must be [F, N, C], got shape ",
              x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK(g.defined() && g.dim() == 3, "dgsct_kernels ", who, ": g must be [F, M, D], got shape ",
              g.defined() ? g.sizes() : at::IntArrayRef{});
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "dgsct_kernels ", who,
              ": x has dtype ", dt, "; expected float32, bfloat16 or float16");
  TORCH_CHECK(g.scalar_type() == dt, "dgsct_kernels ", who, ": g has dtype ", g.scalar_type(),
              ", expected x's dtype ", dt);
  TORCH_CHECK(g.device() == x.device(), "dgsct_kernels ", who, ": g is on ", g.device(), ", expected x's device ",
              x.device());
  TORCH_CHECK(g.size(0) == x.size(0), "dgsct_kernels ", who, ": x has F=", x.size(0), " frames (shape ", x.sizes(),
              ") but g has F=", g.size(0), " (shape ", g.sizes(), ")");
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 1 && g.size(1) > 0 && g.size(2) > 0,
              "dgsct_kernels ", who, ": empty or degenerate inputs: x ", x.sizes(), ", g ", g.sizes());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == P::kNumParams, "dgsct_kernels ", who, ": params has ",
              params.size(), " slots, expected ", static_cast<int>(P::kNumParams), " (config.OP_PARAM_NAMES)");
  TORCH_CHECK(hyper.size() == 7, "dgsct_kernels ", who, ": hyper has ", hyper.size(),
              " values, expected 7 (config.Hyper: alpha, beta, gamma, ln_before_eps, bn1_eps, bn2_eps, ln_post_eps)");
  Prepared pr;
  pr.p.resize(P::kNumParams);
  for (int i = 0; i < P::kNumParams; ++i) {
    std::optional<Tensor> t = params.get(i);
    if (!t.has_value() || !t->defined()) continue;
    TORCH_CHECK(t->device() == x.device(), "dgsct_kernels ", who, ": params[", kParamNames[i], "] is on ", t->device(),
                ", expected x's device ", x.device());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "dgsct_kernels ", who, ": params[", kParamNames[i],
                "] has dtype ", t->scalar_type(), ", expected a floating dtype");
    pr.p[i] = t->to(at::kFloat).contiguous();
  }
  for (int i : {int(P::kWtok), int(P::kBtok), int(P::kWfc), int(P::kBfc), int(P::kTokens), int(P::kGateAv),
                int(P::kWa1), int(P::kBa1), int(P::kWv1), int(P::kBv1), int(P::kWb), int(P::kBb), int(P::kWc),
                int(P::kBc), int(P::kWv2), int(P::kBv2), int(P::kWa2), int(P::kBa2), int(P::kWs), int(P::kBs),
                int(P::kWt), int(P::kBt), int(P::kWd), int(P::kWu)})
    TORCH_CHECK(pr.p[i].defined(), "dgsct_kernels ", who, ": required parameter ", kParamNames[i], " is missing");
  pr.F = x.size(0);
  pr.N = x.size(1);
  pr.C = x.size(2);
  pr.M = g.size(1);
  pr.D = g.size(2);
  TORCH_CHECK(pr.p[P::kTokens].dim() == 2 && pr.p[P::kWd].dim() == 4, "dgsct_kernels ", who,
              ": my_tokens must be [K, C] and down_sampler.weight [H, C/G, 1, 1], got ", pr.p[P::kTokens].sizes(),
              " and ", pr.p[P::kWd].sizes());
  pr.K = pr.p[P::kTokens].size(0);
  pr.H = pr.p[P::kWd].size(0);
  const int64_t Cg = pr.p[P::kWd].size(1);
  TORCH_CHECK(Cg > 0 && pr.C % Cg == 0, "dgsct_kernels ", who, ": down_sampler.weight has shape ",
              pr.p[P::kWd].sizes(), "; its second size C/G must divide C=", pr.C);
  pr.G = pr.C / Cg;
  TORCH_CHECK(pr.H > 0 && pr.H % pr.G == 0, "dgsct_kernels ", who, ": down_sampler.weight has shape ",
              pr.p[P::kWd].sizes(), "; H=", pr.H, " must be a positive multiple of G=", pr.G);
  pr.Ch = pr.C / 2;
  const int64_t N = pr.N, C = pr.C, M = pr.M, D = pr.D, K = pr.K, H = pr.H, G = pr.G, Ch = pr.Ch;
  const std::array<std::vector<int64_t>, P::kNumParams> shapes = {{
      {N, M, 1, 1}, {N}, {C, D}, {C}, {K, C}, {1}, {C, C}, {C}, {C, C}, {C}, {Ch, C}, {Ch}, {C, Ch}, {C},
      {Ch, C}, {Ch}, {Ch, C}, {Ch}, {1, Ch}, {1}, {1, C}, {1}, {C}, {C}, {H, C / G, 1, 1}, {H}, {H}, {H}, {H},
      {C, H / G, 1, 1}, {C}, {C}, {C}, {C}, {C}, {C}, {1}}};
  for (int i = 0; i < P::kNumParams; ++i) {
    const Tensor& t = pr.p[i];
    if (!t.defined()) continue;
    if (training && is_running(i) && t.numel() == 0) continue;  // not read in training (ops.py drops them)
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shapes[i]), "dgsct_kernels ", who, ": params[", kParamNames[i],
                "] has shape ", t.sizes(), ", expected ", at::IntArrayRef(shapes[i]), " for x ", x.sizes(), " and g ",
                g.sizes());
  }
  pr.has_lnb = pr.p[P::kLnbW].defined();
  pr.has_bn = pr.p[P::kBn1W].defined();
  pr.has_lnp = pr.p[P::kLnpW].defined();
  pr.has_gate = pr.p[P::kGate].defined();
  auto group = [&](std::initializer_list<int> ids, const char* layer) {
    int present = 0, total = 0;
    for (int i : ids) {
      present += pr.p[i].defined();
      ++total;
    }
    TORCH_CHECK(present == 0 || present == total, "dgsct_kernels ", who, ": optional layer ", layer,
                " is partly given (", present, " of ", total, " tensors)");
  };
  group({P::kLnbW, P::kLnbB}, "ln_before");
  group({P::kBn1W, P::kBn1B, P::kBn1Rm, P::kBn1Rv, P::kBn2W, P::kBn2B, P::kBn2Rm, P::kBn2Rv}, "bn");
  group({P::kLnpW, P::kLnpB}, "ln_post");
  pr.alpha = hyper[0];
  pr.beta = hyper[1];
  pr.gamma = hyper[2];
  pr.eps_lnb = hyper[3];
  pr.eps_bn1 = hyper[4];
  pr.eps_bn2 = hyper[5];
  pr.eps_lnp = hyper[6];
  return pr;
}

std::pair<Tensor, Tensor> stats_from_sums(const Tensor& sums, int64_t width, int64_t count) {
  Tensor total = sums.sum(0);
  Tensor mean = total.slice(0, 0, width) / static_cast<double>(count);
  Tensor var = (total.slice(0, width, 2 * width) / static_cast<double>(count) - mean * mean).clamp_min(0.0);
  return {mean.to(at::kFloat), var.to(at::kFloat)};
}

// Grouped 1x1 convolution on [T, Cin] rows with weight [Cout, Cin/G, 1, 1].
Tensor grouped(const Tensor& in, const Tensor& w, int64_t G) {
  const int64_t T = in.size(0), cin = in.size(1), cout = w.size(0);
  Tensor wg = w.view({G, cout / G, cin / G});
  return at::bmm(in.view({T, G, cin / G}).transpose(0, 1), wg.transpose(1, 2)).transpose(0, 1).reshape({T, cout});
}

// Gradients of grouped(): d(in) [T, Cin] and d(w) [Cout, Cin/G, 1, 1].
Tensor grouped_input_grad(const Tensor& dout, const Tensor& w, int64_t G) {
  const int64_t T = dout.size(0), cout = w.size(0), cin_g = w.size(1);
  Tensor wg = w.view({G, cout / G, cin_g});
  return at::bmm(dout.view({T, G, cout / G}).transpose(0, 1), wg).transpose(0, 1).reshape({T, G * cin_g});
}

Tensor grouped_weight_grad(const Tensor& dout, const Tensor& in, const Tensor& w, int64_t G) {
  const int64_t T = dout.size(0), cout = w.size(0), cin_g = w.size(1);
  Tensor d = dout.view({T, G, cout / G}).permute({1, 2, 0});  // [G, Cout/G, T]
  Tensor i = in.view({T, G, cin_g}).transpose(0, 1);          // [G, T, Cin/G]
  return at::bmm(d, i).reshape(w.sizes());
}

struct LayerNormState {
  Tensor out, xhat, rstd;
};

LayerNormState layer_norm_rows(const Tensor& v, const Tensor& w, const Tensor& b, double eps) {
  LayerNormState s;
  Tensor mean = v.mean(-1, true);
  Tensor centered = v - mean;
  s.rstd = at::rsqrt(centered.pow(2).mean(-1, true) + eps);
  s.xhat = centered * s.rstd;
  s.out = s.xhat * w + b;
  return s;
}

// LayerNorm backward: dx = rstd (dxh - mean(dxh) - xhat mean(dxh xhat)), dxh = dy w.
Tensor layer_norm_rows_backward(const Tensor& dy, const LayerNormState& s, const Tensor& w, Tensor& dw, Tensor& db) {
  Tensor dxh = dy * w;
  dw = (dy * s.xhat).sum(0);
  db = dy.sum(0);
  return s.rstd * (dxh - dxh.mean(-1, true) - s.xhat * (dxh * s.xhat).mean(-1, true));
}

}  // namespace

int tile_tokens(const TileArgs& a, int64_t budget_floats) {
  const auto need = [&](int bt) {
    return std::max({channel_shared_floats(a, bt), bottleneck_shared_floats(a, bt), moments_shared_floats(a, bt),
                     output_shared_floats(a, bt)});
  };
  TORCH_CHECK(need(1) <= budget_floats, "dgsct_kernels cuda: C=", a.C, " (with K=", a.K, ", H=", a.H,
              ") needs ", need(1) * 4, " bytes of shared memory for a one-token tile, more than the ",
              budget_floats * 4, " bytes a block may use on this device");
  int bt = std::min(64, (a.N + kMmaRows - 1) / kMmaRows * kMmaRows);  // no more rows than N needs
  while (need(bt) > budget_floats) --bt;
  // whole 16-row blocks of the tensor-core products where at least one fits
  return bt >= kMmaRows ? bt - bt % kMmaRows : bt;
}

std::vector<Tensor> forward_design(const Tensor& x_in, const Tensor& g, const c10::List<std::optional<Tensor>>& params,
                                   at::ArrayRef<double> hyper, bool training, const std::string& order,
                                   Runner& runner) {
  Prepared pr = prepare(runner.name(), x_in, g, params, hyper, training);
  const Tensor x = x_in.contiguous();
  const auto& p = pr.p;
  const auto fo = x.options().dtype(at::kFloat);
  const int64_t F = pr.F, N = pr.N, C = pr.C, H = pr.H, G = pr.G, Ch = pr.Ch;
  const bool batch_stats = training && pr.has_bn;

  // guide path (ATen; large products in cuBLAS), per-frame vectors
  P::GuideState guide = P::guide_forward(g.to(at::kFloat).contiguous(), p, order, at::kFloat);
  const Tensor R = guide.R.contiguous();
  const Tensor Rt = R.transpose(1, 2).contiguous();
  const Tensor& a = guide.a;
  const Tensor qa1 = at::relu(at::addmm(p[P::kBa1], a, p[P::kWa1].t()));
  const Tensor w2q = (at::relu(at::addmm(p[P::kBa2], a, p[P::kWa2].t())) * p[P::kWs].view({1, Ch})).contiguous();
  const Tensor tg = at::sigmoid(at::addmm(p[P::kBt], a, p[P::kWt].t())).view({F}).contiguous();
  const Tensor W1t = p[P::kWv1].t().contiguous();
  const Tensor W2t = p[P::kWv2].t().contiguous();
  const Tensor WdT = p[P::kWd].view({G, H / G, C / G}).transpose(1, 2).contiguous();
  const Tensor WuT = p[P::kWu].view({G, C / G, H / G}).transpose(1, 2).contiguous();

  TileArgs t{};
  t.F = static_cast<int>(F);
  t.N = static_cast<int>(N);
  t.C = static_cast<int>(C);
  t.K = static_cast<int>(pr.K);
  t.H = static_cast<int>(H);
  t.G = static_cast<int>(G);
  t.Ch = static_cast<int>(Ch);
  t.Cg = static_cast<int>(C / G);
  t.Hg = static_cast<int>(H / G);
  t.Cog = static_cast<int>(C / G);
  t.BT = tile_tokens(t, runner.shared_budget_floats());
  t.ntiles = static_cast<int>((N + t.BT - 1) / t.BT);
  const int64_t items = F * t.ntiles;
  t.x = x.data_ptr();
  t.R = R.data_ptr<float>();
  t.Rt = Rt.data_ptr<float>();
  t.gav = p[P::kGateAv].data_ptr<float>();
  t.W1t = W1t.data_ptr<float>();
  t.b1 = p[P::kBv1].data_ptr<float>();
  t.W2t = W2t.data_ptr<float>();
  t.b2 = p[P::kBv2].data_ptr<float>();
  t.w2q = w2q.data_ptr<float>();
  t.bs = p[P::kBs].data_ptr<float>();
  t.tg = tg.data_ptr<float>();
  t.alpha = static_cast<float>(pr.alpha);
  t.beta = static_cast<float>(pr.beta);
  t.gamma = static_cast<float>(pr.gamma);
  t.lnbw = pr.has_lnb ? p[P::kLnbW].data_ptr<float>() : nullptr;
  t.lnbb = pr.has_lnb ? p[P::kLnbB].data_ptr<float>() : nullptr;
  t.eps_b = static_cast<float>(pr.eps_lnb);
  t.WdT = WdT.data_ptr<float>();
  t.WuT = WuT.data_ptr<float>();
  t.lnpw = pr.has_lnp ? p[P::kLnpW].data_ptr<float>() : nullptr;
  t.lnpb = pr.has_lnp ? p[P::kLnpB].data_ptr<float>() : nullptr;
  t.eps_p = static_cast<float>(pr.eps_lnp);
  t.gate = pr.has_gate ? p[P::kGate].data_ptr<float>() : nullptr;

  // pass 1, then the channel attention per frame
  Tensor colsum_part = at::empty({items, C}, fo);
  t.colsum_part = colsum_part.data_ptr<float>();
  runner.run(PassKind::kChannel, t, x.scalar_type());
  const Tensor colsum = colsum_part.view({F, t.ntiles, C}).sum(1);
  const Tensor joint = qa1 * colsum / static_cast<double>(N);
  const Tensor hid = at::relu(at::addmm(p[P::kBb], joint, p[P::kWb].t()));
  const Tensor ch = at::sigmoid(at::addmm(p[P::kBc], hid, p[P::kWc].t())).contiguous();
  t.ch = ch.data_ptr<float>();

  // pass 2
  Tensor s = at::empty({F, N}, fo);
  Tensor z = at::empty({F, N, H}, fo);
  Tensor zsums = batch_stats ? at::empty({items, 2 * H}, fo.dtype(at::kDouble)) : Tensor();
  t.s = s.data_ptr<float>();
  t.z = z.data_ptr<float>();
  t.zsums = batch_stats ? zsums.data_ptr<double>() : nullptr;
  runner.run(PassKind::kBottleneck, t, x.scalar_type());
  const Tensor spmap = at::softmax(at::tanh(s), -1);

  // BatchNorm as affine maps; pass 3 for bn2's batch statistics
  const int64_t count = F * N;
  Tensor mean1, var1, mean2, var2;
  P::BnAffine a1, a2;
  if (batch_stats) {
    std::tie(mean1, var1) = stats_from_sums(zsums, H, count);
    a1 = P::bn_affine(p[P::kBn1W], p[P::kBn1B], mean1, var1, pr.eps_bn1);
    t.sc1 = a1.sc.data_ptr<float>();
    t.sh1 = a1.sh.data_ptr<float>();
    Tensor usums = at::empty({items, 2 * C}, fo.dtype(at::kDouble));
    t.usums = usums.data_ptr<double>();
    runner.run(PassKind::kMoments, t, x.scalar_type());
    std::tie(mean2, var2) = stats_from_sums(usums, C, count);
    a2 = P::bn_affine(p[P::kBn2W], p[P::kBn2B], mean2, var2, pr.eps_bn2);
  } else if (pr.has_bn) {
    a1 = P::bn_affine(p[P::kBn1W], p[P::kBn1B], p[P::kBn1Rm], p[P::kBn1Rv], pr.eps_bn1);
    a2 = P::bn_affine(p[P::kBn2W], p[P::kBn2B], p[P::kBn2Rm], p[P::kBn2Rv], pr.eps_bn2);
  } else {
    a1 = P::identity_affine(H, fo);
    a2 = P::identity_affine(C, fo);
  }
  t.sc1 = a1.sc.data_ptr<float>();
  t.sh1 = a1.sh.data_ptr<float>();
  t.sc2 = a2.sc.data_ptr<float>();
  t.sh2 = a2.sh.data_ptr<float>();

  // pass 4
  Tensor o = at::empty(x.sizes(), x.options());
  t.o = o.data_ptr();
  runner.run(PassKind::kOutput, t, x.scalar_type());

  Tensor empty = at::empty({0}, x.options());
  std::vector<Tensor> out{o, spmap.to(x.scalar_type()), tg.to(x.scalar_type())};
  if (batch_stats) {
    out.insert(out.end(), {mean1, var1, mean2, var2});
  } else {
    out.insert(out.end(), {empty, empty.clone(), empty.clone(), empty.clone()});
  }
  return out;
}

std::vector<Tensor> backward_design(const Tensor& grad_residual, const Tensor& grad_spatial_map,
                                    const Tensor& grad_temporal_gate, const Tensor& x_in, const Tensor& g,
                                    const c10::List<std::optional<Tensor>>& params, at::ArrayRef<double> hyper,
                                    bool training, const std::string& order, at::IntArrayRef wanted_in,
                                    const char* who) {
  Prepared pr = prepare(who, x_in, g, params, hyper, training);
  const auto& p = pr.p;
  const int64_t F = pr.F, N = pr.N, C = pr.C, H = pr.H, G = pr.G, Ch = pr.Ch, T = F * N;
  TORCH_CHECK(static_cast<int64_t>(wanted_in.size()) == 2 + P::kNumParams, "dgsct_kernels ", who, ": wanted has ",
              wanted_in.size(), " flags, expected ", 2 + P::kNumParams, " (x, g, then config.OP_PARAM_NAMES)");
  TORCH_CHECK(grad_residual.sizes() == x_in.sizes(), "dgsct_kernels ", who, ": grad_residual has shape ",
              grad_residual.sizes(), ", expected x's shape ", x_in.sizes());
  TORCH_CHECK(grad_spatial_map.numel() == F * N, "dgsct_kernels ", who, ": grad_spatial_map has shape ",
              grad_spatial_map.sizes(), ", expected [F, N] = [", F, ", ", N, "]");
  TORCH_CHECK(grad_temporal_gate.numel() == F, "dgsct_kernels ", who, ": grad_temporal_gate has shape ",
              grad_temporal_gate.sizes(), ", expected [F] = [", F, "]");
  for (const Tensor* t : {&grad_residual, &grad_spatial_map, &grad_temporal_gate})
    TORCH_CHECK(t->device() == x_in.device(), "dgsct_kernels ", who, ": a gradient is on ", t->device(),
                ", expected x's device ", x_in.device());
  auto want = [&](int i) { return wanted_in[2 + i] != 0; };
  const bool want_x = wanted_in[0] != 0, want_g = wanted_in[1] != 0;
  const bool batch_stats = training && pr.has_bn;
  const double alpha = pr.alpha, beta = pr.beta, gamma = pr.gamma;

  // ---- recompute the forward in float32 (transient [F, N, *] tensors of the backward)
  P::GuideState guide = P::guide_forward(g.to(at::kFloat).contiguous(), p, order, at::kFloat);
  const Tensor& R = guide.R;  // [F, K, C]
  const Tensor& a = guide.a;  // [F, C]
  const Tensor x = x_in.to(at::kFloat);
  const Tensor gav = p[P::kGateAv];
  const Tensor Pm = at::softmax(at::bmm(x, R.transpose(1, 2)), -1);  // [F, N, K]
  const Tensor PR = at::bmm(Pm, R);
  const Tensor x1 = x + gav * PR;
  const Tensor qa1_pre = at::addmm(p[P::kBa1], a, p[P::kWa1].t());
  const Tensor qa1 = at::relu(qa1_pre);
  const Tensor v1_pre = at::matmul(x1, p[P::kWv1].t()) + p[P::kBv1];
  const Tensor colsum = at::relu(v1_pre).sum(1);
  const Tensor joint = qa1 * colsum / static_cast<double>(N);
  const Tensor hid_pre = at::addmm(p[P::kBb], joint, p[P::kWb].t());
  const Tensor hid = at::relu(hid_pre);
  const Tensor ch = at::sigmoid(at::addmm(p[P::kBc], hid, p[P::kWc].t()));  // [F, C]
  const Tensor ch1 = (ch + 1).unsqueeze(1);
  const Tensor xc = x1 * ch1;
  const Tensor v2_pre = at::matmul(xc, p[P::kWv2].t()) + p[P::kBv2];  // [F, N, Ch]
  const Tensor qv2 = at::relu(v2_pre);
  const Tensor qa2_pre = at::addmm(p[P::kBa2], a, p[P::kWa2].t());
  const Tensor qa2 = at::relu(qa2_pre);
  const Tensor ws = p[P::kWs].view({Ch});
  const Tensor s = (qv2 * (qa2 * ws).unsqueeze(1)).sum(-1) + p[P::kBs];  // [F, N]
  const Tensor sig = at::sigmoid(s);
  const Tensor th = at::tanh(s);
  const Tensor spmap = at::softmax(th, -1);
  const Tensor tg = at::sigmoid(at::addmm(p[P::kBt], a, p[P::kWt].t())).view({F});
  const Tensor base = beta * sig + gamma * tg.unsqueeze(1) + (1.0 - alpha);  // [F, N]
  const Tensor scale = alpha * ch.unsqueeze(1) + base.unsqueeze(-1);        // [F, N, C]
  const Tensor xm = (x1 * scale).view({T, C});
  LayerNormState lnb;
  Tensor y = xm;
  if (pr.has_lnb) {
    lnb = layer_norm_rows(xm, p[P::kLnbW], p[P::kLnbB], pr.eps_lnb);
    y = lnb.out;
  }
  const Tensor z = grouped(y, p[P::kWd], G);  // [T, H]
  P::BnAffine a1, a2;
  if (batch_stats) {
    a1 = P::bn_affine(p[P::kBn1W], p[P::kBn1B], z.mean(0), z.var(0, false), pr.eps_bn1);
  } else if (pr.has_bn) {
    a1 = P::bn_affine(p[P::kBn1W], p[P::kBn1B], p[P::kBn1Rm], p[P::kBn1Rv], pr.eps_bn1);
  } else {
    a1 = P::identity_affine(H, z.options());
  }
  const Tensor zb = z * a1.sc + a1.sh;
  const Tensor h = at::relu(zb);
  const Tensor u = grouped(h, p[P::kWu], G);  // [T, C]
  if (batch_stats) {
    a2 = P::bn_affine(p[P::kBn2W], p[P::kBn2B], u.mean(0), u.var(0, false), pr.eps_bn2);
  } else if (pr.has_bn) {
    a2 = P::bn_affine(p[P::kBn2W], p[P::kBn2B], p[P::kBn2Rm], p[P::kBn2Rv], pr.eps_bn2);
  } else {
    a2 = P::identity_affine(C, u.options());
  }
  const Tensor ub = u * a2.sc + a2.sh;
  LayerNormState lnp;
  Tensor q = ub;
  if (pr.has_lnp) {
    lnp = layer_norm_rows(ub, p[P::kLnpW], p[P::kLnpB], pr.eps_lnp);
    q = lnp.out;
  }

  // ---- backward
  std::vector<Tensor> grads(P::kNumParams);
  const Tensor dO = grad_residual.to(at::kFloat).reshape({T, C});
  Tensor dq = dO;
  if (pr.has_gate) {
    grads[P::kGate] = (dO * q).sum().view({1});
    dq = dO * p[P::kGate];
  }
  Tensor dub = dq;
  if (pr.has_lnp) dub = layer_norm_rows_backward(dq, lnp, p[P::kLnpW], grads[P::kLnpW], grads[P::kLnpB]);
  // bn2
  const Tensor uhat = (u - a2.mu) * a2.rs;
  const Tensor Sdub = dub.sum(0), Sdubu = (dub * uhat).sum(0);
  Tensor du;
  if (batch_stats) {
    du = a2.sc * (dub - Sdub / static_cast<double>(T) - uhat * (Sdubu / static_cast<double>(T)));
  } else {
    du = dub * a2.sc;
  }
  if (want(P::kWu)) grads[P::kWu] = grouped_weight_grad(du, h, p[P::kWu], G);
  const Tensor dzb = grouped_input_grad(du, p[P::kWu], G) * (zb > 0);
  // bn1
  const Tensor zhat = (z - a1.mu) * a1.rs;
  const Tensor Sdzb = dzb.sum(0), Sdzbz = (dzb * zhat).sum(0);
  Tensor dz;
  if (batch_stats) {
    dz = a1.sc * (dzb - Sdzb / static_cast<double>(T) - zhat * (Sdzbz / static_cast<double>(T)));
  } else {
    dz = dzb * a1.sc;
  }
  if (pr.has_bn) {
    grads[P::kBn1W] = Sdzbz;
    grads[P::kBn1B] = Sdzb;
    grads[P::kBn2W] = Sdubu;
    grads[P::kBn2B] = Sdub;
    if (batch_stats) {  // the running buffers are not read in training
      for (int i : {int(P::kBn1Rm), int(P::kBn1Rv), int(P::kBn2Rm), int(P::kBn2Rv)}) grads[i] = at::zeros_like(p[i]);
    } else {
      grads[P::kBn1Rm] = -a1.sc * Sdzb;
      grads[P::kBn1Rv] = -0.5 * a1.sc * a1.rs * Sdzbz;
      grads[P::kBn2Rm] = -a2.sc * Sdub;
      grads[P::kBn2Rv] = -0.5 * a2.sc * a2.rs * Sdubu;
    }
  }
  if (want(P::kWd)) grads[P::kWd] = grouped_weight_grad(dz, y, p[P::kWd], G);
  Tensor dxm = grouped_input_grad(dz, p[P::kWd], G);  // d(y)
  if (pr.has_lnb) dxm = layer_norm_rows_backward(dxm, lnb, p[P::kLnbW], grads[P::kLnbW], grads[P::kLnbB]);
  dxm = dxm.view({F, N, C});
  // modulation
  Tensor dx1 = dxm * scale;
  const Tensor dscale = dxm * x1;
  const Tensor dscale_r = dscale.sum(-1);  // [F, N]
  Tensor dch = alpha * dscale.sum(1);      // [F, C]
  // spatial attention: sigmoid(s) in the modulation, softmax(tanh(s)) as the map
  const Tensor dsp = grad_spatial_map.to(at::kFloat).reshape({F, N});
  const Tensor dl = beta * dscale_r * sig * (1 - sig) +
                    (1 - th * th) * spmap * (dsp - (spmap * dsp).sum(-1, true));  // d(s)
  grads[P::kBs] = dl.sum().view({1});
  const Tensor dlq = dl.unsqueeze(-1) * qv2;                                 // [F, N, Ch]
  grads[P::kWs] = (dlq * qa2.unsqueeze(1)).sum({0, 1}).view({1, Ch});
  const Tensor dqa2 = (dlq * ws).sum(1);                                     // [F, Ch]
  const Tensor dv2 = dl.unsqueeze(-1) * (qa2 * ws).unsqueeze(1) * (v2_pre > 0);
  grads[P::kBv2] = dv2.sum({0, 1});
  if (want(P::kWv2)) grads[P::kWv2] = at::mm(dv2.reshape({T, Ch}).t(), xc.reshape({T, C}));
  const Tensor dxc = at::matmul(dv2, p[P::kWv2]);                           // [F, N, C]
  dx1 = dx1 + dxc * ch1;
  dch = dch + (dxc * x1).sum(1);
  // channel attention
  const Tensor dcpre = dch * ch * (1 - ch);
  grads[P::kWc] = at::mm(dcpre.t(), hid);
  grads[P::kBc] = dcpre.sum(0);
  const Tensor dhid_pre = at::mm(dcpre, p[P::kWc]) * (hid_pre > 0);
  grads[P::kWb] = at::mm(dhid_pre.t(), joint);
  grads[P::kBb] = dhid_pre.sum(0);
  const Tensor djoint = at::mm(dhid_pre, p[P::kWb]);
  const Tensor dqa1 = djoint * colsum / static_cast<double>(N);
  const Tensor dv1 = (djoint * qa1 / static_cast<double>(N)).unsqueeze(1) * (v1_pre > 0);  // [F, N, C]
  grads[P::kBv1] = dv1.sum({0, 1});
  if (want(P::kWv1)) grads[P::kWv1] = at::mm(dv1.reshape({T, C}).t(), x1.reshape({T, C}));
  dx1 = dx1 + at::matmul(dv1, p[P::kWv1]);
  // prompt attention: x1 = x + gav softmax(x R^T) R
  grads[P::kGateAv] = (dx1 * PR).sum().view({1});
  const Tensor dPR = gav * dx1;
  const Tensor dPm = at::bmm(dPR, R.transpose(1, 2));                        // [F, N, K]
  const Tensor dL = Pm * (dPm - (Pm * dPm).sum(-1, true));
  Tensor dR = at::bmm(Pm.transpose(1, 2), dPR) + at::bmm(dL.transpose(1, 2), x);  // [F, K, C]
  Tensor dx;
  if (want_x) dx = dx1 + at::bmm(dL, R);
  // per-frame vectors -> d(a)
  const Tensor dtg = grad_temporal_gate.to(at::kFloat).reshape({F}) + gamma * dscale_r.sum(1);
  const Tensor dqa1_pre = dqa1 * (qa1_pre > 0);
  const Tensor dqa2_pre = dqa2 * (qa2_pre > 0);
  const Tensor dtg_pre = (dtg * tg * (1 - tg)).unsqueeze(1);  // [F, 1]
  grads[P::kWa1] = at::mm(dqa1_pre.t(), a);
  grads[P::kBa1] = dqa1_pre.sum(0);
  grads[P::kWa2] = at::mm(dqa2_pre.t(), a);
  grads[P::kBa2] = dqa2_pre.sum(0);
  grads[P::kWt] = at::mm(dtg_pre.t(), a);
  grads[P::kBt] = dtg_pre.sum(0);
  const bool guide_wanted =
      want_g || want(P::kWtok) || want(P::kBtok) || want(P::kWfc) || want(P::kBfc) || want(P::kTokens);
  P::GuideGrads gg;
  if (guide_wanted) {
    const Tensor da = at::mm(dqa1_pre, p[P::kWa1]) + at::mm(dqa2_pre, p[P::kWa2]) + dtg_pre * p[P::kWt];
    gg = P::guide_backward(guide, p, dR, da, want_g);
    grads[P::kWtok] = gg.Wtok;
    grads[P::kBtok] = gg.btok;
    grads[P::kWfc] = gg.Wfc;
    grads[P::kBfc] = gg.bfc;
    grads[P::kTokens] = gg.tokens;
  }

  std::vector<Tensor> out;
  out.reserve(2 + P::kNumParams);
  Tensor empty = at::empty({0}, x_in.options());
  out.push_back(want_x ? dx.to(x_in.scalar_type()).contiguous() : empty);
  out.push_back(want_g && gg.g.defined() ? gg.g.to(x_in.scalar_type()).contiguous() : empty.clone());
  for (int i = 0; i < P::kNumParams; ++i) {
    if (!want(i) || !p[i].defined()) {
      out.push_back(empty.clone());
      continue;
    }
    TORCH_CHECK(grads[i].defined(), "dgsct_kernels ", who, ": internal error, no gradient for ", kParamNames[i]);
    out.push_back(grads[i].reshape(p[i].sizes()).to(x_in.scalar_type()).contiguous());
  }
  return out;
}

}  // namespace dgsct::cuda
