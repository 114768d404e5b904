"""Backward of pass 2 over the tokens, first half: the down projection, ln_before and the modulation.

Per token block it recomputes x1 and the modulation xm = x1 * scale (scale = alpha ch +
beta sigmoid(s) + gamma tg + 1 - alpha) from x and the frame vectors, and ln_before's
statistics. It takes dy = dz W_down (grouped, on chip) back through ln_before (one sweep
for its two per-token sums over C) and splits d xm into
  dx1 = d xm * scale            written, [F, N, C] float32
  d scale = d xm * x1           reduced on chip: per token over C (for d sigmoid(s)),
                                per block over tokens (for d ch and d tg)
It also writes y = ln_before(xm), the operand of the down projection's weight gradient
in cuBLAS; per-block column sums give the ln_before gradients. (x1 is not written: the
attention passes recompute it from x and the prompt probabilities.)
"""
import torch
import triton
import triton.language as tl

from .bottleneck_pass import _modulated, ln_before_statistics, modulation_scale
from .common import matmul, prompt_probabilities, stable_sigmoid, x1_columns
from .plan import Launch
from .tiling import Shape, latents_block, tiles

SUMS = 3  # per-channel sums: d scale, d y * y_hat (ln_before weight), d y (ln_before bias)
SUM_ROWS = tl.constexpr(SUMS)  # the same count inside @triton.jit (plain globals are not visible)


@triton.jit
def _down_projection_grad(dz_ptr, wd_ptr, f, rows, row_mask, group, local, local_mask, N, H, GROUPS, cg,
                          BN: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, INTERPRET: tl.constexpr):
    """dy[rows, group's channels `local`] = dz (that group's hidden) @ W_down: [BN, BK] float32.

    The group's H/G hidden channels are the product's inner axis, taken BH at a time."""
    hg = H // GROUPS
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    tl.assume(hg > 0)
    for h0 in range(0, hg, BH):
        hidden = h0 + tl.arange(0, BH)
        hidden_mask = hidden < hg
        dz = tl.load(dz_ptr + (f * N + rows)[:, None] * H + (group * hg + hidden)[None, :],
                     mask=row_mask[:, None] & hidden_mask[None, :], other=0.0)
        w = tl.load(wd_ptr + (group * hg + hidden)[:, None] * cg + local[None, :],
                    mask=hidden_mask[:, None] & local_mask[None, :], other=0.0)
        # float32 (3xTF32): dz carries bn1's train-mode magnification (see bottleneck_pass.py)
        acc += matmul(dz, w, tl.float32, INTERPRET)
    return acc


