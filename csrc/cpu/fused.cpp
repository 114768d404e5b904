// The cpu backend's forward and backward: the order of the token passes (passes.h) and the
// frame-level ATen work between them (guide path, per-frame vectors, channel attention,
// BatchNorm statistics, the gradients' final sums), and the kept state.
#include "cpu/fused.h"

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "core/norms.h"
#include "cpu/passes.h"

namespace dgsct::cpu {

using core::BnAffine;
using core::BnLayer;
using core::Prepared;

namespace {

// Transient [F, N, *] buffers come from a per-thread cache that keeps each slot's largest
// allocation: fresh multi-megabyte allocations are mmap'ed by malloc and page-faulted on
// every call (15% of the backward's token passes at s2-visual). The cache holds at most
// DGSCT_CPU_WORKSPACE_MB (default 512) per thread; 0 turns it off. It never backs an output.
enum Slot : int { kSlotS, kSlotZ, kSlotX1, kSlotP, kSlotM1, kSlotV2, kSlotDub, kSlotDzb, kSlotDx1, kSlotDv1, kNumSlots };

Tensor workspace(Slot slot, at::IntArrayRef size, at::ScalarType dtype) {
  static const int64_t limit = [] {
    const char* v = std::getenv("DGSCT_CPU_WORKSPACE_MB");
    return (v ? std::atoll(v) : 512) << 20;
  }();
  thread_local std::vector<Tensor> cache(kNumSlots);
  int64_t numel = 1;
  for (int64_t d : size) numel *= d;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  Tensor& held = cache[slot];
  if (held.defined() && held.nbytes() >= static_cast<size_t>(bytes))
    return held.narrow(0, 0, bytes).view(dtype).view(size);
  held = Tensor();
  int64_t total = bytes;
  for (const Tensor& t : cache) total += t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
  if (total > limit) return at::empty(size, at::TensorOptions().dtype(dtype));
  held = at::empty({std::max<int64_t>(bytes, 64)}, at::kByte);
  return held.narrow(0, 0, bytes).view(dtype).view(size);
}

// Per-frame vectors from the pooled guide a [F, C].
struct FrameVectors {
  Tensor qa1_pre, qa1, qa2_pre, qa2, tg;  // [F, C], [F, C], [F, Ch], [F, Ch], [F]
  Tensor joint, hid_pre, hid, ch;         // after the channel pass
};

FrameVectors frame_vectors(const std::vector<Tensor>& p, const Tensor& a) {
  FrameVectors v;
  v.qa1_pre = at::addmm(p[kBa1], a, p[kWa1].t());
  v.qa1 = at::relu(v.qa1_pre);
  v.qa2_pre = at::addmm(p[kBa2], a, p[kWa2].t());
  v.qa2 = at::relu(v.qa2_pre);
  v.tg = at::sigmoid(at::addmm(p[kBt], a, p[kWt].t())).view({-1}).contiguous();
  return v;
}

void channel_mlp(const std::vector<Tensor>& p, FrameVectors& v, const Tensor& colsum, int64_t N) {
  v.joint = v.qa1 * colsum / static_cast<double>(N);
  v.hid_pre = at::addmm(p[kBb], v.joint, p[kWb].t());
  v.hid = at::relu(v.hid_pre);
  v.ch = at::sigmoid(at::addmm(p[kBc], v.hid, p[kWc].t())).contiguous();
}

template <typename scalar_t, typename acc_t>
Net<scalar_t, acc_t> make_net(const Tensor& x, const Prepared& pr, const Tensor& R, const FrameVectors& fv) {
  const auto& p = pr.p;
  Net<scalar_t, acc_t> n{};
  n.F = pr.F;
  n.N = pr.N;
  n.C = pr.C;
  n.K = pr.K;
  n.H = pr.H;
  n.G = pr.G;
  n.Cg = n.C / n.G;
  n.Hg = n.H / n.G;
  n.Cog = n.C / n.G;
  n.Ch = pr.Ch;
  // tiles of ~48K floats per [rows, C] buffer (64 to 256 tokens): large enough for
  // efficient BLAS calls, small enough that a chunk's working set stays in L2
  n.BN = std::max<int64_t>(64, std::min<int64_t>(256, 49152 / std::max<int64_t>(n.C, 1)));
  if (const char* tile = std::getenv("DGSCT_CPU_TILE")) n.BN = std::max<int64_t>(1, std::atoll(tile));
  n.BN = std::min(n.BN, n.N);
  n.ntiles = (n.N + n.BN - 1) / n.BN;
  n.items = n.F * n.ntiles;
  n.nchunks = std::max<int64_t>(1, std::min<int64_t>(n.items, 4 * at::get_num_threads()));
  n.x = x.data_ptr<scalar_t>();
  n.R = R.data_ptr<acc_t>();
  n.gav = p[kGateAv].item<acc_t>();
  n.W1 = p[kWv1].data_ptr<acc_t>();
  n.b1 = p[kBv1].data_ptr<acc_t>();
  n.W2 = p[kWv2].data_ptr<acc_t>();
  if (operand_dtype(kChannel, x.scalar_type(), pr.acc) != pr.acc) {
    n.W1low_owner = p[kWv1].to(x.scalar_type()).contiguous();
    n.W1low = n.W1low_owner.template data_ptr<scalar_t>();
  }
  n.b2 = p[kBv2].data_ptr<acc_t>();
  n.ws = p[kWs].data_ptr<acc_t>();
  n.bs = p[kBs].item<acc_t>();
  n.Wd = p[kWd].data_ptr<acc_t>();
  n.Wu = p[kWu].data_ptr<acc_t>();
  n.lnbw = pr.has_lnb ? p[kLnbW].data_ptr<acc_t>() : nullptr;
  n.lnbb = pr.has_lnb ? p[kLnbB].data_ptr<acc_t>() : nullptr;
  n.lnpw = pr.has_lnp ? p[kLnpW].data_ptr<acc_t>() : nullptr;
  n.lnpb = pr.has_lnp ? p[kLnpB].data_ptr<acc_t>() : nullptr;
  n.has_gate = pr.has_gate;
  n.gate = pr.has_gate ? p[kGate].item<acc_t>() : acc_t(1);
  n.has_bn = pr.has_bn;
  n.batch_stats = pr.batch_stats;
  n.alpha = static_cast<acc_t>(pr.hy.alpha);
  n.beta = static_cast<acc_t>(pr.hy.beta);
  n.gamma = static_cast<acc_t>(pr.hy.gamma);
  n.eps_b = static_cast<acc_t>(pr.hy.ln_before_eps);
  n.eps_p = static_cast<acc_t>(pr.hy.ln_post_eps);
  n.qa1 = fv.qa1.data_ptr<acc_t>();
  n.qa2 = fv.qa2.data_ptr<acc_t>();
  n.tg = fv.tg.data_ptr<acc_t>();
  return n;
}

template <typename scalar_t, typename acc_t>
void set_affines(Net<scalar_t, acc_t>& n, const BnAffine& a1, const BnAffine& a2) {
  n.sc1 = a1.sc.data_ptr<acc_t>();
  n.sh1 = a1.sh.data_ptr<acc_t>();
  n.mu1 = a1.mu.data_ptr<acc_t>();
  n.rs1 = a1.rs.data_ptr<acc_t>();
  n.sc2 = a2.sc.data_ptr<acc_t>();
  n.sh2 = a2.sh.data_ptr<acc_t>();
  n.mu2 = a2.mu.data_ptr<acc_t>();
  n.rs2 = a2.rs.data_ptr<acc_t>();
}

// Everything up to z: guide path, frame vectors, channel pass, bottleneck pass, bn1 stats.
template <typename scalar_t, typename acc_t>
struct FrontState {
  GuideState guide;
  FrameVectors fv;
  Tensor colsum, s, z, spmap;
  Tensor X1, Pst, M1, V2;  // backward only
  Tensor M1bits;           // qv1 > 0 as bits: written when keeping state, read from it
  Tensor mean1, var1, mean2, var2;
  BnAffine a1, a2;
  Net<scalar_t, acc_t> net;
};

// Contiguous with the default strides, as the op's fake implementation makes its outputs.
Tensor dense(const Tensor& t) {
  int64_t stride = 1;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    if (t.stride(d) != stride) return t.clone(at::MemoryFormat::Contiguous);
    stride *= t.size(d);
  }
  return t;
}

template <typename scalar_t, typename acc_t>
FrontState<scalar_t, acc_t> run_front(const Tensor& x, const Tensor& g, const Prepared& pr,
                                      const std::string& order, bool for_backward = false,
                                      const std::vector<Tensor>& kept = {}, bool keep_state = false) {
  FrontState<scalar_t, acc_t> st;
  PhaseTimer timer;
  const auto& p = pr.p;
  const bool restored = !kept.empty();
  const Tensor gacc = g.to(pr.acc).contiguous();
  if (restored) {
    auto c = [&](int i) { return kept[i].contiguous(); };
    st.guide = guide_restore(gacc, p, order, c(kKeptR), c(kKeptPooled),
                             at::ArrayRef<Tensor>(kept).slice(kNumKeptCommon));
    st.fv = FrameVectors{c(kKeptQa1Pre), c(kKeptQa1), c(kKeptQa2Pre), c(kKeptQa2), c(kKeptTg),
                         c(kKeptJoint),  c(kKeptHidPre), c(kKeptHid), c(kKeptCh)};
    st.colsum = c(kKeptColsum);
    timer("restore");
  } else {
    st.guide = guide_forward(gacc, p, order);
    timer("guide");
    st.fv = frame_vectors(p, st.guide.a);
  }
  auto& n = st.net;
  n = make_net<scalar_t, acc_t>(x, pr, st.guide.R, st.fv);
  if (for_backward) {  // transient buffers, freed when the backward returns
    st.X1 = workspace(kSlotX1, {n.F, n.N, n.C}, pr.acc);
    st.Pst = workspace(kSlotP, {n.F, n.N, n.K}, pr.acc);
    st.M1 = workspace(kSlotM1, {n.F, n.N, n.C}, at::kByte);
    st.V2 = workspace(kSlotV2, {n.F, n.N, n.Ch}, pr.acc);
    n.X1 = st.X1.template data_ptr<acc_t>();
    n.Pst = st.Pst.template data_ptr<acc_t>();
    n.M1 = st.M1.template data_ptr<uint8_t>();
    n.V2 = st.V2.template data_ptr<acc_t>();
  }
  n.CB = (n.C + 7) / 8;
  if (restored) {  // the kept mask bits stand in for the channel pass: bottleneck refills x1
    n.ch = st.fv.ch.template data_ptr<acc_t>();
    st.M1bits = kept[kKeptMask1].contiguous();
    n.M1bits = st.M1bits.template data_ptr<uint8_t>();
    n.refill_x1 = true;
  } else {
    if (keep_state) {
      st.M1bits = at::empty({n.F, n.N, n.CB}, at::TensorOptions().dtype(at::kByte));
      n.M1bits = st.M1bits.template data_ptr<uint8_t>();
    }
    st.colsum = channel_pass(n);
    timer("channel");
    channel_mlp(p, st.fv, st.colsum, n.N);
    n.ch = st.fv.ch.template data_ptr<acc_t>();
  }
  st.s = workspace(kSlotS, {n.F, n.N}, pr.acc);
  st.z = workspace(kSlotZ, {n.F, n.N, n.H}, pr.acc);
  Tensor zsums = n.batch_stats && !restored ? at::zeros({n.items, 2 * n.H}, at::kDouble) : Tensor();
  bottleneck_pass(n, st.s, st.z, zsums);
  timer("bottleneck");
  st.spmap = at::softmax(at::tanh(st.s), -1);
  const int64_t count = n.F * n.N;
  if (n.batch_stats && restored) {
    st.mean1 = kept[kKeptMean1];
    st.var1 = kept[kKeptVar1];
    st.mean2 = kept[kKeptMean2];
    st.var2 = kept[kKeptVar2];
    st.a1 = core::bn_layer_affine(pr, BnLayer::kBn1, st.mean1, st.var1);
    st.a2 = core::bn_layer_affine(pr, BnLayer::kBn2, st.mean2, st.var2);
  } else if (n.batch_stats) {
    std::tie(st.mean1, st.var1) = core::batch_mean_var(zsums, n.H, count, pr.acc);
    st.a1 = core::bn_layer_affine(pr, BnLayer::kBn1, st.mean1, st.var1);
    st.a2 = core::identity_affine(n.C, pr.ao);
    set_affines(n, st.a1, st.a2);
    Tensor usums = moments_pass(n, st.z);
    std::tie(st.mean2, st.var2) = core::batch_mean_var(usums, n.C, count, pr.acc);
    st.a2 = core::bn_layer_affine(pr, BnLayer::kBn2, st.mean2, st.var2);
    timer("moments");
  } else {  // running statistics, or the identity without BatchNorm
    st.a1 = core::bn_layer_affine(pr, BnLayer::kBn1);
    st.a2 = core::bn_layer_affine(pr, BnLayer::kBn2);
  }
  set_affines(n, st.a1, st.a2);
  return st;
}

// The kept state (enum Kept): fresh tensors that alias no output of the op.
template <typename scalar_t, typename acc_t>
std::vector<Tensor> kept_state(const FrontState<scalar_t, acc_t>& st, at::ScalarType acc) {
  const auto& fv = st.fv;
  std::vector<Tensor> kept{st.guide.R, st.guide.a, fv.qa1_pre, fv.qa1, fv.qa2_pre, fv.qa2, fv.tg.clone(),
                           st.colsum, fv.joint, fv.hid_pre, fv.hid, fv.ch};
  for (const Tensor& t : {st.mean1, st.var1, st.mean2, st.var2})
    kept.push_back(st.net.batch_stats ? t.clone() : at::empty({0}, at::TensorOptions().dtype(acc)));
  kept.push_back(st.M1bits);
  for (const Tensor& t : guide_kept(st.guide, st.net.C)) kept.push_back(t);
  for (Tensor& t : kept) t = dense(t);
  return kept;
}

template <typename scalar_t, typename acc_t>
std::vector<Tensor> forward_impl(const Tensor& x, const Tensor& g, const Prepared& pr, const std::string& order,
                                 std::vector<Tensor>* kept) {
  auto st = run_front<scalar_t, acc_t>(x, g, pr, order, false, {}, kept != nullptr);
  PhaseTimer timer;
  Tensor o = at::empty(x.sizes(), x.options());
  output_pass(st.net, st.z, o);
  timer("output");
  if (kept) *kept = kept_state(st, pr.acc);
  return core::forward_outputs(pr, x, o, st.spmap, st.fv.tg, st.mean1, st.var1, st.mean2, st.var2);
}

template <typename scalar_t, typename acc_t>
std::vector<Tensor> backward_impl(const Tensor& dO_in, const Tensor& dsp_in, const Tensor& dtg_in, const Tensor& x,
                                  const Tensor& g, const Prepared& pr, const std::string& order,
                                  at::IntArrayRef wanted, const std::vector<Tensor>& kept) {
  const auto& p = pr.p;
  auto want = [&](int param) { return wanted[2 + param] != 0; };
  const bool want_x = wanted[0] != 0, want_g = wanted[1] != 0;
  auto st = run_front<scalar_t, acc_t>(x, g, pr, order, true, kept);
  PhaseTimer timer;
  auto& n = st.net;
  const int64_t F = n.F, N = n.N, C = n.C, H = n.H, K = n.K, Ch = n.Ch, items = n.items, nch = n.nchunks;
  const double count = static_cast<double>(F * N);
  auto ao = at::TensorOptions().dtype(pr.acc);
  auto per = [&](int64_t len) { return at::zeros({items, len}, ao); };

  Tensor dO = dO_in.to(x.scalar_type()).contiguous();
  Tensor dsp = dsp_in.to(pr.acc).contiguous();
  Tensor dotf = (st.spmap * dsp).sum(1).contiguous();
  timer("grads in");

  // tail: dO -> dzb
  TailAccums ta;
  ta.dgate = per(1);
  ta.dlnpw = per(C);
  ta.dlnpb = per(C);
  ta.dub = per(C);
  ta.dubu = per(C);
  ta.dzb = per(H);
  ta.dzbz = per(H);
  Tensor dzb = workspace(kSlotDzb, {F, N, H}, pr.acc);
  Tensor dWu_part = want(kWu) ? at::zeros({nch, C, n.Hg}, ao) : Tensor();
  Tensor Sdub, Sdubu;
  const scalar_t* dOp = dO.data_ptr<scalar_t>();
  if (n.batch_stats) {
    Tensor DUB = workspace(kSlotDub, {F, N, C}, pr.acc);
    acc_t* dubp = DUB.data_ptr<acc_t>();
    tail_pass(n, st.z, dOp, true, true, (const acc_t*)nullptr, (const acc_t*)nullptr, ta, dzb, dWu_part, dubp);
    timer("tail sums");
    Sdub = ta.dub.sum(0).contiguous();
    Sdubu = ta.dubu.sum(0).contiguous();
    tail_pass(n, st.z, dOp, false, false, Sdub.data_ptr<acc_t>(), Sdubu.data_ptr<acc_t>(), ta, dzb, dWu_part,
              dubp);
  } else {
    tail_pass(n, st.z, dOp, true, false, (const acc_t*)nullptr, (const acc_t*)nullptr, ta, dzb, dWu_part);
    Sdub = ta.dub.sum(0);
    Sdubu = ta.dubu.sum(0);
  }
  timer("tail");
  // bn1 backward as dz = k1 dzb + k2 z_hat + k3
  Tensor Sdzb = ta.dzb.sum(0), Sdzbz = ta.dzbz.sum(0);
  Tensor k1, k2, k3;
  if (n.batch_stats) {
    k1 = st.a1.sc.clone();
    k2 = (-st.a1.sc * Sdzbz / count).contiguous();
    k3 = (-st.a1.sc * Sdzb / count).contiguous();
  } else {
    k1 = st.a1.sc.clone();
    k2 = at::zeros({H}, ao);
    k3 = at::zeros({H}, ao);
  }
  // front sweep 1
  FrontAccums fa;
  fa.dchA = per(C);
  fa.dchB = per(C);
  fa.dtgA = per(1);
  fa.dqa2 = per(Ch);
  fa.dws = per(Ch);
  fa.dbs = per(1);
  fa.db2 = per(Ch);
  fa.dlnbw = per(C);
  fa.dlnbb = per(C);
  if (want(kWd)) fa.dWd = at::zeros({nch, H, n.Cg}, ao);
  Tensor dx1 = workspace(kSlotDx1, {F, N, C}, pr.acc);
  front1_pass(n, st.s, st.spmap, dsp, dotf, st.z, dzb, k1.data_ptr<acc_t>(), k2.data_ptr<acc_t>(),
              k3.data_ptr<acc_t>(), fa, dx1);
  timer("front1");
  auto by_frame = [&](const Tensor& t) { return t.view({F, n.ntiles, -1}).sum(1); };
  // channel attention backward per frame
  auto& fv = st.fv;
  Tensor dch = by_frame(fa.dchA) * pr.hy.alpha + by_frame(fa.dchB);        // [F, C]
  Tensor dcpre = dch * fv.ch * (1 - fv.ch);
  Tensor dhid_pre = cpu::matmul(dcpre, p[kWc]) * (fv.hid_pre > 0);
  Tensor djoint = cpu::matmul(dhid_pre, p[kWb]);                                // [F, C]
  Tensor dqa1 = djoint * st.colsum / static_cast<double>(N);
  Tensor gv = (djoint * fv.qa1 / static_cast<double>(N)).contiguous();
  // front sweep 2
  const bool guide_wanted = want_g || want(kWtok) || want(kBtok) || want(kWfc) || want(kBfc) || want(kTokens);
  Tensor dgav = per(1), dRi = at::empty({items, K, C}, ao), db1 = per(C);
  Tensor dx = want_x ? at::empty(x.sizes(), x.options()) : Tensor();
  Tensor DV1 = workspace(kSlotDv1, {F, N, C}, pr.acc);
  n.DV1 = DV1.data_ptr<acc_t>();
  front2_pass(n, gv, dx1, want_x ? dx.data_ptr<scalar_t>() : nullptr, dgav, dRi, db1);
  timer("front2");
  dx1 = Tensor();
  Tensor dR = dRi.view({F, n.ntiles, K, C}).sum(1);
  // per-frame vectors -> da
  const Tensor& a = st.guide.a;
  Tensor dtg = dtg_in.to(pr.acc).reshape({F}) + by_frame(fa.dtgA).view({F}) * pr.hy.gamma;
  Tensor dqa2 = by_frame(fa.dqa2);
  Tensor dqa1_pre = dqa1 * (fv.qa1_pre > 0);
  Tensor dqa2_pre = dqa2 * (fv.qa2_pre > 0);
  Tensor dtg_pre = (dtg * fv.tg * (1 - fv.tg)).unsqueeze(1);  // [F, 1]
  Tensor da = cpu::matmul(dqa1_pre, p[kWa1]) + cpu::matmul(dqa2_pre, p[kWa2]) + dtg_pre * p[kWt];
  GuideGrads gg;
  if (guide_wanted) gg = guide_backward(st.guide, p, dR, da, want_g);
  timer("guide bwd");

  // assemble
  std::vector<Tensor> grads(kNumParams);
  auto chunks = [&](const Tensor& t) { return t.sum(0); };
  grads[kWtok] = gg.Wtok;
  grads[kBtok] = gg.btok;
  grads[kWfc] = gg.Wfc;
  grads[kBfc] = gg.bfc;
  grads[kTokens] = gg.tokens;
  grads[kGateAv] = dgav.sum().view({1});
  grads[kWa1] = cpu::matmul(dqa1_pre.t(), a);
  grads[kBa1] = dqa1_pre.sum(0);
  const at::ScalarType channel_operands = operand_dtype(kChannel, x.scalar_type(), pr.acc);
  if (want(kWv1)) grads[kWv1] = matmul_in(DV1.view({F * N, C}).t(), st.X1.view({F * N, C}), channel_operands);
  grads[kBv1] = db1.sum(0);
  grads[kWb] = cpu::matmul(dhid_pre.t(), fv.joint);
  grads[kBb] = dhid_pre.sum(0);
  grads[kWc] = cpu::matmul(dcpre.t(), fv.hid);
  grads[kBc] = dcpre.sum(0);
  if (want(kWv2))  // sum over frames of (dqv2_f^T x1_f) (1 + ch_f): xc never stored
    grads[kWv2] = (cpu::matmul(st.V2.transpose(1, 2), st.X1) * (fv.ch + 1).unsqueeze(1)).sum(0);
  grads[kBv2] = fa.db2.sum(0);
  grads[kWa2] = cpu::matmul(dqa2_pre.t(), a);
  grads[kBa2] = dqa2_pre.sum(0);
  grads[kWs] = (fa.dws.sum(0) * 1).view({1, Ch});
  grads[kBs] = fa.dbs.sum().view({1});
  grads[kWt] = cpu::matmul(dtg_pre.t(), a);
  grads[kBt] = dtg_pre.sum(0);
  if (pr.has_lnb) {
    grads[kLnbW] = fa.dlnbw.sum(0);
    grads[kLnbB] = fa.dlnbb.sum(0);
  }
  if (fa.dWd.defined()) grads[kWd] = chunks(fa.dWd);
  core::bn_param_grads(pr, st.a1, st.a2, Sdzb, Sdzbz, Sdub, Sdubu, grads);
  if (dWu_part.defined()) grads[kWu] = chunks(dWu_part);
  if (pr.has_lnp) {
    grads[kLnpW] = ta.dlnpw.sum(0);
    grads[kLnpB] = ta.dlnpb.sum(0);
  }
  if (pr.has_gate) grads[kGate] = ta.dgate.sum().view({1});

  return core::backward_outputs(pr, x, wanted, dx, gg.g, grads);
}

}  // namespace

