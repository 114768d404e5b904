// BatchNorm and LayerNorm on whole tensors (see norms.h).
#include "core/norms.h"

namespace dgsct::core {

using at::Tensor;

BnAffine bn_affine(const Tensor& w, const Tensor& b, const Tensor& mean, const Tensor& var, double eps) {
  BnAffine a;
  a.mu = mean.contiguous();
  a.rs = at::rsqrt(var + eps).contiguous();
  a.sc = (w * a.rs).contiguous();
  a.sh = (b - a.mu * a.sc).contiguous();
  return a;
}

BnAffine identity_affine(int64_t n, const at::TensorOptions& o) {
  return BnAffine{at::ones({n}, o), at::zeros({n}, o), at::zeros({n}, o), at::ones({n}, o)};
}

BnAffine bn_layer_affine(const Prepared& pr, BnLayer layer, const Tensor& mean, const Tensor& var) {
  const bool first = layer == BnLayer::kBn1;
  if (!pr.has_bn) return identity_affine(first ? pr.H : pr.C, pr.ao);
  const auto& p = pr.p;
  const Tensor& w = p[first ? kBn1W : kBn2W];
  const Tensor& b = p[first ? kBn1B : kBn2B];
  const double eps = first ? pr.hy.bn1_eps : pr.hy.bn2_eps;
  if (mean.defined()) return bn_affine(w, b, mean, var, eps);
  return bn_affine(w, b, p[first ? kBn1Rm : kBn2Rm], p[first ? kBn1Rv : kBn2Rv], eps);
}

std::pair<Tensor, Tensor> batch_mean_var(const Tensor& sums, int64_t width, int64_t count, at::ScalarType acc) {
  Tensor total = sums.sum(0);
  Tensor mean = total.slice(0, 0, width) / static_cast<double>(count);
  Tensor var = (total.slice(0, width, 2 * width) / static_cast<double>(count) - mean * mean).clamp_min(0.0);
  return {mean.to(acc), var.to(acc)};
}

void bn_param_grads(const Prepared& pr, const BnAffine& a1, const BnAffine& a2, const Tensor& Sdzb,
                    const Tensor& Sdzbz, const Tensor& Sdub, const Tensor& Sdubu, std::vector<Tensor>& grads) {
  if (!pr.has_bn) return;
  grads[kBn1W] = Sdzbz;
  grads[kBn1B] = Sdzb;
  grads[kBn2W] = Sdubu;
  grads[kBn2B] = Sdub;
  if (pr.batch_stats) {  // the running buffers are not read in training
    for (int i : {int(kBn1Rm), int(kBn1Rv), int(kBn2Rm), int(kBn2Rv)}) grads[i] = at::zeros_like(pr.p[i]);
  } else {
    grads[kBn1Rm] = -a1.sc * Sdzb;
    grads[kBn1Rv] = -0.5 * a1.sc * a1.rs * Sdzbz;
    grads[kBn2Rm] = -a2.sc * Sdub;
    grads[kBn2Rv] = -0.5 * a2.sc * a2.rs * Sdubu;
  }
}

LayerNormState layer_norm_rows(const Tensor& v, const Tensor& w, const Tensor& b, double eps) {
  LayerNormState s;
  Tensor mean = v.mean(-1, true);
  Tensor centered = v - mean;
  s.rstd = at::rsqrt(centered.pow(2).mean(-1, true) + eps);
  s.xhat = centered * s.rstd;
  s.out = s.xhat * w + b;
  return s;
}

Tensor layer_norm_rows_backward(const Tensor& dy, const LayerNormState& s, const Tensor& w, Tensor& dw, Tensor& db) {
  Tensor dxh = dy * w;
  dw = (dy * s.xhat).sum(0);
  db = dy.sum(0);
  return s.rstd * (dxh - dxh.mean(-1, true) - s.xhat * (dxh * s.xhat).mean(-1, true));
}

}  // namespace dgsct::core
