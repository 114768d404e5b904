"""Pass 2 over the tokens: spatial attention, modulation, ln_before and the down projection.

Per token block (SPEC.md steps 6, 8 and 9 up to the first BatchNorm): the spatial logit
s = (relu(xc W_video_2^T + b) * qa2) . w + b with xc = x1 (1 + ch), the modulation
xm = x1 (alpha ch + beta sigmoid(s) + gamma tg + 1 - alpha), its LayerNorm, and
z = grouped_linear(y, down_sampler). It writes s [F, N] and z [F, N, H] (H = C / r) and,
per block, the sum and centred sum of squares of z for BatchNorm's batch
statistics. x1, xc, xm and y stay on chip.
"""
import torch
import triton
import triton.language as tl

from .common import matmul, prompt_probabilities, relu, stable_sigmoid, x1_columns, x1_times_weight
from .plan import Launch
from .tiling import Shape, latents_block, tiles


@triton.jit
def modulation_scale(ch_frame, sp, tg, alpha, beta, gamma, cols, col_mask):
    """alpha ch + beta sigmoid(s) + gamma tg + 1 - alpha for tokens x cols (SPEC.md step 8)."""
    ch = tl.load(ch_frame + cols, mask=col_mask, other=0.0)
    return alpha * ch[None, :] + beta * sp[:, None] + gamma * tg + 1.0 - alpha


