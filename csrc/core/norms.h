// BatchNorm and LayerNorm for every backend, written once.
//
// BatchNorm is the per-channel map h = z sc + sh with the normalisation (mu, rs = 1/std) it
// used; its statistics are the batch's (training: mean and biased variance from per-item
// double sums the token passes gather) or the running buffers (eval), and an absent
// BatchNorm is the identity. Its backward, given S = sum(dh) and Sx = sum(dh z_hat) over
// the batch, is dz = sc (dh - S/T - z_hat Sx/T) with batch statistics, else dz = sc dh.
//
// LayerNorm over the last dimension of rows, out = x_hat w + b with x_hat = (v - mean) rstd;
// its backward is dx = rstd (dxh - mean(dxh) - x_hat mean(dxh x_hat)) with dxh = dy w. Two
// forms of the same formulas: whole tensors in ATen (any device; the CUDA driver's
// backward) and rows of one CPU tile in plain loops (the cpu backend's token passes; the
// templates are instantiated only in csrc/cpu, which is compiled for the build machine).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <utility>
#include <vector>

#include "core/op_io.h"
#include "core/simd.h"

namespace dgsct::core {

// ---------------------------------------------------------------- BatchNorm

struct BnAffine {
  at::Tensor sc, sh, mu, rs;
};

BnAffine bn_affine(const at::Tensor& w, const at::Tensor& b, const at::Tensor& mean, const at::Tensor& var,
                   double eps);
BnAffine identity_affine(int64_t n, const at::TensorOptions& o);

enum class BnLayer { kBn1, kBn2 };  // bn1 over the H hidden channels, bn2 over the C channels

// The layer's map from the given batch statistics, or where none are given from the running
// statistics (with BatchNorm) or the identity (without).
BnAffine bn_layer_affine(const Prepared& pr, BnLayer layer, const at::Tensor& mean = {}, const at::Tensor& var = {});

// Batch mean and biased variance [width] in `acc` from per-item (sum, sum of squares)
// double sums [items, 2 * width] over `count` values each.
std::pair<at::Tensor, at::Tensor> batch_mean_var(const at::Tensor& sums, int64_t width, int64_t count,
                                                 at::ScalarType acc);

// bn1's and bn2's parameter gradients into grads (Param slots) from the sums over the batch
// of dzb = d(bn1 output), dzb z_hat, dub = d(bn2 output) and dub u_hat. In training the
// running buffers get zero gradients (they are not read); in eval they get the gradients of
// the map's dependence on them.
void bn_param_grads(const Prepared& pr, const BnAffine& a1, const BnAffine& a2, const at::Tensor& Sdzb,
                    const at::Tensor& Sdzbz, const at::Tensor& Sdub, const at::Tensor& Sdubu,
                    std::vector<at::Tensor>& grads);

// ---------------------------------------------------------------- LayerNorm, whole tensors

struct LayerNormState {
  at::Tensor out, xhat, rstd;
};

LayerNormState layer_norm_rows(const at::Tensor& v, const at::Tensor& w, const at::Tensor& b, double eps);

// dx; dw and db (sums over the rows) are written.
at::Tensor layer_norm_rows_backward(const at::Tensor& dy, const LayerNormState& s, const at::Tensor& w,
                                    at::Tensor& dw, at::Tensor& db);

// ---------------------------------------------------------------- LayerNorm, one CPU tile

// `rows` rows of length C at v into out (in place when out == v); keeps x_hat and rstd when
// xhat / rstd are given.
template <typename acc_t>
void layer_norm_tile(const acc_t* v, int64_t rows, int64_t C, const acc_t* w, const acc_t* b, acc_t eps, acc_t* out,
                     acc_t* xhat, acc_t* rstd) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* vr = v + r * C;
    acc_t mean = 0;
    DGSCT_SIMD_SUM(mean)
    for (int64_t c = 0; c < C; ++c) mean += vr[c];
    mean /= C;
    acc_t var = 0;
    DGSCT_SIMD_SUM(var)
    for (int64_t c = 0; c < C; ++c) var += (vr[c] - mean) * (vr[c] - mean);
    var /= C;
    const acc_t rs = acc_t(1) / std::sqrt(var + eps);
    if (rstd) rstd[r] = rs;
    acc_t* o = out + r * C;
    acc_t* xh = xhat ? xhat + r * C : nullptr;
    DGSCT_SIMD
    for (int64_t c = 0; c < C; ++c) {
      const acc_t h = (vr[c] - mean) * rs;
      if (xh) xh[c] = h;
      o[c] = h * w[c] + b[c];
    }
  }
}

// dx from dy and the forward's x_hat and rstd; adds the rows' dw and db when dw is given.
template <typename acc_t>
void layer_norm_tile_backward(const acc_t* dy, const acc_t* xhat, const acc_t* rstd, int64_t rows, int64_t C,
                              const acc_t* w, acc_t* dw, acc_t* db, acc_t* dx) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* d = dy + r * C;
    const acc_t* xh = xhat + r * C;
    acc_t m1 = 0, m2 = 0;
    DGSCT_SIMD_SUM2(m1, m2)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t dxh = d[c] * w[c];
      m1 += dxh;
      m2 += dxh * xh[c];
      if (dw) {
        dw[c] += d[c] * xh[c];
        db[c] += d[c];
      }
    }
    m1 /= C;
    m2 /= C;
    acc_t* o = dx + r * C;
    DGSCT_SIMD
    for (int64_t c = 0; c < C; ++c) o[c] = rstd[r] * (d[c] * w[c] - m1 - xh[c] * m2);
  }
}

}  // namespace dgsct::core