@triton.jit
def modulation_backward_kernel(x_ptr, r_ptr, gate_av_ptr, ch_ptr, tg_ptr, s_ptr, lnw_ptr, lnb_ptr, wd_ptr,
                               dz_ptr, y_ptr, dx1_ptr, row_sum_ptr, sums_ptr,
                               N, C, K, H, GROUPS, token_blocks, alpha, beta, gamma, ln_eps,
                               BN: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, KP: tl.constexpr,
                               USE_LN: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    nb = tl.program_id(1)
    rows = nb * BN + tl.arange(0, BN)
    row_mask = rows < N
    x_frame = x_ptr + f * N * C
    r_frame = r_ptr + f * K * C
    ch_frame = ch_ptr + f * C
    gate_av = tl.load(gate_av_ptr).to(tl.float32)
    probs = prompt_probabilities(x_frame, r_frame, rows, row_mask, C, K, BN, BK, KP, DOT, INTERPRET)
    s = tl.load(s_ptr + f * N + rows, mask=row_mask, other=0.0)
    sp = stable_sigmoid(s)
    tg = tl.load(tg_ptr + f)
    cg = C // GROUPS
    tl.assume(GROUPS > 0)
    tl.assume(cg > 0)

    mean = tl.zeros((BN,), dtype=tl.float32)
    rstd = tl.full((BN,), 1.0, dtype=tl.float32)
    d_mean = tl.zeros((BN,), dtype=tl.float32)
    d_dot = tl.zeros((BN,), dtype=tl.float32)
    if USE_LN:
        mean, rstd = ln_before_statistics(x_frame, r_frame, probs, gate_av, ch_frame, sp, tg, alpha, beta,
                                          gamma, rows, row_mask, C, K, ln_eps, BN, BK, KP, DOT, INTERPRET)
        # ln_before's backward: per token, the channel sums of d y_hat and d y_hat * y_hat
        for group in range(GROUPS):
            for c0 in range(0, cg, BK):
                local = c0 + tl.arange(0, BK)
                local_mask = local < cg
                cols = group * cg + local
                xm = _modulated(x_frame, r_frame, probs, gate_av, ch_frame, sp, tg, alpha, beta, gamma,
                                rows, row_mask, cols, local_mask, C, K, KP, DOT, INTERPRET)
                dy = _down_projection_grad(dz_ptr, wd_ptr, f, rows, row_mask, group, local, local_mask, N,
                                           H, GROUPS, cg, BN, BK, BH, INTERPRET)
                lnw = tl.load(lnw_ptr + cols, mask=local_mask, other=0.0).to(tl.float32)
                d_hat = dy * lnw[None, :]
                d_mean += tl.sum(d_hat, 1)
                d_dot += tl.sum(d_hat * (xm - mean[:, None]) * rstd[:, None], 1)
        d_mean = d_mean / C
        d_dot = d_dot / C

    row_sum = tl.zeros((BN,), dtype=tl.float32)
    for group in range(GROUPS):
        for c0 in range(0, cg, BK):
            local = c0 + tl.arange(0, BK)
            local_mask = local < cg
            cols = group * cg + local
            mask = row_mask[:, None] & local_mask[None, :]
            x1 = x1_columns(x_frame, r_frame, probs, gate_av, rows, row_mask, cols, local_mask, C, K, KP,
                            DOT, INTERPRET)
            scale = modulation_scale(ch_frame, sp, tg, alpha, beta, gamma, cols, local_mask)
            xm = x1 * scale
            dy = _down_projection_grad(dz_ptr, wd_ptr, f, rows, row_mask, group, local, local_mask, N, H,
                                       GROUPS, cg, BN, BK, BH, INTERPRET)
            if USE_LN:
                lnw = tl.load(lnw_ptr + cols, mask=local_mask, other=0.0).to(tl.float32)
                lnb = tl.load(lnb_ptr + cols, mask=local_mask, other=0.0).to(tl.float32)
                y_hat = (xm - mean[:, None]) * rstd[:, None]
                y = y_hat * lnw[None, :] + lnb[None, :]
                d_xm = rstd[:, None] * (dy * lnw[None, :] - d_mean[:, None] - y_hat * d_dot[:, None])
            else:
                y_hat = xm
                y = xm
                d_xm = dy
            d_xm = tl.where(mask, d_xm, 0.0)
            d_scale = d_xm * x1
            offsets = (f * N + rows)[:, None] * C + cols[None, :]
            tl.store(y_ptr + offsets, y, mask=mask)
            tl.store(dx1_ptr + offsets, d_xm * scale, mask=mask)
            row_sum += tl.sum(d_scale, 1)
            base = sums_ptr + ((f * token_blocks + nb) * SUM_ROWS) * C + cols
            tl.store(base, tl.sum(d_scale, 0), mask=local_mask)
            tl.store(base + C, tl.sum(tl.where(mask, dy * y_hat, 0.0), 0), mask=local_mask)
            tl.store(base + 2 * C, tl.sum(dy, 0), mask=local_mask)
    tl.store(row_sum_ptr + f * N + rows, row_sum, mask=row_mask)


def modulation_backward_launch(frames, shape: Shape, dtype, arch, use_ln) -> Launch:
    tokens, dim, latents, hidden, groups = shape.tokens, shape.dim, shape.latents, shape.hidden, shape.groups
    itemsize = dtype.itemsize
    chosen = tiles("modulation_backward", shape, dtype, arch)
    bn = chosen["BN"]
    token_blocks = triton.cdiv(tokens, bn)
    x_sweeps = 1 + (3 if use_ln else 0) + 1  # probs, LN statistics and sums, the written sweep
    return Launch(
        name="modulation_backward", grid=(frames, token_blocks), tiles=chosen,
        bytes_read=frames * tokens * (dim * itemsize + hidden * 4) + hidden * dim // groups * itemsize
        + frames * (latents + 1) * dim * 4,  # x, dz, W_down, R and ch
        reread_factor=x_sweeps,
        writes={"y": ((frames, tokens, dim), 4),
                "dx1": ((frames, tokens, dim), 4), "row_sums": ((frames, tokens), 4),
                "sums": ((frames, token_blocks, SUMS, dim), 4)},
        host_read=frames * token_blocks * SUMS * dim * 4 + frames * tokens * 4,
        flops=frames * tokens * (2 * dim * hidden // groups * (2 if use_ln else 1)
                                 + 4 * dim * latents * x_sweeps))


def run_modulation_backward(launch: Launch, x, prompts, ch, tg, s, d_z, p, hyper, dot_dtype, interpret):
    """y, dx1 ([F, N, C] float32), the per-token sums of d scale over C [F, N], and
    the per-channel sums (d scale over each frame's tokens [F, C]; ln_before's weight and
    bias gradients over all tokens [C])."""
    frames, tokens, dim = x.shape
    hidden = d_z.shape[-1]
    groups = dim // p["down_sampler.weight"].shape[1]
    token_blocks = launch.grid[1]
    y, d_x1 = (torch.empty(frames, tokens, dim, device=x.device, dtype=torch.float32) for _ in range(2))
    row_sums = torch.empty(frames, tokens, device=x.device, dtype=torch.float32)
    sums = torch.empty(frames, token_blocks, SUMS, dim, device=x.device, dtype=torch.float32)
    use_ln = p["ln_before.weight"] is not None
    lnw = p["ln_before.weight"] if use_ln else ch
    lnb = p["ln_before.bias"] if use_ln else ch
    modulation_backward_kernel[launch.grid](
        x, prompts, p["gate_av"], ch, tg, s.contiguous(), lnw, lnb, p["down_sampler.weight"], d_z.contiguous(),
        y, d_x1, row_sums, sums, tokens, dim, prompts.shape[1], hidden, groups, token_blocks,
        hyper.alpha, hyper.beta, hyper.gamma, hyper.ln_before_eps,
        KP=latents_block(prompts.shape[1]), USE_LN=use_ln, DOT=dot_dtype, INTERPRET=interpret,
        **launch.tiles)
    frame_sums = sums[:, :, 0].sum(1)
    ln_sums = sums[:, :, 1:].sum((0, 1))
    return y, d_x1, row_sums, frame_sums, ln_sums[0].clone(), ln_sums[1].clone()
