// The CUDA backend's math, written once for two compilers.
//
// Everything here is plain C++ that nvcc compiles as __host__ __device__ and a host
// compiler compiles as ordinary inline functions (the DG_HD macro is empty there). The
// CUDA kernels (kernels.cu) run one tile function per thread block; the CPU check
// (portable/host_check.cpp) runs the very same tile functions in a loop over tiles on the
// CPU, so the kernels' arithmetic is tested without a GPU.
//
// A tile function is a sequence of phases separated by DG_SYNC(). Each phase is a loop
// over independent work items:
//   DG_FOR(t, n)       thread items: on the device the block's threads share the items
//                      (t = threadIdx.x, threadIdx.x + blockDim.x, ...); on the host one
//                      thread runs every item in order.
//   DG_WARP_FOR(w, n)  warp items (the tensor-core products): on the device each warp takes
//     DG_LANE_FOR(l)   items w = warp, warp + warps, ... and its 32 lanes run the item's body
//                      together, l = lane; on the host the body runs for l = 0, ..., 31 in
//                      order. Lanes exchange data only through memory with DG_SYNCWARP()
//                      between, and a lane reads only what lower lanes wrote, so the
//                      host's lane order computes the same values.
// DG_SYNC() is __syncthreads() on the device and nothing on the host. Work items of one
// phase never read what another item of the same phase writes, so both executions compute
// the same values. Shared memory is a caller-provided float buffer.
//
// The products use mma.sync (tf32, sm_80+) with a 3xTF32 split for float32 accuracy; the
// host computes each lane's elements with the same operand rounding (mma_block).
//
// No torch and no CUDA headers: this file must compile in seconds under nvcc.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define DG_HD __host__ __device__ inline
#define DG_UNROLL _Pragma("unroll")
#else
#define DG_HD inline
#define DG_UNROLL
#endif

#if defined(__CUDA_ARCH__)
#define DG_SYNC() __syncthreads()
#define DG_FOR(t, n) for (int t = static_cast<int>(threadIdx.x); t < (n); t += static_cast<int>(blockDim.x))
#define DG_WARP_FOR(w, n) \
  for (int w = static_cast<int>(threadIdx.x >> 5); w < (n); w += static_cast<int>(blockDim.x >> 5))
#define DG_LANE_FOR(l) for (int l = static_cast<int>(threadIdx.x & 31), l##_end = l + 1; l < l##_end; ++l)
#define DG_SYNCWARP() __syncwarp()
#define DG_WARP_ID() static_cast<int>(threadIdx.x >> 5)
#else
#define DG_SYNC() ((void)0)
#define DG_FOR(t, n) for (int t = 0; t < (n); ++t)
#define DG_WARP_FOR(w, n) for (int w = 0; w < (n); ++w)
#define DG_LANE_FOR(l) for (int l = 0; l < 32; ++l)
#define DG_SYNCWARP() ((void)0)
#define DG_WARP_ID() 0
#endif