@triton.jit
def _modulated(x_frame, r_frame, probs, gate_av, ch_frame, sp, tg, alpha, beta, gamma,
               rows, row_mask, cols, col_mask, C, K,
               KP: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """xm[rows, cols] in float32 (SPEC.md step 8); zero outside the masks."""
    x1 = x1_columns(x_frame, r_frame, probs, gate_av, rows, row_mask, cols, col_mask, C, K, KP,
                    DOT, INTERPRET)
    scale = modulation_scale(ch_frame, sp, tg, alpha, beta, gamma, cols, col_mask)
    return tl.where(row_mask[:, None] & col_mask[None, :], x1 * scale, 0.0)


@triton.jit
def ln_before_statistics(x_frame, r_frame, probs, gate_av, ch_frame, sp, tg, alpha, beta, gamma, rows,
                         row_mask, C, K, ln_eps, BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
                         DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """ln_before's per-token mean and 1/std of xm over the C channels (two sweeps: mean, then
    the centred variance)."""
    mean = tl.zeros((BN,), dtype=tl.float32)
    tl.assume(C > 0)
    for c0 in range(0, C, BK):
        cols = c0 + tl.arange(0, BK)
        xm = _modulated(x_frame, r_frame, probs, gate_av, ch_frame, sp, tg, alpha, beta, gamma,
                        rows, row_mask, cols, cols < C, C, K, KP, DOT, INTERPRET)
        mean += tl.sum(xm, 1)
    mean = mean / C
    var = tl.zeros((BN,), dtype=tl.float32)
    for c0 in range(0, C, BK):
        cols = c0 + tl.arange(0, BK)
        col_mask = cols < C
        xm = _modulated(x_frame, r_frame, probs, gate_av, ch_frame, sp, tg, alpha, beta, gamma,
                        rows, row_mask, cols, col_mask, C, K, KP, DOT, INTERPRET)
        centred = tl.where(col_mask[None, :], xm - mean[:, None], 0.0)
        var += tl.sum(centred * centred, 1)
    return mean, 1.0 / tl.sqrt(var / C + ln_eps)


@triton.jit
def bottleneck_pass_kernel(x_ptr, r_ptr, gate_av_ptr, ch_ptr, qa2_ptr, tg_ptr,
                           w2_ptr, b2_ptr, ws_ptr, bs_ptr, lnw_ptr, lnb_ptr, wd_ptr,
                           s_ptr, z_ptr, zsum_ptr, zm2_ptr,
                           N, C, K, HALF, H, GROUPS, token_blocks, alpha, beta, gamma, ln_eps,
                           BN: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, KP: tl.constexpr,
                           BH: tl.constexpr, USE_LN: tl.constexpr, DOT: tl.constexpr,
                           INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    nb = tl.program_id(1)
    rows = nb * BN + tl.arange(0, BN)
    row_mask = rows < N
    x_frame = x_ptr + f * N * C
    r_frame = r_ptr + f * K * C
    ch_frame = ch_ptr + f * C
    gate_av = tl.load(gate_av_ptr).to(tl.float32)
    probs = prompt_probabilities(x_frame, r_frame, rows, row_mask, C, K, BN, BK, KP, DOT, INTERPRET)

    # spatial logit: a [BN, C] x [C, C/2] product reduced to one value per token
    s = tl.zeros((BN,), dtype=tl.float32)
    tl.assume(HALF > 0)
    for o0 in range(0, HALF, BO):
        outs = o0 + tl.arange(0, BO)
        out_mask = outs < HALF
        acc = x1_times_weight(x_frame, r_frame, probs, gate_av, ch_frame, w2_ptr, rows, row_mask, outs,
                              out_mask, C, K, BN, BK, BO, KP, True, DOT, INTERPRET)
        bias = tl.load(b2_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)
        weight = (tl.load(qa2_ptr + f * HALF + outs, mask=out_mask, other=0.0)
                  * tl.load(ws_ptr + outs, mask=out_mask, other=0.0).to(tl.float32))
        s += tl.sum(relu(acc + bias[None, :]) * weight[None, :], 1)
    s += tl.load(bs_ptr).to(tl.float32)
    tl.store(s_ptr + f * N + rows, s, mask=row_mask)
    sp = stable_sigmoid(s)
    tg = tl.load(tg_ptr + f)

    mean = tl.zeros((BN,), dtype=tl.float32)
    rstd = tl.full((BN,), 1.0, dtype=tl.float32)
    if USE_LN:
        mean, rstd = ln_before_statistics(x_frame, r_frame, probs, gate_av, ch_frame, sp, tg, alpha, beta,
                                          gamma, rows, row_mask, C, K, ln_eps, BN, BK, KP, DOT, INTERPRET)

    # grouped down projection: group g maps channels [g C/G, (g+1) C/G) to hidden [g H/G, ...),
    # BH hidden channels at a time (y is recomputed per hidden block: no [BN, H/G] accumulator)
    cg = C // GROUPS
    hg = H // GROUPS
    count = tl.sum(row_mask.to(tl.float32), 0)
    tl.assume(GROUPS > 0)
    tl.assume(cg > 0)
    tl.assume(hg > 0)
    for group in range(0, GROUPS):
        for h0 in range(0, hg, BH):
            hidden = h0 + tl.arange(0, BH)
            hidden_mask = hidden < hg
            acc = tl.zeros((BN, BH), dtype=tl.float32)
            for c0 in range(0, cg, BK):
                local = c0 + tl.arange(0, BK)
                local_mask = local < cg
                cols = group * cg + local
                y = _modulated(x_frame, r_frame, probs, gate_av, ch_frame, sp, tg, alpha, beta, gamma,
                               rows, row_mask, cols, local_mask, C, K, KP, DOT, INTERPRET)
                if USE_LN:
                    lnw = tl.load(lnw_ptr + cols, mask=local_mask, other=0.0).to(tl.float32)
                    lnb = tl.load(lnb_ptr + cols, mask=local_mask, other=0.0).to(tl.float32)
                    y = tl.where(local_mask[None, :],
                                 (y - mean[:, None]) * rstd[:, None] * lnw[None, :] + lnb[None, :], 0.0)
                w = tl.load(wd_ptr + (group * hg + hidden)[:, None] * cg + local[None, :],
                            mask=hidden_mask[:, None] & local_mask[None, :], other=0.0)
                # float32 operands (3xTF32): train-mode bn1 divides z by its batch spread, which
                # magnifies a rounding of y (bf16, measured: 1.05e-2 -> 7.0e-3 of max |o|)
                acc += matmul(y, tl.trans(w), tl.float32, INTERPRET)
            channels = group * hg + hidden
            out_mask = row_mask[:, None] & hidden_mask[None, :]
            tl.store(z_ptr + (f * N + rows)[:, None] * H + channels[None, :],
                     acc.to(z_ptr.dtype.element_ty), mask=out_mask)
            block_sum = tl.sum(tl.where(out_mask, acc, 0.0), 0)
            centred = tl.where(out_mask, acc - (block_sum / count)[None, :], 0.0)
            stat = (f * token_blocks + nb) * H + channels
            tl.store(zsum_ptr + stat, block_sum, mask=hidden_mask)
            tl.store(zm2_ptr + stat, tl.sum(centred * centred, 0), mask=hidden_mask)


def bottleneck_pass_launch(frames, shape: Shape, dtype, arch, use_ln) -> Launch:
    tokens, dim, latents, hidden, groups = shape.tokens, shape.dim, shape.latents, shape.hidden, shape.groups
    itemsize = dtype.itemsize
    chosen = tiles("bottleneck_pass", shape, dtype, arch)
    bn, bo = chosen["BN"], chosen["BO"]
    token_blocks = triton.cdiv(tokens, bn)
    hidden_blocks = triton.cdiv(hidden // groups, chosen["BH"])  # y is recomputed per hidden block
    x_sweeps = 1 + triton.cdiv(dim // 2, bo) + (2 if use_ln else 0) + hidden_blocks  # probs, s, LN, down
    weights = (dim // 2 * dim + hidden * dim // groups + 4 * dim) * itemsize
    return Launch(
        name="bottleneck_pass", grid=(frames, token_blocks), tiles=chosen,
        bytes_read=frames * tokens * dim * itemsize + weights
        + frames * (latents + 2) * dim * 4,  # x, weights, R, ch and qa2 (float32)
        reread_factor=x_sweeps,  # each program sweeps its own x tile this many times
        host_read=frames * tokens * 4 + 2 * frames * token_blocks * hidden * 4,  # s, z statistics
        writes={"s": ((frames, tokens), 4), "z": ((frames, tokens, hidden), 4),
                "z_block_sums": ((2, frames, token_blocks, hidden), 4)},
        flops=frames * tokens * (2 * dim * (dim // 2) + 2 * dim * hidden // groups
                                 + 4 * dim * latents * x_sweeps),  # x1 is recomputed per sweep
        split_flops=frames * tokens * (2 * dim * hidden // groups + 4 * dim * latents * x_sweeps))


def run_bottleneck_pass(launch: Launch, x, prompts, gate_av, ch, qa2, tg, p, hyper, dot_dtype, interpret):
    frames, tokens, dim = x.shape
    hidden = p["down_sampler.weight"].shape[0]
    groups = dim // p["down_sampler.weight"].shape[1]
    token_blocks = launch.grid[1]
    s = x.new_empty(frames, tokens, dtype=ch.dtype)
    # float32: BatchNorm divides by z's spread, which can be far below its magnitude
    z = x.new_empty(frames, tokens, hidden, dtype=torch.float32)
    zsum = x.new_empty(frames, token_blocks, hidden, dtype=ch.dtype)
    zm2 = torch.empty_like(zsum)
    use_ln = p["ln_before.weight"] is not None
    lnw = p["ln_before.weight"] if use_ln else ch
    lnb = p["ln_before.bias"] if use_ln else ch
    bottleneck_pass_kernel[launch.grid](
        x, prompts, gate_av, ch, qa2, tg, p["fc_affine_video_2.weight"], p["fc_affine_video_2.bias"],
        p["fc_affine_v_s_att.weight"], p["fc_affine_v_s_att.bias"], lnw, lnb, p["down_sampler.weight"],
        s, z, zsum, zm2, tokens, dim, prompts.shape[1], dim // 2, hidden, groups, token_blocks,
        hyper.alpha, hyper.beta, hyper.gamma, hyper.ln_before_eps,
        KP=latents_block(prompts.shape[1]), USE_LN=use_ln, DOT=dot_dtype, INTERPRET=interpret,
        **launch.tiles)
    return s, z, zsum, zm2

