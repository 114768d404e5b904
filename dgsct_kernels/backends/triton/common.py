"""Triton helpers shared by the token passes: matrix products and the prompt attention.

Every pass recomputes x1 = x + gate_av * softmax(x R^T) R from x and the frame's prompt
tokens R (K rows) instead of reading a stored x1: K is small, so this costs a fraction
of the pass's own products and saves an [F, N, C] round trip. Both products with R run
with float32 operands: a low-precision x1 is magnified by train-mode bn1 downstream.

Every loop over a runtime extent (C, N, H/G, ...) in these kernels comes after
`tl.assume(extent > 0)`. Without it the loop keeps a guard for zero trips, and ptxas laid
out that guard around loops with tensor-core products with a few bytes of spill stores
(seen in python/compile_report.py; every extent is at least 1 here).
"""
import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def dot_dtype(dtype):
    """The tl dtype of a torch floating dtype: the operand type of the passes' products."""
    import torch
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@triton.jit
def relu(v):
    """max(v, 0) that keeps NaN, as torch.relu does: tl.maximum's default drops a NaN
    operand (returns 0 for NaN), which would hide non-finite inputs behind finite outputs."""
    return tl.where(v < 0.0, 0.0, v)


@triton.jit
def stable_sigmoid(s):
    """sigmoid(s) that never overflows, even for |s| ~ 1e4."""
    decay = tl.exp(-tl.abs(s))
    return tl.where(s >= 0, 1.0 / (1.0 + decay), decay / (1.0 + decay))


@triton.jit
def matmul(a, b, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b with float32 accumulation on tensor cores; DOT is the operand dtype.

    DOT float32 means float32 precision is needed: the product runs as 3xTF32 (each
    operand split into a TF32 high part and a TF32 remainder, three tensor-core products),
    which keeps float32's accuracy (about 1e-6 relative) at tensor-core rates. Plain "ieee"
    float32 dots would be FMA loops, and single TF32 (1e-3) is too coarse for bn1.
    """
    if DOT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    elif INTERPRET:
        # the CPU interpreter mis-computes low-precision tl.dot; rounding the operands to
        # DOT and multiplying in float32 gives the same products (exact in float32)
        return tl.dot(a.to(DOT).to(tl.float32), b.to(DOT).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT), b.to(DOT))


@triton.jit
def prompt_probabilities(x_frame, r_frame, rows, row_mask, C, K,
                         BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
                         DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """softmax over the K prompt tokens of x[rows] R^T: [BN, KP] (padding columns are 0)."""
    ks = tl.arange(0, KP)
    tl.assume(C > 0)
    logits = tl.zeros((BN, KP), dtype=tl.float32)
    for c0 in range(0, C, BK):
        cols = c0 + tl.arange(0, BK)
        col_mask = cols < C
        x = tl.load(x_frame + rows[:, None] * C + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        r = tl.load(r_frame + ks[:, None] * C + cols[None, :],
                    mask=(ks[:, None] < K) & col_mask[None, :], other=0.0)
        logits += matmul(x, tl.trans(r), tl.float32, INTERPRET)
    logits = tl.where(ks[None, :] < K, logits, float("-inf"))
    weights = tl.exp(logits - tl.max(logits, 1)[:, None])
    return weights / tl.sum(weights, 1)[:, None]


@triton.jit
def x1_columns(x_frame, r_frame, probs, gate_av, rows, row_mask, cols, col_mask, C, K,
               KP: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """x1[rows, cols] in float32 (SPEC.md step 3)."""
    ks = tl.arange(0, KP)
    x = tl.load(x_frame + rows[:, None] * C + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    r = tl.load(r_frame + ks[:, None] * C + cols[None, :],
                mask=(ks[:, None] < K) & col_mask[None, :], other=0.0)
    return x + gate_av * matmul(probs, r, tl.float32, INTERPRET)


@triton.jit
def x1_times_weight(x_frame, r_frame, probs, gate_av, ch_frame, w_ptr, rows, row_mask, outs, out_mask,
                    C, K, BN: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, KP: tl.constexpr,
                    CHANNEL_GAIN: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """x1 W[outs]^T, or xc W[outs]^T with xc = x1 (1 + ch) if CHANNEL_GAIN: [BN, BO] float32."""
    acc = tl.zeros((BN, BO), dtype=tl.float32)
    tl.assume(C > 0)
    for c0 in range(0, C, BK):
        cols = c0 + tl.arange(0, BK)
        col_mask = cols < C
        x1 = x1_columns(x_frame, r_frame, probs, gate_av, rows, row_mask, cols, col_mask, C, K,
                        KP, DOT, INTERPRET)
        if CHANNEL_GAIN:
            x1 = x1 * (1.0 + tl.load(ch_frame + cols, mask=col_mask, other=0.0))[None, :]
        w = tl.load(w_ptr + outs[:, None] * C + cols[None, :],
                    mask=out_mask[:, None] & col_mask[None, :], other=0.0)
        # DOT operands: bf16/fp16 for those inputs (qv1 and qv2 only feed a relu and token or
        # channel reductions, and SPEC.md's tolerance holds), 3xTF32 for float32 inputs
        acc += matmul(x1, tl.trans(w), DOT, INTERPRET)
    return acc