namespace dgsct::cuda {

// Warps of a thread block (kernels.cu launches 32 * kBlockWarps threads).
constexpr int kBlockWarps = 8;

// ---------------------------------------------------------------- per-element math

DG_HD float relu(float v) { return v < 0.f ? 0.f : v; }  // keeps NaN, as torch.relu does

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

// ---------------------------------------------------------------- tensor-core products
//
// A warp item computes a block of kMmaRows x kMmaCols outputs as kSub mma.sync m16n8k8
// blocks side by side. Lane l holds accumulator i (0..3) of sub-block s at row
// frag_row(l, i), column 8 s + frag_col(l, i) (PTX ISA's m16n8k8 C layout).
//
// Precision (3xTF32): each operand v splits into hi = tf32(v), lo = tf32(v - hi), and
// a b ~ a_hi b_hi + (a_hi b_lo + a_lo b_hi), the small terms in their own accumulator.
// Products of tf32 values are exact in float32; the dropped a_lo b_lo is ~2^-22 relative,
// so the result is float32-accurate (train-mode BatchNorm magnifies plain tf32's 2^-11).

constexpr int kMmaRows = 16;
constexpr int kSub = 2;
constexpr int kMmaCols = 8 * kSub;

DG_HD int frag_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
DG_HD int frag_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// Row stride of a shared-memory mma operand with n columns: n rounded up to 4 mod 8, so
// the 8 rows x 4 columns a fragment load touches fall in 32 different banks.
DG_HD int mma_stride(int n) { return n + ((12 - n % 8) % 8); }

// Round to tf32 (10 mantissa bits), to nearest with ties away from zero: cvt.rna.tf32.f32.
DG_HD float tf32_round(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return __uint_as_float(r);
#else
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // Inf and NaN stay
  memcpy(&v, &u, sizeof(u));
  return v;
#endif
}

DG_HD void tf32_split(float v, float* hi, float* lo) {
  *hi = tf32_round(v);
  *lo = tf32_round(v - *hi);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// c += a b on one m16n8k8 block. volatile: the compiler must not move it into lane-divergent code.
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// out[s][i] = sum over k < depth of A[r * lda + k] * B[k * ldb + c] (times 1 + bscale[k]
// when bscale is given) for r = frag_row(lane, i), c = 8 s + frag_col(lane, i); rows
// r >= rows of A and columns c >= cols of B read as zero. A is float32 in shared memory
// (lda as mma_stride gives), B float32 in global memory. All 32 lanes of a warp call it
// together with the same arguments but lane.
DG_HD void mma_block(const float* A, int lda, int rows, const float* B, int ldb, int cols, const float* bscale,
                     int depth, int lane, float (&out)[kSub][4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int g = lane >> 2, t = lane & 3;
  const float* a_top = A + g * lda;  // rows g and g + 8 of the block
  const float* a_bot = a_top + 8 * lda;
  const bool top = g < rows, bot = g + 8 < rows;
  float big[kSub][4] = {}, small[kSub][4] = {};
  for (int k0 = 0; k0 < depth; k0 += 8) {
    const int k_lo = k0 + t, k_hi = k_lo + 4;  // the lane's two k of this step
    const bool in_lo = k_lo < depth, in_hi = k_hi < depth;
    const float av[4] = {top && in_lo ? a_top[k_lo] : 0.f, bot && in_lo ? a_bot[k_lo] : 0.f,
                         top && in_hi ? a_top[k_hi] : 0.f, bot && in_hi ? a_bot[k_hi] : 0.f};
    uint32_t ah[4], al[4];
    DG_UNROLL
    for (int e = 0; e < 4; ++e) {
      float h, l;
      tf32_split(av[e], &h, &l);
      ah[e] = __float_as_uint(h);
      al[e] = __float_as_uint(l);
    }
    const float s_lo = bscale && in_lo ? 1.f + __ldg(bscale + k_lo) : 1.f;
    const float s_hi = bscale && in_hi ? 1.f + __ldg(bscale + k_hi) : 1.f;
    DG_UNROLL
    for (int s = 0; s < kSub; ++s) {
      const int c = 8 * s + g;
      const bool in_c = c < cols;
      float h0, l0, h1, l1;
      tf32_split(in_lo && in_c ? __ldg(B + k_lo * ldb + c) * s_lo : 0.f, &h0, &l0);
      tf32_split(in_hi && in_c ? __ldg(B + k_hi * ldb + c) * s_hi : 0.f, &h1, &l1);
      mma_tf32(small[s], al, __float_as_uint(h0), __float_as_uint(h1));
      mma_tf32(small[s], ah, __float_as_uint(l0), __float_as_uint(l1));
      mma_tf32(big[s], ah, __float_as_uint(h0), __float_as_uint(h1));
    }
  }
  DG_UNROLL
  for (int s = 0; s < kSub; ++s) {
    DG_UNROLL
    for (int i = 0; i < 4; ++i) out[s][i] = big[s][i] + small[s][i];
  }
#else
  // The lane's elements one by one, with the device's operand rounding and accumulators.
  for (int s = 0; s < kSub; ++s) {
    for (int i = 0; i < 4; ++i) {
      const int r = frag_row(lane, i), c = 8 * s + frag_col(lane, i);
      float big = 0.f, small = 0.f;
      if (r < rows && c < cols) {
        for (int k = 0; k < depth; ++k) {
          const float bv = bscale ? B[static_cast<int64_t>(k) * ldb + c] * (1.f + bscale[k])
                                  : B[static_cast<int64_t>(k) * ldb + c];
          float ah, al, bh, bl;
          tf32_split(A[static_cast<int64_t>(r) * lda + k], &ah, &al);
          tf32_split(bv, &bh, &bl);
          small += al * bh;
          small += ah * bl;
          big += ah * bh;
        }
      }
      out[s][i] = big + small;
    }
  }
#endif
}

// Sums part (the lane's values for columns 8 s + 2 (lane % 4) + e) over the 8 lanes that
// hold the same columns, in order of lane / 4, through the warp's scratch[kMmaCols]; the
// last of them writes out[c] for c < cols. Called by all 32 lanes.
template <typename T>
DG_HD void sum_columns_over_lanes(const T (&part)[kSub][2], T* scratch, int lane, T* out, int cols) {
  const int g = lane >> 2, t = lane & 3;
  for (int step = 0; step < 8; ++step) {
    if (g == step) {
      DG_UNROLL
      for (int s = 0; s < kSub; ++s) {
        DG_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int c = 8 * s + 2 * t + e;
          const T v = step == 0 ? part[s][e] : scratch[c] + part[s][e];
          if (step < 7) {
            scratch[c] = v;
          } else if (c < cols) {
            out[c] = v;
          }
        }
      }
    }
    DG_SYNCWARP();
  }
}

// ---------------------------------------------------------------- tiles

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

// Row strides of the shared mma operands: x1 / xm / y [BT, C], P [BT, K], h [BT, H].
DG_HD int x_stride(const TileArgs& a) { return mma_stride(a.C); }
DG_HD int p_stride(const TileArgs& a) { return mma_stride(a.K); }
DG_HD int h_stride(const TileArgs& a) { return mma_stride(a.H); }

// Per-warp scratch of the column sums (sum_columns_over_lanes), in floats.
constexpr int kColumnScratchFloats = kBlockWarps * kMmaCols;

// Shared floats each pass needs for a tile of bt tokens.
DG_HD int64_t channel_shared_floats(const TileArgs& a, int bt) {
  return int64_t(bt) * (x_stride(a) + p_stride(a)) + kColumnScratchFloats;
}
DG_HD int64_t bottleneck_shared_floats(const TileArgs& a, int bt) {
  return int64_t(bt) * (x_stride(a) + p_stride(a) + a.Ch + a.H + 1);
}
DG_HD int64_t moments_shared_floats(const TileArgs& a, int bt) {
  return int64_t(bt) * h_stride(a) + 2 * 2 * kColumnScratchFloats;  // sums of u and u^2 in double
}
DG_HD int64_t output_shared_floats(const TileArgs& a, int bt) { return int64_t(bt) * (h_stride(a) + a.C); }

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

DG_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

// SPEC.md step 3 on a tile: xs <- x1 = x + gate_av softmax(x R^T) R (xs: [rows, C] with
// row stride x_stride, P: [rows, K] with row stride p_stride, both shared). Ends synchronised.
template <typename scalar_t>
DG_HD void prompt_tile(const TileArgs& a, const TileIndex& t, float* xs, float* P) {
  const int C = a.C, K = a.K, rows = t.rows, lx = x_stride(a), lp = p_stride(a);
  const scalar_t* x = static_cast<const scalar_t*>(a.x) + t.row0 * C;
  DG_FOR(i, rows * C) xs[(i / C) * lx + i % C] = static_cast<float>(x[i]);
  DG_SYNC();
  const float* Rt = a.Rt + static_cast<int64_t>(t.f) * C * K;
  const float* R = a.R + static_cast<int64_t>(t.f) * K * C;
  const int row_blocks = ceil_div(rows, kMmaRows);
  const int kb = ceil_div(K, kMmaCols), cb = ceil_div(C, kMmaCols);
  DG_WARP_FOR(w, row_blocks * kb) {  // logits x R^T
    const int r0 = (w / kb) * kMmaRows, n0 = (w % kb) * kMmaCols;
    DG_LANE_FOR(lane) {
      float acc[kSub][4];
      mma_block(xs + r0 * lx, lx, rows - r0, Rt + n0, K, K - n0, nullptr, C, lane, acc);
      DG_UNROLL
      for (int s = 0; s < kSub; ++s) {
        DG_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int r = r0 + frag_row(lane, i), k = n0 + 8 * s + frag_col(lane, i);
          if (r < rows && k < K) P[r * lp + k] = acc[s][i];
        }
      }
    }
  }
  DG_SYNC();
  DG_FOR(r, rows) softmax_row(P + r * lp, K);
  DG_SYNC();
  const float gav = a.gav[0];
  DG_WARP_FOR(w, row_blocks * cb) {  // x1 = x + gate_av P R (each item owns its elements of xs)
    const int r0 = (w / cb) * kMmaRows, n0 = (w % cb) * kMmaCols;
    DG_LANE_FOR(lane) {
      float acc[kSub][4];
      mma_block(P + r0 * lp, lp, rows - r0, R + n0, C, C - n0, nullptr, K, lane, acc);
      DG_UNROLL
      for (int s = 0; s < kSub; ++s) {
        DG_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int r = r0 + frag_row(lane, i), c = n0 + 8 * s + frag_col(lane, i);
          if (r < rows && c < C) xs[r * lx + c] += gav * acc[s][i];
        }
      }
    }
  }
  DG_SYNC();
}

