// The CUDA backend's math, written once for two compilers.
//
// Everything here is plain C++ that nvcc compiles as __host__ __device__ and a host
// compiler compiles as ordinary inline functions (the DG_HD macro is empty there). The
// CUDA kernels (kernels.cu) run one tile function per thread block; the CPU check
// (portable/host_check.cpp) runs the very same tile functions in a loop over tiles on the
// CPU, so the kernels' arithmetic is tested without a GPU.
//
// A tile function is a sequence of phases separated by DG_SYNC(). Each phase is a loop
// DG_FOR(t, n) over independent work items: on the device the block's threads share the
// items (t = threadIdx.x, threadIdx.x + blockDim.x, ...) and DG_SYNC() is __syncthreads();
// on the host one thread runs every item in order and DG_SYNC() does nothing. Work items
// of one phase never read what another item of the same phase writes, so both executions
// compute the same values. Shared memory is a caller-provided float buffer.
//
// No torch and no CUDA headers: this file must compile in seconds under nvcc.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define DG_HD __host__ __device__ inline
#else
#define DG_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define DG_SYNC() __syncthreads()
#define DG_FOR(t, n) for (int t = static_cast<int>(threadIdx.x); t < (n); t += static_cast<int>(blockDim.x))
#else
#define DG_SYNC() ((void)0)
#define DG_FOR(t, n) for (int t = 0; t < (n); ++t)
#endif

