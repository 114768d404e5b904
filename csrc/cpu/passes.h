// The cpu backend's token passes (forward_passes.cpp, backward_passes.cpp): each sweeps all
// items of a call once (see tiles.h). They are defined and instantiated there, for the
// dtype pairs of DGSCT_CPU_FOR_EACH_DTYPE.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/tiles.h"

namespace dgsct::cpu {

// ---------------------------------------------------------------- forward passes

// Token sums of qv1 = relu(x1 W1^T + b1): [F, C] (zeros when n.ch is already set).
template <typename scalar_t, typename acc_t>
Tensor channel_pass(const Net<scalar_t, acc_t>& n);

// s [F, N] and z [F, N, H] (both accumulation dtype); bn1 sums per item when zsums is defined.
template <typename scalar_t, typename acc_t>
void bottleneck_pass(const Net<scalar_t, acc_t>& n, Tensor& s, Tensor& z, Tensor& zsums);

// bn2's batch sums of u per item: [items, 2C] (double).
template <typename scalar_t, typename acc_t>
Tensor moments_pass(const Net<scalar_t, acc_t>& n, const Tensor& z);

// o = gate ln_post(bn2(up(relu(bn1(z))))) in x's dtype.
template <typename scalar_t, typename acc_t>
void output_pass(const Net<scalar_t, acc_t>& n, const Tensor& z, Tensor& o);

// ---------------------------------------------------------------- backward passes

struct TailAccums {  // per item partials, [items, len]
  Tensor dgate, dlnpw, dlnpb, dub, dubu, dzb, dzbz;
};

// The tail's backward: dO -> dzb [F, N, H] (the gradient of relu's input). With
// `sums_only` it only gathers the global sums bn2's training backward needs first.
// DUB (training with BatchNorm): the first sweep stores d(bn2 output) [F, N, C] there and
// the second reads it back instead of redoing ln_post's forward and backward.
template <typename scalar_t, typename acc_t>
void tail_pass(const Net<scalar_t, acc_t>& n, const Tensor& z, const scalar_t* dO, bool accumulate, bool sums_only,
               const acc_t* Sdub, const acc_t* Sdubu, TailAccums& acc, Tensor& dzb_out, Tensor& dWu_part,
               acc_t* DUB = nullptr);

struct FrontAccums {
  Tensor dchA, dchB, dtgA, dqa2, dws, dbs, db2, dlnbw, dlnbb;  // per item
  Tensor dWd;                                                    // per chunk
};

// Front sweep 1: from dz (bn1's backward as dz = k1 dzb + k2 z_hat + k3) back to dx1
// except for the channel attention's share, which needs dch summed over the frame first.
template <typename scalar_t, typename acc_t>
void front1_pass(const Net<scalar_t, acc_t>& n, const Tensor& s, const Tensor& spmap, const Tensor& dsp,
                 const Tensor& dotf, const Tensor& z, const Tensor& dzb, const acc_t* k1, const acc_t* k2,
                 const acc_t* k3, FrontAccums& acc, Tensor& dx1);

// Front sweep 2: the channel attention's share of dx1, then the prompt attention -> dx, dR.
template <typename scalar_t, typename acc_t>
void front2_pass(const Net<scalar_t, acc_t>& n, const Tensor& gv, Tensor& dx1, scalar_t* dx, Tensor& dgav,
                 Tensor& dR, Tensor& db1);

// X(scalar_t, acc_t) for every dtype pair the op dispatches: the pass files instantiate
// their templates with it.
#define DGSCT_CPU_FOR_EACH_DTYPE(X) \
  X(double, double)                 \
  X(float, float)                   \
  X(c10::BFloat16, float)           \
  X(c10::Half, float)

}  // namespace dgsct::cpu