// Pass 1 (channel): per tile, the token sums of qv1 = relu(x1 W1^T + b1). A warp item is a
// block of kMmaCols columns over all rows, so its column sums need no other warp.
template <typename scalar_t>
DG_HD void channel_tile(const TileArgs& a, int64_t item, float* smem) {
  const TileIndex t = tile_index(a, item);
  const int C = a.C, lx = x_stride(a), rows = t.rows;
  float* xs = smem;
  float* P = xs + static_cast<int64_t>(a.BT) * lx;
  float* scratch = P + static_cast<int64_t>(a.BT) * p_stride(a);  // [kBlockWarps, kMmaCols]
  prompt_tile<scalar_t>(a, t, xs, P);
  DG_WARP_FOR(w, ceil_div(C, kMmaCols)) {
    const int n0 = w * kMmaCols;
    DG_LANE_FOR(lane) {
      float part[kSub][2] = {};
      for (int r0 = 0; r0 < rows; r0 += kMmaRows) {
        float acc[kSub][4];
        mma_block(xs + r0 * lx, lx, rows - r0, a.W1t + n0, C, C - n0, nullptr, C, lane, acc);
        DG_UNROLL
        for (int s = 0; s < kSub; ++s) {
          DG_UNROLL
          for (int i = 0; i < 4; ++i) {
            const int r = r0 + frag_row(lane, i), c = n0 + 8 * s + frag_col(lane, i);
            if (r < rows && c < C) part[s][i & 1] += relu(acc[s][i] + a.b1[c]);
          }
        }
      }
      sum_columns_over_lanes(part, scratch + DG_WARP_ID() * kMmaCols, lane, a.colsum_part + t.item * C + n0,
                             C - n0);
    }
  }
}