namespace dgsct::cuda {

// Rows of a tile that one work item of a tile product computes together (register block).
constexpr int kRowBlock = 8;

// ---------------------------------------------------------------- per-element math

DG_HD float relu(float v) { return v > 0.f ? v : 0.f; }

// Stable for any finite v: exp never sees a positive argument.
DG_HD float sigmoid(float v) {
  if (v >= 0.f) return 1.f / (1.f + expf(-v));
  const float e = expf(v);
  return e / (1.f + e);
}

// SPEC.md step 8: the per-token part of the modulation scale,
// beta * sigmoid(s) + gamma * tg + 1 - alpha.
DG_HD float modulation_base(float s, float tg, float alpha, float beta, float gamma) {
  return beta * sigmoid(s) + gamma * tg + 1.f - alpha;
}

// The full scale of channel c: alpha * ch[c] + modulation_base(...).
DG_HD float modulation_scale(float ch, float base, float alpha) { return alpha * ch + base; }

// Softmax of one row of n values in place (row max subtracted).
DG_HD void softmax_row(float* p, int n) {
  float mx = p[0];
  for (int k = 1; k < n; ++k) mx = p[k] > mx ? p[k] : mx;
  float sum = 0.f;
  for (int k = 0; k < n; ++k) {
    p[k] = expf(p[k] - mx);
    sum += p[k];
  }
  const float inv = 1.f / sum;
  for (int k = 0; k < n; ++k) p[k] *= inv;
}

// Mean and 1/sqrt(var + eps) of one row (two passes: no cancellation for large means).
DG_HD void row_moments(const float* v, int n, float eps, float* mean_out, float* rstd_out) {
  float mean = 0.f;
  for (int c = 0; c < n; ++c) mean += v[c];
  mean /= static_cast<float>(n);
  float var = 0.f;
  for (int c = 0; c < n; ++c) var += (v[c] - mean) * (v[c] - mean);
  var /= static_cast<float>(n);
  *mean_out = mean;
  *rstd_out = 1.f / sqrtf(var + eps);
}

// LayerNorm of one row in place.
DG_HD void layer_norm_row(float* v, int n, const float* w, const float* b, float eps) {
  float mean, rstd;
  row_moments(v, n, eps, &mean, &rstd);
  for (int c = 0; c < n; ++c) v[c] = (v[c] - mean) * rstd * w[c] + b[c];
}

// BatchNorm as an affine map: scale = w / sqrt(var + eps), shift = b - mean * scale.
DG_HD void bn_affine(float w, float b, float mean, float var, float eps, float* scale, float* shift) {
  const float sc = w / sqrtf(var + eps);
  *scale = sc;
  *shift = b - mean * sc;
}

// ---------------------------------------------------------------- tiles

// Row-major products on tiles: acc[i] = sum_k A[r0 + i, k] * B[k, j] for kRowBlock rows
// from r0 (rows past `rows` repeat the last row; callers drop them). B is read along a
// row by consecutive j, so consecutive threads read consecutive addresses.
DG_HD void dot_rows(const float* A, int lda, int r0, int rows, const float* B, int64_t ldb, int j, int depth,
                    float* acc) {
  const float* a[kRowBlock];
  for (int i = 0; i < kRowBlock; ++i) {
    acc[i] = 0.f;
    a[i] = A + static_cast<int64_t>(r0 + i < rows ? r0 + i : rows - 1) * lda;
  }
  for (int k = 0; k < depth; ++k) {
    const float w = B[k * ldb + j];
    for (int i = 0; i < kRowBlock; ++i) acc[i] += a[i][k] * w;
  }
}

// The same with B's row k scaled by colscale[k] (the channel attention's 1 + ch folded in).
DG_HD void dot_rows_scaled(const float* A, int lda, int r0, int rows, const float* B, int64_t ldb, int j, int depth,
                           const float* colscale, float* acc) {
  const float* a[kRowBlock];
  for (int i = 0; i < kRowBlock; ++i) {
    acc[i] = 0.f;
    a[i] = A + static_cast<int64_t>(r0 + i < rows ? r0 + i : rows - 1) * lda;
  }
  for (int k = 0; k < depth; ++k) {
    const float w = B[k * ldb + j] * (1.f + colscale[k]);
    for (int i = 0; i < kRowBlock; ++i) acc[i] += a[i][k] * w;
  }
}

// Everything a pass reads and writes; filled by the driver (portable/driver.cpp), float32
// unless said otherwise. Weights are pre-transposed to [in, out] so tile products read
// them along rows.
struct TileArgs {
  int F, N, C, K, H, G, Ch, BT, ntiles;
  int Cg, Hg, Cog;            // C / G, H / G, C / G (down input, up input, up output per group)
  const void* x;              // [F, N, C] in x's dtype
  void* o;                    // [F, N, C] in x's dtype
  const float* R;             // [F, K, C] prompts
  const float* Rt;            // [F, C, K] prompts transposed
  const float* gav;           // [1] gate_av
  const float* W1t;           // [C, C]  fc_affine_video_1.weight^T
  const float* b1;            // [C]
  const float* W2t;           // [C, Ch] fc_affine_video_2.weight^T
  const float* b2;            // [Ch]
  const float* w2q;           // [F, Ch] relu(qa2) * fc_affine_v_s_att.weight
  const float* bs;            // [1] fc_affine_v_s_att.bias
  const float* ch;            // [F, C] channel attention
  const float* tg;            // [F] temporal gate
  float alpha, beta, gamma;
  const float *lnbw, *lnbb;   // ln_before (null: off)
  float eps_b;
  const float* WdT;           // [G, Cg, Hg] down_sampler per group, transposed
  const float* WuT;           // [G, Hg, Cog] up_sampler per group, transposed
  const float *sc1, *sh1;     // [H] bn1 as an affine map (identity without BatchNorm)
  const float *sc2, *sh2;     // [C] bn2
  const float *lnpw, *lnpb;   // ln_post (null: off)
  float eps_p;
  const float* gate;          // [1] gate (null: no gate)
  float* colsum_part;         // [F * ntiles, C] token sums of relu(x1 W1^T + b1) per tile
  float* s;                   // [F, N] spatial logit
  float* z;                   // [F, N, H] down projection
  double* zsums;              // [F * ntiles, 2H] sums of z, z^2 per tile (null: not needed)
  double* usums;              // [F * ntiles, 2C] sums of u, u^2 per tile
};

// Shared floats each pass needs for a tile of bt tokens.
DG_HD int64_t channel_shared_floats(const TileArgs& a, int bt) { return int64_t(bt) * (a.C + a.K); }
DG_HD int64_t bottleneck_shared_floats(const TileArgs& a, int bt) {
  return int64_t(bt) * (a.C + a.K + a.Ch + a.H + 1);
}
DG_HD int64_t moments_shared_floats(const TileArgs& a, int bt) { return int64_t(bt) * a.H; }
DG_HD int64_t output_shared_floats(const TileArgs& a, int bt) { return int64_t(bt) * (a.H + a.C); }

struct TileIndex {
  int f, n0, rows;
  int64_t item;  // f * ntiles + tile
  int64_t row0;  // global token index of the first row: f * N + n0
};

DG_HD TileIndex tile_index(const TileArgs& a, int64_t item) {
  TileIndex t;
  t.item = item;
  t.f = static_cast<int>(item / a.ntiles);
  t.n0 = static_cast<int>(item % a.ntiles) * a.BT;
  t.rows = a.N - t.n0 < a.BT ? a.N - t.n0 : a.BT;
  t.row0 = static_cast<int64_t>(t.f) * a.N + t.n0;
  return t;
}

// SPEC.md step 3 on a tile: xs <- x1 = x + gate_av softmax(x R^T) R (xs: [rows, C],
// P: [rows, K] shared). Ends synchronised.
template <typename scalar_t>
DG_HD void prompt_tile(const TileArgs& a, const TileIndex& t, float* xs, float* P) {
  const int C = a.C, K = a.K, rows = t.rows;
  const scalar_t* x = static_cast<const scalar_t*>(a.x) + t.row0 * C;
  DG_FOR(i, rows * C) xs[i] = static_cast<float>(x[i]);
  DG_SYNC();
  const float* Rt = a.Rt + static_cast<int64_t>(t.f) * C * K;
  const float* R = a.R + static_cast<int64_t>(t.f) * K * C;
  const int groups = (rows + kRowBlock - 1) / kRowBlock;
  DG_FOR(w, K * groups) {  // logits x R^T
    const int k = w % K, r0 = (w / K) * kRowBlock;
    float acc[kRowBlock];
    dot_rows(xs, C, r0, rows, Rt, K, k, C, acc);
    for (int i = 0; i < kRowBlock && r0 + i < rows; ++i) P[(r0 + i) * K + k] = acc[i];
  }
  DG_SYNC();
  DG_FOR(r, rows) softmax_row(P + r * K, K);
  DG_SYNC();
  const float gav = a.gav[0];
  DG_FOR(w, C * groups) {  // x1 = x + gate_av P R (each item owns its elements of xs)
    const int j = w % C, r0 = (w / C) * kRowBlock;
    float acc[kRowBlock];
    dot_rows(P, K, r0, rows, R, C, j, K, acc);
    for (int i = 0; i < kRowBlock && r0 + i < rows; ++i) xs[(r0 + i) * C + j] += gav * acc[i];
  }
  DG_SYNC();
}

// Pass 1 (channel): per tile, the token sums of qv1 = relu(x1 W1^T + b1).
template <typename scalar_t>
DG_HD void channel_tile(const TileArgs& a, int64_t item, float* smem) {
  const TileIndex t = tile_index(a, item);
  const int C = a.C;
  float* xs = smem;
  float* P = smem + static_cast<int64_t>(a.BT) * C;
  prompt_tile<scalar_t>(a, t, xs, P);
  DG_FOR(j, C) {
    float sum = 0.f;
    for (int r0 = 0; r0 < t.rows; r0 += kRowBlock) {
      float acc[kRowBlock];
      dot_rows(xs, C, r0, t.rows, a.W1t, C, j, C, acc);
      for (int i = 0; i < kRowBlock && r0 + i < t.rows; ++i) sum += relu(acc[i] + a.b1[j]);
    }
    a.colsum_part[t.item * C + j] = sum;
  }
}

// Pass 2 (bottleneck): spatial logit s, modulation, ln_before, down projection z (and
// bn1's per-tile sums in training).
template <typename scalar_t>
DG_HD void bottleneck_tile(const TileArgs& a, int64_t item, float* smem) {
  const TileIndex t = tile_index(a, item);
  const int C = a.C, K = a.K, Ch = a.Ch, H = a.H, rows = t.rows, BT = a.BT;
  float* xs = smem;                 // [BT, C]: x1, then xm, then y
  float* P = xs + BT * C;           // [BT, K]
  float* v = P + BT * K;            // [BT, Ch]: relu(qv2) * qa2 * w_s
  float* zs = v + BT * Ch;          // [BT, H]
  float* srow = zs + BT * H;        // [BT]
  prompt_tile<scalar_t>(a, t, xs, P);
  const float* ch = a.ch + static_cast<int64_t>(t.f) * C;
  const float* w2q = a.w2q + static_cast<int64_t>(t.f) * Ch;
  const int groups = (rows + kRowBlock - 1) / kRowBlock;
  DG_FOR(w, Ch * groups) {  // qv2 = relu((x1 (1 + ch)) W2^T + b2), times qa2 w_s
    const int j = w % Ch, r0 = (w / Ch) * kRowBlock;
    float acc[kRowBlock];
    dot_rows_scaled(xs, C, r0, rows, a.W2t, Ch, j, C, ch, acc);
    for (int i = 0; i < kRowBlock && r0 + i < rows; ++i) v[(r0 + i) * Ch + j] = relu(acc[i] + a.b2[j]) * w2q[j];
  }
  DG_SYNC();
  DG_FOR(r, rows) {
    float sr = a.bs[0];
    for (int j = 0; j < Ch; ++j) sr += v[r * Ch + j];
    srow[r] = sr;
    a.s[t.row0 + r] = sr;
  }
  DG_SYNC();
  const float tg = a.tg[t.f];
  DG_FOR(i, rows * C) {  // xm = x1 (alpha ch + beta sigmoid(s) + gamma tg + 1 - alpha)
    const int r = i / C, c = i % C;
    xs[i] *= modulation_scale(ch[c], modulation_base(srow[r], tg, a.alpha, a.beta, a.gamma), a.alpha);
  }
  DG_SYNC();
  if (a.lnbw) {
    DG_FOR(r, rows) layer_norm_row(xs + r * C, C, a.lnbw, a.lnbb, a.eps_b);
    DG_SYNC();
  }
  DG_FOR(w, H * groups) {  // z = grouped_linear(y, down_sampler)
    const int j = w % H, r0 = (w / H) * kRowBlock, grp = j / a.Hg, hj = j % a.Hg;
    float acc[kRowBlock];
    dot_rows(xs + grp * a.Cg, C, r0, rows, a.WdT + static_cast<int64_t>(grp) * a.Cg * a.Hg, a.Hg, hj, a.Cg, acc);
    for (int i = 0; i < kRowBlock && r0 + i < rows; ++i) {
      zs[(r0 + i) * H + j] = acc[i];
      a.z[(t.row0 + r0 + i) * H + j] = acc[i];
    }
  }
  if (a.zsums) {
    DG_SYNC();
    DG_FOR(j, H) {
      double s1 = 0, s2 = 0;
      for (int r = 0; r < rows; ++r) {
        const double v_ = zs[r * H + j];
        s1 += v_;
        s2 += v_ * v_;
      }
      a.zsums[t.item * 2 * H + j] = s1;
      a.zsums[t.item * 2 * H + H + j] = s2;
    }
  }
}

// h = relu(bn1(z)) of a tile into hs [rows, H]. Ends synchronised.
DG_HD void hidden_tile(const TileArgs& a, const TileIndex& t, float* hs) {
  const int H = a.H;
  const float* z = a.z + t.row0 * H;
  DG_FOR(i, t.rows * H) {
    const int j = i % H;
    hs[i] = relu(z[i] * a.sc1[j] + a.sh1[j]);
  }
  DG_SYNC();
}

// Pass 3 (moments, training with BatchNorm): per tile, sums of u = up(h) and u^2.
DG_HD void moments_tile(const TileArgs& a, int64_t item, float* smem) {
  const TileIndex t = tile_index(a, item);
  const int C = a.C, H = a.H;
  hidden_tile(a, t, smem);
  DG_FOR(j, C) {
    const int grp = j / a.Cog, cj = j % a.Cog;
    double s1 = 0, s2 = 0;
    for (int r0 = 0; r0 < t.rows; r0 += kRowBlock) {
      float acc[kRowBlock];
      dot_rows(smem + grp * a.Hg, H, r0, t.rows, a.WuT + static_cast<int64_t>(grp) * a.Hg * a.Cog, a.Cog, cj, a.Hg,
               acc);
      for (int i = 0; i < kRowBlock && r0 + i < t.rows; ++i) {
        s1 += acc[i];
        s2 += static_cast<double>(acc[i]) * acc[i];
      }
    }
    a.usums[t.item * 2 * C + j] = s1;
    a.usums[t.item * 2 * C + C + j] = s2;
  }
}

// Pass 4 (output): o = gate * ln_post(bn2(up(relu(bn1(z))))) in x's dtype.
template <typename scalar_t>
DG_HD void output_tile(const TileArgs& a, int64_t item, float* smem) {
  const TileIndex t = tile_index(a, item);
  const int C = a.C, H = a.H, rows = t.rows;
  float* hs = smem;                                    // [BT, H]
  float* us = smem + static_cast<int64_t>(a.BT) * H;   // [BT, C]
  hidden_tile(a, t, hs);
  const int groups = (rows + kRowBlock - 1) / kRowBlock;
  DG_FOR(w, C * groups) {
    const int j = w % C, r0 = (w / C) * kRowBlock, grp = j / a.Cog, cj = j % a.Cog;
    float acc[kRowBlock];
    dot_rows(hs + grp * a.Hg, H, r0, rows, a.WuT + static_cast<int64_t>(grp) * a.Hg * a.Cog, a.Cog, cj, a.Hg, acc);
    for (int i = 0; i < kRowBlock && r0 + i < rows; ++i) us[(r0 + i) * C + j] = acc[i] * a.sc2[j] + a.sh2[j];
  }
  DG_SYNC();
  if (a.lnpw) {
    DG_FOR(r, rows) layer_norm_row(us + r * C, C, a.lnpw, a.lnpb, a.eps_p);
    DG_SYNC();
  }
  scalar_t* o = static_cast<scalar_t*>(a.o) + t.row0 * C;
  const float gate = a.gate ? a.gate[0] : 1.f;
  DG_FOR(i, rows * C) o[i] = static_cast<scalar_t>(gate * us[i]);
}

}  // namespace dgsct::cuda
