// The CUDA backend's op logic (see driver.h): frame-level ATen work between the tile
// passes, and the analytic backward; argument checks, BatchNorm and LayerNorm are
// csrc/core's. Device-independent: ATen runs it on CUDA tensors for the `cuda` backend and
// on CPU tensors for the host check.
#include "cuda/portable/driver.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>

#include "core/norms.h"     // BatchNorm and LayerNorm (shared with the cpu backend)
#include "core/op_io.h"     // the op's argument checks and results (shared with the cpu backend)
#include "cpu/dgsct_cpu.h"  // the ATen guide path (shared with the cpu backend)
#include "param_slots.h"    // Param slots (from dgsct_kernels/param_slots.def)

namespace dgsct::cuda {

using at::Tensor;
using dgsct::cpu::Param;
namespace P = dgsct::cpu;

namespace {

using core::BnLayer;
using core::Prepared;

// float32, bfloat16 or float16 on any device (ops_cuda.cpp checks for CUDA tensors first)
core::BackendRules rules(const char* who) { return {who, /*cpu_only=*/false, /*allow_float64=*/false}; }

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
  const Prepared pr = core::prepare(rules(runner.name()), x_in, g, params, hyper, training);
  const Tensor x = x_in.contiguous();
  const auto& p = pr.p;
  const auto fo = x.options().dtype(at::kFloat);
  const int64_t F = pr.F, N = pr.N, C = pr.C, H = pr.H, G = pr.G, Ch = pr.Ch;
  const bool batch_stats = pr.batch_stats;

  // guide path (ATen; large products in cuBLAS), per-frame vectors
  P::GuideState guide = P::guide_forward(g.to(at::kFloat).contiguous(), p, order);
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
  t.alpha = static_cast<float>(pr.hy.alpha);
  t.beta = static_cast<float>(pr.hy.beta);
  t.gamma = static_cast<float>(pr.hy.gamma);
  t.lnbw = pr.has_lnb ? p[P::kLnbW].data_ptr<float>() : nullptr;
  t.lnbb = pr.has_lnb ? p[P::kLnbB].data_ptr<float>() : nullptr;
  t.eps_b = static_cast<float>(pr.hy.ln_before_eps);
  t.WdT = WdT.data_ptr<float>();
  t.WuT = WuT.data_ptr<float>();
  t.lnpw = pr.has_lnp ? p[P::kLnpW].data_ptr<float>() : nullptr;
  t.lnpb = pr.has_lnp ? p[P::kLnpB].data_ptr<float>() : nullptr;
  t.eps_p = static_cast<float>(pr.hy.ln_post_eps);
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
  core::BnAffine a1, a2;
  if (batch_stats) {
    std::tie(mean1, var1) = core::batch_mean_var(zsums, H, count, pr.acc);
    a1 = core::bn_layer_affine(pr, BnLayer::kBn1, mean1, var1);
    t.sc1 = a1.sc.data_ptr<float>();
    t.sh1 = a1.sh.data_ptr<float>();
    Tensor usums = at::empty({items, 2 * C}, fo.dtype(at::kDouble));
    t.usums = usums.data_ptr<double>();
    runner.run(PassKind::kMoments, t, x.scalar_type());
    std::tie(mean2, var2) = core::batch_mean_var(usums, C, count, pr.acc);
    a2 = core::bn_layer_affine(pr, BnLayer::kBn2, mean2, var2);
  } else {  // running statistics, or the identity without BatchNorm
    a1 = core::bn_layer_affine(pr, BnLayer::kBn1);
    a2 = core::bn_layer_affine(pr, BnLayer::kBn2);
  }
  t.sc1 = a1.sc.data_ptr<float>();
  t.sh1 = a1.sh.data_ptr<float>();
  t.sc2 = a2.sc.data_ptr<float>();
  t.sh2 = a2.sh.data_ptr<float>();

  // pass 4
  Tensor o = at::empty(x.sizes(), x.options());
  t.o = o.data_ptr();
  runner.run(PassKind::kOutput, t, x.scalar_type());

  return core::forward_outputs(pr, x, o, spmap, tg, mean1, var1, mean2, var2);
}

std::vector<Tensor> backward_design(const Tensor& grad_residual, const Tensor& grad_spatial_map,
                                    const Tensor& grad_temporal_gate, const Tensor& x_in, const Tensor& g,
                                    const c10::List<std::optional<Tensor>>& params, at::ArrayRef<double> hyper,
                                    bool training, const std::string& order, at::IntArrayRef wanted_in,
                                    const char* who) {
  const Prepared pr = core::prepare(rules(who), x_in, g, params, hyper, training);
  const auto& p = pr.p;
  const int64_t F = pr.F, N = pr.N, C = pr.C, G = pr.G, Ch = pr.Ch, T = F * N;
  core::check_backward_args(pr, x_in, grad_residual, grad_spatial_map, grad_temporal_gate, wanted_in);
  auto want = [&](int i) { return wanted_in[2 + i] != 0; };
  const bool want_x = wanted_in[0] != 0, want_g = wanted_in[1] != 0;
  const bool batch_stats = pr.batch_stats;
  const double alpha = pr.hy.alpha, beta = pr.hy.beta, gamma = pr.hy.gamma;

  // ---- recompute the forward in float32 (transient [F, N, *] tensors of the backward)
  P::GuideState guide = P::guide_forward(g.to(at::kFloat).contiguous(), p, order);
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
  core::LayerNormState lnb;
  Tensor y = xm;
  if (pr.has_lnb) {
    lnb = core::layer_norm_rows(xm, p[P::kLnbW], p[P::kLnbB], pr.hy.ln_before_eps);
    y = lnb.out;
  }
  const Tensor z = grouped(y, p[P::kWd], G);  // [T, H]
  const core::BnAffine a1 = batch_stats ? core::bn_layer_affine(pr, BnLayer::kBn1, z.mean(0), z.var(0, false))
                                        : core::bn_layer_affine(pr, BnLayer::kBn1);
  const Tensor zb = z * a1.sc + a1.sh;
  const Tensor h = at::relu(zb);
  const Tensor u = grouped(h, p[P::kWu], G);  // [T, C]
  const core::BnAffine a2 = batch_stats ? core::bn_layer_affine(pr, BnLayer::kBn2, u.mean(0), u.var(0, false))
                                        : core::bn_layer_affine(pr, BnLayer::kBn2);
  const Tensor ub = u * a2.sc + a2.sh;
  core::LayerNormState lnp;
  Tensor q = ub;
  if (pr.has_lnp) {
    lnp = core::layer_norm_rows(ub, p[P::kLnpW], p[P::kLnpB], pr.hy.ln_post_eps);
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
  if (pr.has_lnp) dub = core::layer_norm_rows_backward(dq, lnp, p[P::kLnpW], grads[P::kLnpW], grads[P::kLnpB]);
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
  core::bn_param_grads(pr, a1, a2, Sdzb, Sdzbz, Sdub, Sdubu, grads);
  if (want(P::kWd)) grads[P::kWd] = grouped_weight_grad(dz, y, p[P::kWd], G);
  Tensor dxm = grouped_input_grad(dz, p[P::kWd], G);  // d(y)
  if (pr.has_lnb) dxm = core::layer_norm_rows_backward(dxm, lnb, p[P::kLnbW], grads[P::kLnbW], grads[P::kLnbB]);
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

  return core::backward_outputs(pr, x_in, wanted_in, dx, gg.g, grads);
}

}  // namespace dgsct::cuda
