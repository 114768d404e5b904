// SPEC.md steps 1, 2 and 4 without forming P, forward and analytic backward, in ATen ops
// (large batched products go to BLAS). The two runnable orders of guide_path.py:
//
//   rewritten     Sg = Q g^T, S = Sg Wtok^T + (Q 1_D) btok^T, A = softmax(S),
//                 B = A Wtok, R = T + (B g) Wfc^T + (A btok) (Wfc 1_D)^T + bfc,
//                 a = ((mean_n Wtok) g) Wfc^T + mean(btok) (Wfc 1_D) + bfc
//   tokens-first  U = Wtok g + btok, A = softmax(Q U^T), R = T + (A U) Wfc^T + bfc,
//                 a = mean_n(U) Wfc^T + bfc
//
// with Q = T Wfc (T = my_tokens). Which order runs is chosen in Python
// (guide_path.plan_guide_path), the one place that compares their FLOPs.
#include "cpu/dgsct_cpu.h"

#include <c10/util/Exception.h>

namespace dgsct::cpu {

using at::Tensor;

namespace {

void check_order(const std::string& order) {
  TORCH_CHECK(order == "rewritten" || order == "tokens-first", "dgsct_kernels cpu: guide_order='", order,
              "': expected 'rewritten' or 'tokens-first'");
}

// What both orders' backward read besides the kept tensors: Q = T Wfc, and for the
// rewritten order qsum = Q 1_D, wsum = Wfc 1_D, wbar = mean_n Wtok and Sg = Q g^T.
GuideState guide_start(const Tensor& g, const std::vector<Tensor>& p, const std::string& order) {
  check_order(order);
  GuideState s;
  s.order = order;
  s.g = g;
  const Tensor& wfc = p[kWfc];  // [C, D]
  s.Q = cpu::matmul(p[kTokens], wfc);  // [K, D]
  if (order == "rewritten") {
    s.qsum = s.Q.sum(1);  // [K]
    s.wsum = wfc.sum(1);  // [C]
    s.wbar = p[kWtok].reshape({-1, g.size(1)}).mean(0);  // [M]
    s.Sg = cpu::matmul(s.Q, g.transpose(1, 2)).contiguous();  // [F, K, M]
  }
  return s;
}

}  // namespace

GuideState guide_forward(const Tensor& g, const std::vector<Tensor>& p, const std::string& order) {
  GuideState s = guide_start(g, p, order);
  const int64_t F = g.size(0), M = g.size(1);
  const Tensor& T = p[kTokens];
  const int64_t K = T.size(0);
  const Tensor wtok = p[kWtok].reshape({-1, M});  // [N, M]
  const int64_t N = wtok.size(0);
  const Tensor& btok = p[kBtok];
  const Tensor& wfc = p[kWfc];  // [C, D]
  const Tensor& bfc = p[kBfc];
  if (order == "rewritten") {
    Tensor S = cpu::matmul(s.Sg.view({F * K, M}), wtok.t()).view({F, K, N});
    S.add_(at::outer(s.qsum, btok));  // broadcast over frames
    s.A = at::softmax(S, -1);                                  // [F, K, N]
    s.B = cpu::matmul(s.A.view({F * K, N}), wtok).view({F, K, M});      // A Wtok
    s.applied = cpu::matmul(s.B, g);                                     // [F, K, D]
    s.ab = cpu::matmul(s.A, btok);                               // [F, K]
    s.R = cpu::matmul(s.applied, wfc.t()).add_(s.ab.unsqueeze(-1) * s.wsum).add_(bfc).add_(T);
    s.ga = cpu::matmul(s.wbar, g).contiguous();                  // [F, D]
    s.a = cpu::matmul(s.ga, wfc.t()).add_(btok.mean() * s.wsum).add_(bfc);
  } else {
    s.U = cpu::matmul(wtok, g).add_(btok.unsqueeze(-1));                // [F, N, D]
    s.A = at::softmax(cpu::matmul(s.Q, s.U.transpose(1, 2)), -1);       // [F, K, N]
    s.AU = cpu::matmul(s.A, s.U);                                        // [F, K, D]
    s.R = cpu::matmul(s.AU, wfc.t()).add_(bfc).add_(T);
    s.ubar = s.U.mean(1);                                       // [F, D]
    s.a = cpu::matmul(s.ubar, wfc.t()).add_(bfc);
  }
  return s;
}

std::vector<Tensor> guide_kept(const GuideState& s, int64_t C) {
  if (s.order == "rewritten") {
    if (guide_keeps_b(s.A.size(1), s.g.size(1), s.A.size(2), C)) return {s.A, s.B, s.applied, s.ab, s.ga};
    return {s.A, s.applied, s.ab, s.ga};
  }
  if (guide_keeps_u(s.g.size(2), C)) return {s.U, s.A, s.AU, s.ubar};
  return {s.A, s.AU, s.ubar};
}

std::vector<std::vector<int64_t>> guide_kept_shapes(const std::string& order, int64_t F, int64_t N, int64_t M,
                                                    int64_t D, int64_t K, int64_t C) {
  check_order(order);
  if (order == "rewritten") {
    if (guide_keeps_b(K, M, N, C)) return {{F, K, N}, {F, K, M}, {F, K, D}, {F, K}, {F, D}};
    return {{F, K, N}, {F, K, D}, {F, K}, {F, D}};
  }
  if (guide_keeps_u(D, C)) return {{F, N, D}, {F, K, N}, {F, K, D}, {F, D}};
  return {{F, K, N}, {F, K, D}, {F, D}};
}

GuideState guide_restore(const Tensor& g, const std::vector<Tensor>& p, const std::string& order, const Tensor& R,
                         const Tensor& a, at::ArrayRef<Tensor> kept) {
  GuideState s = guide_start(g, p, order);
  s.R = R;
  s.a = a;
  if (order == "rewritten") {
    const bool has_b = kept.size() == 5;
    s.A = kept[0];
    const int64_t F = s.A.size(0), K = s.A.size(1), N = s.A.size(2), M = g.size(1);
    s.B = has_b ? kept[1] : cpu::matmul(s.A.reshape({F * K, N}), p[kWtok].reshape({-1, M})).view({F, K, M});  // as forward
    s.applied = kept[has_b + 1];
    s.ab = kept[has_b + 2];
    s.ga = kept[has_b + 3];
  } else {
    const bool has_u = kept.size() == 4;
    s.U = has_u ? kept[0]
                : cpu::matmul(p[kWtok].reshape({-1, g.size(1)}), g).add_(p[kBtok].unsqueeze(-1));  // as forward
    s.A = kept[has_u + 0];
    s.AU = kept[has_u + 1];
    s.ubar = kept[has_u + 2];
  }
  return s;
}

GuideGrads guide_backward(const GuideState& s, const std::vector<Tensor>& p, const Tensor& dR,
                          const Tensor& da, bool want_g) {
  GuideGrads out;
  const Tensor& g = s.g;
  const int64_t F = g.size(0), M = g.size(1), D = g.size(2);
  const Tensor& T = p[kTokens];
  const int64_t K = T.size(0), C = T.size(1);
  const Tensor wtok = p[kWtok].reshape({-1, M});
  const int64_t N = wtok.size(0);
  const Tensor& btok = p[kBtok];
  const Tensor& wfc = p[kWfc];
  Tensor dT = dR.sum(0);                                   // R = T + ...
  out.bfc = dR.sum({0, 1}) + da.sum(0);
  Tensor dQ;
  if (s.order == "rewritten") {
    Tensor d_applied = cpu::matmul(dR, wfc);                // [F, K, D]
    Tensor dWfc = cpu::matmul(dR.reshape({F * K, C}).t(), s.applied.reshape({F * K, D}));
    Tensor dab = cpu::matmul(dR, s.wsum);                   // [F, K]
    Tensor dwsum = (dR * s.ab.unsqueeze(-1)).sum({0, 1});  // [C]
    // pooled guide a = ga Wfc^T + mean(btok) wsum + bfc, ga = wbar g
    Tensor dga = cpu::matmul(da, wfc);                          // [F, D]
    dWfc.add_(cpu::matmul(da.t(), s.ga));
    dwsum.add_(da.sum(0) * btok.mean());
    Tensor dbtok = cpu::matmul(da, s.wsum).sum().div(N).expand({N}).contiguous();
    Tensor dwbar = cpu::matmul(g, dga.unsqueeze(-1)).squeeze(-1).sum(0);  // [M]
    // applied = B g
    Tensor dB = cpu::matmul(d_applied, g.transpose(1, 2));          // [F, K, M]
    // B = A Wtok, ab = A btok
    Tensor dA = cpu::matmul(dB.view({F * K, M}), wtok.t()).view({F, K, N});
    dA.add_(dab.unsqueeze(-1) * btok);
    dbtok.add_((s.A * dab.unsqueeze(-1)).sum({0, 1}));
    // softmax
    Tensor dS = s.A * (dA - (s.A * dA).sum(-1, true));
    // S = Sg Wtok^T + qsum btok^T. One product for all three Wtok terms (B = A Wtok,
    // S, and wbar = mean_n Wtok): [A; dS; 1/N]^T [dB; Sg; dwbar].
    Tensor left = at::cat({s.A.view({F * K, N}), dS.view({F * K, N}), at::full({1, N}, 1.0 / N, dS.options())}, 0);
    Tensor right = at::cat({dB.view({F * K, M}), s.Sg.view({F * K, M}), dwbar.view({1, M})}, 0);
    Tensor dWtok = cpu::matmul(left.t(), right);
    Tensor dSg = cpu::matmul(dS.view({F * K, N}), wtok).view({F, K, M});
    Tensor dqsum = cpu::matmul(dS, btok);                   // [F, K]
    dbtok.add_((dS * s.qsum.view({1, K, 1})).sum({0, 1}));
    // Sg = Q g^T, qsum = Q 1_D
    dQ = cpu::matmul(dSg, g).sum(0).add_(dqsum.sum(0).unsqueeze(-1));  // [K, D]
    Tensor dg;
    if (want_g) {  // one batched product for the three terms: [dSg; B; wbar]^T [Q; d_applied; dga]
      Tensor gl = at::cat({dSg, s.B, s.wbar.view({1, 1, M}).expand({F, 1, M})}, 1);
      Tensor gr = at::cat({s.Q.unsqueeze(0).expand({F, K, D}), d_applied, dga.view({F, 1, D})}, 1);
      dg = cpu::matmul(gl.transpose(1, 2), gr);
    }
    dWfc.add_(dwsum.unsqueeze(-1));                        // wsum = Wfc 1_D
    out.Wfc = dWfc;
    out.btok = dbtok;
    out.Wtok = dWtok;
    out.g = dg;
  } else {
    Tensor dAU = cpu::matmul(dR, wfc);                      // [F, K, D]
    Tensor dWfc = cpu::matmul(dR.reshape({F * K, C}).t(), s.AU.reshape({F * K, D})).add_(cpu::matmul(da.t(), s.ubar));
    Tensor dubar = cpu::matmul(da, wfc);                        // [F, D]
    Tensor dU = cpu::matmul(s.A.transpose(1, 2), dAU).add_(dubar.unsqueeze(1).div(N));  // [F, N, D]
    Tensor dA = cpu::matmul(dAU, s.U.transpose(1, 2));              // [F, K, N]
    Tensor dS = s.A * (dA - (s.A * dA).sum(-1, true));
    dU.add_(cpu::matmul(dS.transpose(1, 2), s.Q));
    dQ = cpu::matmul(dS, s.U).sum(0);                               // [K, D]
    // U = Wtok g + btok: sum over frames of dU_f g_f^T as one product
    out.Wtok = cpu::matmul(dU.permute({1, 0, 2}).reshape({N, F * D}), g.transpose(1, 2).reshape({F * D, M}));
    out.btok = dU.sum({0, 2});
    if (want_g) out.g = cpu::matmul(wtok.t(), dU);
    out.Wfc = dWfc;
  }
  // Q = T Wfc
  dT.add_(cpu::matmul(dQ, wfc.t()));
  out.Wfc.add_(cpu::matmul(T.t(), dQ));
  out.tokens = dT;
  return out;
}

}  // namespace dgsct::cpu