std::vector<std::vector<int64_t>> kept_shapes(const Prepared& pr, const std::string& order) {
  const int64_t F = pr.F, N = pr.N, C = pr.C, M = pr.M, D = pr.D, K = pr.K, Ch = pr.Ch, H = pr.H;
  const int64_t Cb = pr.p[kWb].size(0);
  std::vector<std::vector<int64_t>> shapes{{F, K, C}, {F, C},  {F, C}, {F, C},  {F, Ch}, {F, Ch},
                                           {F},       {F, C},  {F, C}, {F, Cb}, {F, Cb}, {F, C}};
  for (int64_t n : {H, H, C, C}) shapes.push_back({pr.batch_stats ? n : 0});
  shapes.push_back({F, N, (C + 7) / 8});  // kKeptMask1
  for (auto& s : guide_kept_shapes(order, F, N, M, D, K, C)) shapes.push_back(s);
  return shapes;
}

std::vector<Tensor> run_forward(const Tensor& x, const Tensor& g, const Prepared& pr, const std::string& order,
                            std::vector<Tensor>* kept) {
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dgsct_cpu_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = forward_impl<scalar_t, acc_t>(x, g, pr, order, kept);
  });
  return out;
}

std::vector<Tensor> run_backward(const Tensor& grad_residual, const Tensor& grad_spatial_map,
                             const Tensor& grad_temporal_gate, const Tensor& x, const Tensor& g, const Prepared& pr,
                             const std::string& order, at::IntArrayRef wanted, const std::vector<Tensor>& kept) {
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dgsct_cpu_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = backward_impl<scalar_t, acc_t>(grad_residual, grad_spatial_map.reshape({x.size(0), x.size(1)}),
                                         grad_temporal_gate, x, g, pr, order, wanted, kept);
  });
  return out;
}

}  // namespace dgsct::cpu
