"""Backward of the three attentions over the tokens: spatial, channel and prompt (SPEC.md steps 3, 5, 6).

What the backward has by then (backward.py): dx1 [F, N, C] float32 from the modulation
backward, d s [F, N] (the spatial logit's gradient, PyTorch from [F, N] sums) and the
frame vectors. Both attention layers are a relu of a token x weight product whose
gradient is a per-frame vector times the relu's mask,

  d v2[n, o] = d s[n] * (w_s * qa2)[o] * (pre2[n, o] > 0)    pre2 = xc W_video_2^T + b, xc = x1 (1 + ch)
  d v1[n, o] = (d joint * qa1 / N)[o] * (pre1[n, o] > 0)     pre1 = x1 W_video_1^T + b

so what the later kernels need of the recomputed products is one bit per element: the
masks are written as int8 (1 byte, exact) instead of d v2, d v1 or v2, v1 in float32.
Five kernels, six launches, in this order:

  attention_masks     grid (F, N blocks). Recomputes x1 (its prompt probabilities are
                      written [F, N, K] float32 for every kernel after it), pre2 and pre1
                      per block of outputs, writes both masks, and per token block the
                      token sums of d s * v2 (for d w_s and d qa2) and of v1 (for d qa1).
  attention_weight_grad, for W_video_2 and its bias (see below)
  spatial_backward    grid (F, N blocks). d xc = d v2 W_video_2 per block of channels (d v2
                      rebuilt from mask2, d s and w_s qa2), dx1 += d xc (1 + ch) in place,
                      and per token block the token sums of d xc * x1 (for d ch).
                      -- PyTorch, [F, C]: d ch -> the channel MLP's backward -> d joint
  attention_weight_grad, for W_video_1 and its bias
  channel_backward    grid (F, N blocks). dx1 += d v1 W_video_1 in place (d v1 from mask1):
                      the final dx1. With each of its [BN, BK] blocks still on chip it
                      accumulates dx1 R^T, then the softmax backward over the K prompt
                      tokens gives d logits, written [F, N, K] float32.
  prompt_backward     grid (F, C blocks), each program over all of its frame's tokens:
                      dx = dx1 + d logits R (written, x's dtype), and on chip the frame's
                      d R = gate_av probs^T dx1 + d logits^T x [K, C] and its part of
                      d gate_av = <probs^T dx1, R>. No partials: each (frame, channel
                      block) has one program.

attention_weight_grad is a split-K reduction over all F*N tokens, grid (out blocks,
channel blocks, SPLIT): program (o, c, s) runs through the token blocks s*per ..
(s+1)*per - 1 in frame-major order (a block never straddles frames; a split may) and
accumulates d W^T = xc^T d v in one [BK, BO] float32 accumulator, d v rebuilt from the
mask and the frame scales. x1 is not formed: x1^T d v = x^T d v + gate_av R^T (probs^T d v),
so per token block d v meets two loaded tiles, x^T and probs^T, and per frame the
[K, BO] sum probs^T d v meets that frame's R (and ch's gain (1 + ch) scales the channel
side). Each program writes its partial [SPLIT, out, C]; the channel-block-0 programs also
write the column sums of d v, the bias gradient, [SPLIT, out]. The host adds the SPLIT
partials in index order: deterministic, no atomics. SPLIT (the Launch's grid) gives about
WEIGHT_GRAD_PROGRAMS programs (a few waves on 132 SMs); at the AVE shapes, F = 80, the
partials are 2.4-4.7 MB per weight (9.4 MB, SPLIT 1, for s4-visual's W_video_1).

Every per-frame sum is a per-token-block partial ([F, blocks, C] float32) that the host
adds in a fixed order. Token-sized traffic: x is read by every kernel (its own dtype);
dx1 is read and rewritten twice in place and read once more; the int8 masks [F, N, C/2]
and [F, N, C] are written once and read twice; probs and d logits [F, N, K] float32; dx
is written once. No [F, N, C] float32 temporary is created here.

Precision: every product runs with float32 operands (3xTF32), none in the input dtype.
pre1 and pre2 are not only masks: v2 and v1 enter d w_s, d qa2 and d qa1, and with the
forward's bf16 operands (x1 rounded) the bf16 d w_s error against float64 grew from 9.1e-3
(float32, as the PyTorch code this replaces) to 1.4e-2 of the 2e-2 bound, d W_video_1's
from 3.6e-3 to 8.7e-3; in float32 every gradient's error is the PyTorch code's. The other
products have a gradient operand (no fixed scale: fp16 would flush small ones, and
d logits comes from a cancelling softmax backward) or the prompt tokens R (float32 in the
forward too). Tiles (tiling.py) keep the reduced axis of each product at 16-32: 3xTF32
holds both TF32 halves of each operand in registers.
"""
import torch
import triton
import triton.language as tl