// Pass 2 (bottleneck): spatial logit s, modulation, ln_before, down projection z (and
// bn1's per-tile sums in training).
template <typename scalar_t>
DG_HD void bottleneck_tile(const TileArgs& a, int64_t item, float* smem) {
  const TileIndex t = tile_index(a, item);
  const int C = a.C, Ch = a.Ch, H = a.H, rows = t.rows, BT = a.BT, lx = x_stride(a);
  float* xs = smem;                 // [BT, lx]: x1, then xm, then y
  float* P = xs + BT * lx;          // [BT, p_stride]
  float* v = P + BT * p_stride(a);  // [BT, Ch]: relu(qv2) * qa2 * w_s
  float* zs = v + BT * Ch;          // [BT, H]
  float* srow = zs + BT * H;        // [BT]
  prompt_tile<scalar_t>(a, t, xs, P);
  const float* ch = a.ch + static_cast<int64_t>(t.f) * C;
  const float* w2q = a.w2q + static_cast<int64_t>(t.f) * Ch;
  const int row_blocks = ceil_div(rows, kMmaRows);
  const int hb = ceil_div(Ch, kMmaCols);
  DG_WARP_FOR(w, row_blocks * hb) {  // qv2 = relu((x1 (1 + ch)) W2^T + b2), times qa2 w_s
    const int r0 = (w / hb) * kMmaRows, n0 = (w % hb) * kMmaCols;
    DG_LANE_FOR(lane) {
      float acc[kSub][4];
      mma_block(xs + r0 * lx, lx, rows - r0, a.W2t + n0, Ch, Ch - n0, ch, C, lane, acc);
      DG_UNROLL
      for (int s = 0; s < kSub; ++s) {
        DG_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int r = r0 + frag_row(lane, i), j = n0 + 8 * s + frag_col(lane, i);
          if (r < rows && j < Ch) v[r * Ch + j] = relu(acc[s][i] + a.b2[j]) * w2q[j];
        }
      }
    }
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
    xs[r * lx + c] *= modulation_scale(ch[c], modulation_base(srow[r], tg, a.alpha, a.beta, a.gamma), a.alpha);
  }
  DG_SYNC();
  if (a.lnbw) {
    DG_FOR(r, rows) layer_norm_row(xs + r * lx, C, a.lnbw, a.lnbb, a.eps_b);
    DG_SYNC();
  }
  const int zb = ceil_div(a.Hg, kMmaCols), per_row_block = a.G * zb;
  DG_WARP_FOR(w, row_blocks * per_row_block) {  // z = grouped_linear(y, down_sampler)
    const int r0 = (w / per_row_block) * kMmaRows, grp = (w % per_row_block) / zb, n0 = (w % zb) * kMmaCols;
    const float* Wd = a.WdT + static_cast<int64_t>(grp) * a.Cg * a.Hg;
    DG_LANE_FOR(lane) {
      float acc[kSub][4];
      mma_block(xs + r0 * lx + grp * a.Cg, lx, rows - r0, Wd + n0, a.Hg, a.Hg - n0, nullptr, a.Cg, lane, acc);
      DG_UNROLL
      for (int s = 0; s < kSub; ++s) {
        DG_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int r = r0 + frag_row(lane, i), hj = n0 + 8 * s + frag_col(lane, i);
          if (r < rows && hj < a.Hg) {
            const int j = grp * a.Hg + hj;
            zs[r * H + j] = acc[s][i];
            a.z[(t.row0 + r) * H + j] = acc[s][i];
          }
        }
      }
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

// h = relu(bn1(z)) of a tile into hs [rows, H] with row stride h_stride. Ends synchronised.
DG_HD void hidden_tile(const TileArgs& a, const TileIndex& t, float* hs) {
  const int H = a.H, lh = h_stride(a);
  const float* z = a.z + t.row0 * H;
  DG_FOR(i, t.rows * H) {
    const int j = i % H;
    hs[(i / H) * lh + j] = relu(z[i] * a.sc1[j] + a.sh1[j]);
  }
  DG_SYNC();
}

// Pass 3 (moments, training with BatchNorm): per tile, sums of u = up(h) and u^2. A warp
// item is a block of kMmaCols columns of one group over all rows.
DG_HD void moments_tile(const TileArgs& a, int64_t item, float* smem) {
  const TileIndex t = tile_index(a, item);
  const int C = a.C, lh = h_stride(a), rows = t.rows;
  float* hs = smem;
  // [kBlockWarps, 2, kMmaCols] doubles; a.BT * lh is even (lh is 4 mod 8), so 8-byte aligned
  double* scratch = reinterpret_cast<double*>(hs + static_cast<int64_t>(a.BT) * lh);
  hidden_tile(a, t, hs);
  const int ub = ceil_div(a.Cog, kMmaCols);
  DG_WARP_FOR(w, a.G * ub) {
    const int grp = w / ub, n0 = (w % ub) * kMmaCols;
    const float* Wu = a.WuT + static_cast<int64_t>(grp) * a.Hg * a.Cog;
    DG_LANE_FOR(lane) {
      double s1[kSub][2] = {}, s2[kSub][2] = {};
      for (int r0 = 0; r0 < rows; r0 += kMmaRows) {
        float acc[kSub][4];
        mma_block(hs + r0 * lh + grp * a.Hg, lh, rows - r0, Wu + n0, a.Cog, a.Cog - n0, nullptr, a.Hg, lane, acc);
        DG_UNROLL
        for (int s = 0; s < kSub; ++s) {
          DG_UNROLL
          for (int i = 0; i < 4; ++i) {
            const int r = r0 + frag_row(lane, i);
            if (r < rows) {  // columns past Cog hold zeros and are not written
              s1[s][i & 1] += acc[s][i];
              s2[s][i & 1] += static_cast<double>(acc[s][i]) * acc[s][i];
            }
          }
        }
      }
      double* ws = scratch + DG_WARP_ID() * 2 * kMmaCols;
      const int64_t j0 = t.item * 2 * C + grp * a.Cog + n0;
      sum_columns_over_lanes(s1, ws, lane, a.usums + j0, a.Cog - n0);
      sum_columns_over_lanes(s2, ws + kMmaCols, lane, a.usums + j0 + C, a.Cog - n0);
    }
  }
}

// Pass 4 (output): o = gate * ln_post(bn2(up(relu(bn1(z))))) in x's dtype.
template <typename scalar_t>
DG_HD void output_tile(const TileArgs& a, int64_t item, float* smem) {
  const TileIndex t = tile_index(a, item);
  const int C = a.C, rows = t.rows, lh = h_stride(a);
  float* hs = smem;                                    // [BT, lh]
  float* us = smem + static_cast<int64_t>(a.BT) * lh;  // [BT, C]
  hidden_tile(a, t, hs);
  const int ub = ceil_div(a.Cog, kMmaCols), per_row_block = a.G * ub;
  DG_WARP_FOR(w, ceil_div(rows, kMmaRows) * per_row_block) {
    const int r0 = (w / per_row_block) * kMmaRows, grp = (w % per_row_block) / ub, n0 = (w % ub) * kMmaCols;
    const float* Wu = a.WuT + static_cast<int64_t>(grp) * a.Hg * a.Cog;
    DG_LANE_FOR(lane) {
      float acc[kSub][4];
      mma_block(hs + r0 * lh + grp * a.Hg, lh, rows - r0, Wu + n0, a.Cog, a.Cog - n0, nullptr, a.Hg, lane, acc);
      DG_UNROLL
      for (int s = 0; s < kSub; ++s) {
        DG_UNROLL
        for (int i = 0; i < 4; ++i) {
          const int r = r0 + frag_row(lane, i), cj = n0 + 8 * s + frag_col(lane, i);
          if (r < rows && cj < a.Cog) {
            const int j = grp * a.Cog + cj;
            us[r * C + j] = acc[s][i] * a.sc2[j] + a.sh2[j];
          }
        }
      }
    }
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