from .common import interpreting, matmul, prompt_probabilities, relu, x1_columns, x1_times_weight
from .plan import Launch
from .tiling import Shape, latents_block, tiles

WEIGHT_GRAD_PROGRAMS = 512  # target grid size of a weight gradient (SPLIT = this / output tiles)
# under the CPU interpreter (tests): few programs, so a split holds several token blocks and
# its range crosses frame boundaries (the parity tests' F4-N24 case: 3 blocks per split)
INTERPRETER_WEIGHT_GRAD_PROGRAMS = 3


@triton.jit
def _load_rows(ptr, f, rows, row_mask, N, width, cols, col_mask):
    """ptr[f, rows, cols] of a [F, N, width] tensor as float32, 0 outside the masks."""
    return tl.load(ptr + (f * N + rows)[:, None] * width + cols[None, :],
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def attention_masks_kernel(x_ptr, r_ptr, gate_av_ptr, ch_ptr, w2_ptr, b2_ptr, w1_ptr, b1_ptr, ds_ptr,
                           probs_ptr, mask2_ptr, mask1_ptr, t_ptr, v1_ptr,
                           N, C, K, HALF, token_blocks,
                           BN: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, KP: tl.constexpr,
                           INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    nb = tl.program_id(1)
    rows = nb * BN + tl.arange(0, BN)
    row_mask = rows < N
    x_frame = x_ptr + f * N * C
    r_frame = r_ptr + f * K * C
    ch_frame = ch_ptr + f * C
    gate_av = tl.load(gate_av_ptr).to(tl.float32)
    probs = prompt_probabilities(x_frame, r_frame, rows, row_mask, C, K, BN, BK, KP, tl.float32, INTERPRET)
    ks = tl.arange(0, KP)
    tl.store(probs_ptr + (f * N + rows)[:, None] * K + ks[None, :], probs,
             mask=row_mask[:, None] & (ks < K)[None, :])
    d_s = tl.load(ds_ptr + f * N + rows, mask=row_mask, other=0.0)
    partial = f * token_blocks + nb

    # spatial layer: mask2 = pre2 > 0, and the token sum of d s * v2
    for o0 in range(0, HALF, BO):
        outs = o0 + tl.arange(0, BO)
        out_mask = outs < HALF
        pre = x1_times_weight(x_frame, r_frame, probs, gate_av, ch_frame, w2_ptr, rows, row_mask, outs, out_mask,
                          C, K, BN, BK, BO, KP, True, tl.float32, INTERPRET)
        pre += tl.load(b2_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
        mask = row_mask[:, None] & out_mask[None, :]
        tl.store(mask2_ptr + (f * N + rows)[:, None] * HALF + outs[None, :], (pre > 0.0).to(tl.int8), mask=mask)
        v2 = tl.where(mask, relu(pre), 0.0)
        tl.store(t_ptr + partial * HALF + outs, tl.sum(v2 * d_s[:, None], 0), mask=out_mask)

    # channel layer: mask1 = pre1 > 0, and the token sum of v1
    for o0 in range(0, C, BO):
        outs = o0 + tl.arange(0, BO)
        out_mask = outs < C
        pre = x1_times_weight(x_frame, r_frame, probs, gate_av, ch_frame, w1_ptr, rows, row_mask, outs, out_mask,
                          C, K, BN, BK, BO, KP, False, tl.float32, INTERPRET)
        pre += tl.load(b1_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
        mask = row_mask[:, None] & out_mask[None, :]
        tl.store(mask1_ptr + (f * N + rows)[:, None] * C + outs[None, :], (pre > 0.0).to(tl.int8), mask=mask)
        tl.store(v1_ptr + partial * C + outs, tl.sum(tl.where(mask, relu(pre), 0.0), 0),
                 mask=out_mask)


@triton.jit
def _masked_product(mask_ptr, scale_ptr, w_ptr, f, rows, row_mask, cols, col_mask, N, C, OUT,
                    BN: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, INTERPRET: tl.constexpr):
    """(scale[f] * mask[f, rows]) @ W[:, cols] over all OUT outputs: [BN, BK] float32 (3xTF32)."""
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for o0 in range(0, OUT, BO):
        outs = o0 + tl.arange(0, BO)
        out_mask = outs < OUT
        relu_mask = _load_rows(mask_ptr, f, rows, row_mask, N, OUT, outs, out_mask)
        scale = tl.load(scale_ptr + f * OUT + outs, mask=out_mask, other=0.0)
        w = tl.load(w_ptr + outs[:, None] * C + cols[None, :], mask=out_mask[:, None] & col_mask[None, :],
                    other=0.0)
        acc += matmul(relu_mask * scale[None, :], w, tl.float32, INTERPRET)
    return acc


@triton.jit
def spatial_backward_kernel(x_ptr, r_ptr, gate_av_ptr, ch_ptr, w2_ptr, ds_ptr, scale_ptr, probs_ptr, mask2_ptr,
                            dx1_ptr, dch_ptr, N, C, K, HALF, token_blocks,
                            BN: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, KP: tl.constexpr,
                            INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    nb = tl.program_id(1)
    rows = nb * BN + tl.arange(0, BN)
    row_mask = rows < N
    ks = tl.arange(0, KP)
    x_frame = x_ptr + f * N * C
    r_frame = r_ptr + f * K * C
    gate_av = tl.load(gate_av_ptr).to(tl.float32)
    probs = _load_rows(probs_ptr, f, rows, row_mask, N, K, ks, ks < K)
    d_s = tl.load(ds_ptr + f * N + rows, mask=row_mask, other=0.0)
    for c0 in range(0, C, BK):
        cols = c0 + tl.arange(0, BK)
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        d_xc = d_s[:, None] * _masked_product(mask2_ptr, scale_ptr, w2_ptr, f, rows, row_mask, cols, col_mask,
                                              N, C, HALF, BN, BK, BO, INTERPRET)
        x1 = x1_columns(x_frame, r_frame, probs, gate_av, rows, row_mask, cols, col_mask, C, K, KP,
                        tl.float32, INTERPRET)
        gain = 1.0 + tl.load(ch_ptr + f * C + cols, mask=col_mask, other=0.0)
        offsets = (f * N + rows)[:, None] * C + cols[None, :]
        d_x1 = tl.load(dx1_ptr + offsets, mask=mask, other=0.0)
        tl.store(dx1_ptr + offsets, d_x1 + d_xc * gain[None, :], mask=mask)
        tl.store(dch_ptr + (f * token_blocks + nb) * C + cols, tl.sum(tl.where(mask, d_xc * x1, 0.0), 0),
                 mask=col_mask)


@triton.jit
def channel_backward_kernel(r_ptr, gate_av_ptr, w1_ptr, scale_ptr, probs_ptr, mask1_ptr, dx1_ptr, dlogits_ptr,
                            N, C, K,
                            BN: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, KP: tl.constexpr,
                            INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    nb = tl.program_id(1)
    rows = nb * BN + tl.arange(0, BN)
    row_mask = rows < N
    ks = tl.arange(0, KP)
    k_mask = ks < K
    d_scores = tl.zeros((BN, KP), dtype=tl.float32)  # dx1 R^T
    for c0 in range(0, C, BK):
        cols = c0 + tl.arange(0, BK)
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = (f * N + rows)[:, None] * C + cols[None, :]
        d_x1 = tl.load(dx1_ptr + offsets, mask=mask, other=0.0) \
            + _masked_product(mask1_ptr, scale_ptr, w1_ptr, f, rows, row_mask, cols, col_mask, N, C, C,
                              BN, BK, BO, INTERPRET)
        tl.store(dx1_ptr + offsets, d_x1, mask=mask)
        r = tl.load(r_ptr + (f * K + ks)[:, None] * C + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                    other=0.0)
        d_scores += matmul(d_x1, tl.trans(r), tl.float32, INTERPRET)
    # x1 = x + gate_av softmax(x R^T) R: the softmax's backward over the K prompt tokens
    probs = _load_rows(probs_ptr, f, rows, row_mask, N, K, ks, k_mask)
    d_probs = tl.load(gate_av_ptr).to(tl.float32) * d_scores
    d_logits = probs * (d_probs - tl.sum(probs * d_probs, 1)[:, None])
    tl.store(dlogits_ptr + (f * N + rows)[:, None] * K + ks[None, :], d_logits,
             mask=row_mask[:, None] & k_mask[None, :])


@triton.jit
def prompt_backward_kernel(x_ptr, r_ptr, gate_av_ptr, probs_ptr, dlogits_ptr, dx1_ptr, dx_ptr, dr_ptr, gate_ptr,
                           N, C, K,
                           BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr, INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BK + tl.arange(0, BK)
    col_mask = cols < C
    ks = tl.arange(0, KP)
    k_mask = ks < K
    r = tl.load(r_ptr + (f * K + ks)[:, None] * C + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                other=0.0)
    d_mix = tl.zeros((KP, BK), dtype=tl.float32)  # probs^T dx1
    d_keys = tl.zeros((KP, BK), dtype=tl.float32)  # d logits^T x
    for n0 in range(0, N, BN):
        rows = n0 + tl.arange(0, BN)
        row_mask = rows < N
        mask = row_mask[:, None] & col_mask[None, :]
        probs = _load_rows(probs_ptr, f, rows, row_mask, N, K, ks, k_mask)
        d_logits = _load_rows(dlogits_ptr, f, rows, row_mask, N, K, ks, k_mask)
        d_x1 = _load_rows(dx1_ptr, f, rows, row_mask, N, C, cols, col_mask)
        x = _load_rows(x_ptr, f, rows, row_mask, N, C, cols, col_mask)
        d_x = d_x1 + matmul(d_logits, r, tl.float32, INTERPRET)
        tl.store(dx_ptr + (f * N + rows)[:, None] * C + cols[None, :], d_x.to(dx_ptr.dtype.element_ty),
                 mask=mask)
        d_mix += matmul(tl.trans(probs), d_x1, tl.float32, INTERPRET)
        d_keys += matmul(tl.trans(d_logits), x, tl.float32, INTERPRET)
    gate_av = tl.load(gate_av_ptr).to(tl.float32)
    tl.store(dr_ptr + (f * K + ks)[:, None] * C + cols[None, :], gate_av * d_mix + d_keys,
             mask=k_mask[:, None] & col_mask[None, :])
    tl.store(gate_ptr + f * tl.num_programs(1) + cb, tl.sum(tl.sum(d_mix * r, 1), 0))


@triton.jit
def attention_weight_grad_kernel(x_ptr, r_ptr, gate_av_ptr, gain_ptr, probs_ptr, mask_ptr, row_scale_ptr,
                                 col_scale_ptr, dw_ptr, db_ptr, N, C, K, OUT, token_blocks, total_blocks,
                                 blocks_per_split,
                                 BN: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, KP: tl.constexpr,
                                 CHANNEL_GAIN: tl.constexpr, ROW_SCALE: tl.constexpr, INTERPRET: tl.constexpr):
    """d W[outs, cols] over token blocks split*per .. (split+1)*per - 1 (frame-major order).

    With x1 = x + gate_av probs R, x1^T d v = x^T d v + gate_av R^T (probs^T d v): per token
    block the one operand d v [BN, BO] meets two loaded, transposed tiles (x^T and probs^T),
    and once per frame the [K, BO] product probs^T d v meets that frame's R. x1 is never
    formed. The accumulator is d W^T [BK, BO].
    """
    ob = tl.program_id(0)
    cb = tl.program_id(1)
    split = tl.program_id(2)
    outs = ob * BO + tl.arange(0, BO)
    out_mask = outs < OUT
    cols = cb * BK + tl.arange(0, BK)
    col_mask = cols < C
    ks = tl.arange(0, KP)
    k_mask = ks < K
    gate_av = tl.load(gate_av_ptr).to(tl.float32)
    acc = tl.zeros((BK, BO), dtype=tl.float32)
    bias = tl.zeros((BO,), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, total_blocks)
    for f in range(first // token_blocks, (last + token_blocks - 1) // token_blocks):
        gain = tl.full((BK,), 1.0, dtype=tl.float32)
        if CHANNEL_GAIN:  # xc = x1 (1 + ch): a per-frame scale of the channels
            gain = 1.0 + tl.load(gain_ptr + f * C + cols, mask=col_mask, other=0.0)
        col_scale = tl.load(col_scale_ptr + f * OUT + outs, mask=out_mask, other=0.0)
        d_mix = tl.zeros((KP, BO), dtype=tl.float32)  # probs^T d v over this frame's blocks
        for nb in range(tl.maximum(first - f * token_blocks, 0),
                        tl.minimum(last - f * token_blocks, token_blocks)):
            rows = nb * BN + tl.arange(0, BN)
            row_mask = rows < N
            d_v = _load_rows(mask_ptr, f, rows, row_mask, N, OUT, outs, out_mask) * col_scale[None, :]
            if ROW_SCALE:
                d_v = d_v * tl.load(row_scale_ptr + f * N + rows, mask=row_mask, other=0.0)[:, None]
            x_t = tl.load(x_ptr + (f * N + rows)[None, :] * C + cols[:, None],
                          mask=col_mask[:, None] & row_mask[None, :], other=0.0).to(tl.float32)
            acc += matmul(x_t * gain[:, None], d_v, tl.float32, INTERPRET)
            probs_t = tl.load(probs_ptr + (f * N + rows)[None, :] * K + ks[:, None],
                              mask=k_mask[:, None] & row_mask[None, :], other=0.0)
            d_mix += matmul(probs_t, d_v, tl.float32, INTERPRET)
            bias += tl.sum(d_v, 0)
        r_t = tl.load(r_ptr + (f * K + ks)[None, :] * C + cols[:, None], mask=col_mask[:, None] & k_mask[None, :],
                      other=0.0)
        acc += matmul(r_t * (gate_av * gain)[:, None], d_mix, tl.float32, INTERPRET)
    tl.store(dw_ptr + (split * OUT + outs)[None, :] * C + cols[:, None], acc,
             mask=col_mask[:, None] & out_mask[None, :])
    tl.store(db_ptr + split * OUT + outs, bias, mask=out_mask & (cb == 0))


# ---------------------------------------------------------------- launches


def _weight_grad_launch(name, frames, shape: Shape, dtype, arch, outputs, channel_gain) -> Launch:
    tokens, dim, latents, itemsize = shape.tokens, shape.dim, shape.latents, dtype.itemsize
    chosen = tiles("attention_weight_grad", shape, dtype, arch)
    bn, bk, bo = chosen["BN"], chosen["BK"], chosen["BO"]
    out_blocks, col_blocks = triton.cdiv(outputs, bo), triton.cdiv(dim, bk)
    total_blocks = frames * triton.cdiv(tokens, bn)
    target = INTERPRETER_WEIGHT_GRAD_PROGRAMS if interpreting() else WEIGHT_GRAD_PROGRAMS
    per = triton.cdiv(total_blocks, max(1, triton.cdiv(target, out_blocks * col_blocks)))
    split = triton.cdiv(total_blocks, per)
    # d v^T x and d v^T probs per token block, (d v^T probs) R per frame and block pair
    mix_flops = 2 * frames * tokens * outputs * latents * col_blocks + 2 * frames * outputs * latents * dim
    return Launch(
        name=name, grid=(out_blocks, col_blocks, split), tiles=chosen,
        # mask (int8), x, the stored probabilities, R, the frame scales (and ch)
        bytes_read=frames * tokens * (outputs + dim * itemsize + latents * 4 + 4)
        + frames * (latents * dim + outputs + (dim if channel_gain else 0)) * 4,
        reread_factor=max(out_blocks, col_blocks),  # x per output block, the mask per column block
        writes={"dW_partials": ((split, outputs, dim), 4), "db_partials": ((split, outputs), 4)},
        host_read=split * outputs * (dim + 1) * 4,
        flops=2 * frames * tokens * outputs * dim + mix_flops,
        split_flops=2 * frames * tokens * outputs * dim + mix_flops)


def attention_backward_launches(frames, shape: Shape, dtype, arch) -> dict[str, Launch]:
    """The six launches of the attention backward, by name, in the order they run."""
    tokens, dim, latents, itemsize = shape.tokens, shape.dim, shape.latents, dtype.itemsize
    half = dim // 2
    f32 = 4
    launches = []

    chosen = tiles("attention_masks", shape, dtype, arch)
    blocks = triton.cdiv(tokens, chosen["BN"])
    out_blocks = triton.cdiv(half, chosen["BO"]) + triton.cdiv(dim, chosen["BO"])
    x_sweeps = 1 + out_blocks  # the probabilities, then x1 once per output block
    prompt_flops = 2 * frames * tokens * dim * latents * x_sweeps
    launches.append(Launch(
        name="attention_masks", grid=(frames, blocks), tiles=chosen,
        bytes_read=frames * tokens * (dim * itemsize + f32) + (half + dim) * (dim + 1) * itemsize
        + frames * (latents + 1) * dim * f32,  # x, d s, W_video_2, W_video_1, biases, R, ch
        reread_factor=x_sweeps,
        writes={"probs": ((frames, tokens, latents), f32), "mask2": ((frames, tokens, half), 1),
                "mask1": ((frames, tokens, dim), 1), "t_partials": ((frames, blocks, half), f32),
                "v1_partials": ((frames, blocks, dim), f32)},
        host_read=frames * blocks * (half + dim) * f32,
        flops=2 * frames * tokens * dim * (half + dim) + prompt_flops,
        split_flops=2 * frames * tokens * dim * (half + dim) + prompt_flops))

    chosen = tiles("spatial_backward", shape, dtype, arch)
    blocks = triton.cdiv(tokens, chosen["BN"])
    flops = 2 * frames * tokens * dim * (half + latents)
    launches.append(Launch(
        name="spatial_backward", grid=(frames, blocks), tiles=chosen,
        # mask2, d s, probs, x, dx1, W_video_2, w_s qa2, R, ch
        bytes_read=frames * tokens * (half + f32 + latents * f32 + dim * (itemsize + f32))
        + half * dim * itemsize + frames * (half + (latents + 1) * dim) * f32,
        reread_factor=triton.cdiv(dim, chosen["BK"]),  # the mask2 tile per column block
        writes={"dx1": ((frames, tokens, dim), f32), "dch_partials": ((frames, blocks, dim), f32)},
        host_read=frames * blocks * dim * f32, flops=flops, split_flops=flops))

    chosen = tiles("channel_backward", shape, dtype, arch)
    blocks = triton.cdiv(tokens, chosen["BN"])
    flops = 2 * frames * tokens * dim * (dim + latents)
    launches.append(Launch(
        name="channel_backward", grid=(frames, blocks), tiles=chosen,
        # mask1, dx1, probs, W_video_1, d joint qa1 / N, R
        bytes_read=frames * tokens * (dim * (1 + f32) + latents * f32) + dim * dim * itemsize
        + frames * (latents + 1) * dim * f32,
        reread_factor=triton.cdiv(dim, chosen["BK"]),  # the mask1 tile per column block
        writes={"dx1": ((frames, tokens, dim), f32), "d_logits": ((frames, tokens, latents), f32)},
        flops=flops, split_flops=flops))

    chosen = tiles("prompt_backward", shape, dtype, arch)
    col_blocks = triton.cdiv(dim, chosen["BK"])
    flops = 6 * frames * tokens * latents * dim
    launches.append(Launch(
        name="prompt_backward", grid=(frames, col_blocks), tiles=chosen,
        # x, dx1, probs and d logits (once per column block, from the cache), R
        bytes_read=frames * tokens * (dim * (itemsize + f32) + 2 * latents * f32) + frames * latents * dim * f32,
        reread_factor=col_blocks,
        writes={"dx": ((frames, tokens, dim), itemsize), "d_prompts": ((frames, latents, dim), f32),
                "gate_partials": ((frames, col_blocks), f32)},
        host_read=frames * (latents * dim + col_blocks) * f32, flops=flops, split_flops=flops))

    launches.append(_weight_grad_launch("weight_grad_video_2", frames, shape, dtype, arch, half, True))
    launches.append(_weight_grad_launch("weight_grad_video_1", frames, shape, dtype, arch, dim, False))
    return {launch.name: launch for launch in launches}


# ---------------------------------------------------------------- runs


def run_attention_masks(launch: Launch, x, prompts, p, ch, d_s, interpret):
    """(probs [F, N, K] float32, mask2 [F, N, C/2] int8, mask1 [F, N, C] int8, the token
    sums of d s * v2 [F, C/2] and of v1 [F, C])."""
    frames, tokens, dim = x.shape
    latents = prompts.shape[1]
    half = dim // 2
    blocks = launch.grid[1]
    f32 = dict(device=x.device, dtype=torch.float32)
    probs = torch.empty(frames, tokens, latents, **f32)
    mask2 = torch.empty(frames, tokens, half, device=x.device, dtype=torch.int8)
    mask1 = torch.empty(frames, tokens, dim, device=x.device, dtype=torch.int8)
    t_parts = torch.empty(frames, blocks, half, **f32)
    v1_parts = torch.empty(frames, blocks, dim, **f32)
    attention_masks_kernel[launch.grid](
        x, prompts, p["gate_av"], ch, p["fc_affine_video_2.weight"], p["fc_affine_video_2.bias"],
        p["fc_affine_video_1.weight"], p["fc_affine_video_1.bias"], d_s, probs, mask2, mask1, t_parts, v1_parts,
        tokens, dim, latents, half, blocks,
        KP=latents_block(latents), INTERPRET=interpret, **launch.tiles)
    return probs, mask2, mask1, t_parts.sum(1), v1_parts.sum(1)


def run_spatial_backward(launch: Launch, x, prompts, p, ch, d_s, spatial_scale, probs, mask2, d_x1, interpret):
    """Adds d xc (1 + ch) to d_x1 in place; returns the token sums of d xc * x1 [F, C]."""
    frames, tokens, dim = x.shape
    blocks = launch.grid[1]
    dch_parts = torch.empty(frames, blocks, dim, device=x.device, dtype=torch.float32)
    spatial_backward_kernel[launch.grid](
        x, prompts, p["gate_av"], ch, p["fc_affine_video_2.weight"], d_s, spatial_scale, probs, mask2, d_x1,
        dch_parts, tokens, dim, prompts.shape[1], dim // 2, blocks,
        KP=latents_block(prompts.shape[1]), INTERPRET=interpret, **launch.tiles)
    return dch_parts.sum(1)


def run_channel_backward(launch: Launch, prompts, p, channel_scale, probs, mask1, d_x1, interpret):
    """Adds d v1 W_video_1 to d_x1 in place (now the final dx1); returns d logits [F, N, K]."""
    frames, tokens, dim = d_x1.shape
    latents = prompts.shape[1]
    d_logits = torch.empty(frames, tokens, latents, device=d_x1.device, dtype=torch.float32)
    channel_backward_kernel[launch.grid](
        prompts, p["gate_av"], p["fc_affine_video_1.weight"], channel_scale, probs, mask1, d_x1, d_logits,
        tokens, dim, latents, KP=latents_block(latents), INTERPRET=interpret, **launch.tiles)
    return d_logits


def run_prompt_backward(launch: Launch, x, prompts, p, probs, d_logits, d_x1, interpret):
    """(dx [F, N, C] in x's dtype, d R [F, K, C] float32, d gate_av [1])."""
    frames, tokens, dim = x.shape
    latents = prompts.shape[1]
    d_x = torch.empty_like(x)
    d_prompts = torch.empty(frames, latents, dim, device=x.device, dtype=torch.float32)
    gate_parts = torch.empty(frames, launch.grid[1], device=x.device, dtype=torch.float32)
    prompt_backward_kernel[launch.grid](
        x, prompts, p["gate_av"], probs, d_logits, d_x1, d_x, d_prompts, gate_parts, tokens, dim, latents,
        KP=latents_block(latents), INTERPRET=interpret, **launch.tiles)
    return d_x, d_prompts, gate_parts.sum().reshape(1)


def run_attention_weight_grad(launch: Launch, x, prompts, p, probs, mask, col_scale, row_scale=None,
                              gain=None, interpret=False):
    """(d W [out, C], d b [out]) of a relu layer whose d v = row_scale[n] col_scale[o] mask[n, o]
    (row_scale 1 if None), with input x1, or x1 (1 + gain) if gain is given."""
    frames, tokens, dim = x.shape
    outputs = mask.shape[-1]
    split = launch.grid[2]
    total_blocks = frames * triton.cdiv(tokens, launch.tiles["BN"])
    d_w = torch.empty(split, outputs, dim, device=x.device, dtype=torch.float32)
    d_b = torch.empty(split, outputs, device=x.device, dtype=torch.float32)
    attention_weight_grad_kernel[launch.grid](
        x, prompts, p["gate_av"], gain if gain is not None else col_scale, probs, mask,
        row_scale if row_scale is not None else col_scale, col_scale, d_w, d_b, tokens, dim, prompts.shape[1],
        outputs, triton.cdiv(tokens, launch.tiles["BN"]), total_blocks, triton.cdiv(total_blocks, split),
        KP=latents_block(prompts.shape[1]), CHANNEL_GAIN=gain is not None, ROW_SCALE=row_scale is not None,
        INTERPRET=interpret, **launch.tiles)
    return d_w.sum(0), d_b.sum(0)
