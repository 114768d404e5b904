"""Backward of pass 4 over the tokens: from dL/do to dL/du, u the up projection before bn2.

Per token block it recomputes u from z (as the forward's output pass does), then bn2,
ln_post and the gate, and takes the gradient back through them: o = gate * ln_post(bn2(u)).
ln_post's backward needs two per-token sums over the C channels (one more sweep);
train-mode bn2's needs two per-channel sums over all F*N tokens, so in training this runs
twice: once for the per-block sums (which also give the bn2, ln_post and gate weight
gradients), then, with the totals, to write du. In eval mode one launch does both.
Only du [F, N, C] is written (the backward's one token-sized temporary here; it feeds the
up projection's two matrix products); u, bn2(u) and ln_post's output stay on chip.
"""
import torch
import triton
import triton.language as tl

from .output_pass import bn2_output, ln_post_statistics, up_projection
from .plan import Launch
from .tiling import Shape, tiles

SUMS = 5  # per-channel sums: d bn2 out, d bn2 out * u_hat, d ln_post out * normed, d ln_post out, gate
SUM_ROWS = tl.constexpr(SUMS)  # the same count inside @triton.jit (plain globals are not visible)


@triton.jit
def output_backward_kernel(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, scale2_ptr, shift2_ptr, mean2_ptr, rstd2_ptr,
                           lnw_ptr, lnb_ptr, gate_ptr, grad_ptr, totals_ptr, sums_ptr, du_ptr,
                           N, C, H, GROUPS, token_blocks, ln_eps, count,
                           BN: tl.constexpr, BO: tl.constexpr, BH: tl.constexpr, USE_LN: tl.constexpr,
                           USE_GATE: tl.constexpr, BATCH_STATS: tl.constexpr, WRITE_SUMS: tl.constexpr,
                           WRITE_DU: tl.constexpr, INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    nb = tl.program_id(1)
    rows = nb * BN + tl.arange(0, BN)
    row_mask = rows < N
    cg = C // GROUPS
    tl.assume(GROUPS > 0)
    tl.assume(cg > 0)
    gate = tl.load(gate_ptr).to(tl.float32) if USE_GATE else 1.0
    if USE_LN:
        mean, rstd = ln_post_statistics(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, scale2_ptr, shift2_ptr, f, rows,
                                        row_mask, N, C, H, GROUPS, ln_eps, BN, BO, BH, INTERPRET)
        # ln_post's backward: per token, the channel means of d_normed and d_normed * normed
        d_mean = tl.zeros((BN,), dtype=tl.float32)
        d_dot = tl.zeros((BN,), dtype=tl.float32)
        for group in range(GROUPS):
            for o0 in range(0, cg, BO):
                local = o0 + tl.arange(0, BO)
                local_mask = local < cg
                outs = group * cg + local
                mask = row_mask[:, None] & local_mask[None, :]
                u = bn2_output(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, scale2_ptr, shift2_ptr, f, rows,
                               row_mask, group, local, local_mask, N, C, H, GROUPS, BN, BO, BH, INTERPRET)
                normed = (u - mean[:, None]) * rstd[:, None]
                grad = tl.load(grad_ptr + (f * N + rows)[:, None] * C + outs[None, :], mask=mask,
                               other=0.0).to(tl.float32)
                lnw = tl.load(lnw_ptr + outs, mask=local_mask, other=0.0).to(tl.float32)
                d_normed = tl.where(mask, gate * grad * lnw[None, :], 0.0)
                d_mean += tl.sum(d_normed, 1)
                d_dot += tl.sum(d_normed * normed, 1)
        d_mean = d_mean / C
        d_dot = d_dot / C

    for group in range(GROUPS):
        for o0 in range(0, cg, BO):
            local = o0 + tl.arange(0, BO)
            local_mask = local < cg
            outs = group * cg + local
            mask = row_mask[:, None] & local_mask[None, :]
            u = up_projection(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, f, rows, row_mask, group, local,
                              local_mask, N, C, H, GROUPS, BN, BO, BH, INTERPRET)
            scale2 = tl.load(scale2_ptr + outs, mask=local_mask, other=0.0)
            shift2 = tl.load(shift2_ptr + outs, mask=local_mask, other=0.0)
            post = u * scale2[None, :] + shift2[None, :]
            grad = tl.load(grad_ptr + (f * N + rows)[:, None] * C + outs[None, :], mask=mask,
                           other=0.0).to(tl.float32)
            d_out = gate * grad  # d of the gate's input
            if USE_LN:
                lnw = tl.load(lnw_ptr + outs, mask=local_mask, other=0.0).to(tl.float32)
                lnb = tl.load(lnb_ptr + outs, mask=local_mask, other=0.0).to(tl.float32)
                normed = (post - mean[:, None]) * rstd[:, None]
                out = normed * lnw[None, :] + lnb[None, :]
                d_post = rstd[:, None] * (d_out * lnw[None, :] - d_mean[:, None] - normed * d_dot[:, None])
            else:
                normed = post
                out = post
                d_post = d_out
            d_post = tl.where(mask, d_post, 0.0)
            u_hat = (u - tl.load(mean2_ptr + outs, mask=local_mask, other=0.0)[None, :]) \
                * tl.load(rstd2_ptr + outs, mask=local_mask, other=0.0)[None, :]
            if WRITE_SUMS:
                base = sums_ptr + ((f * token_blocks + nb) * SUM_ROWS) * C + outs
                tl.store(base, tl.sum(d_post, 0), mask=local_mask)
                tl.store(base + C, tl.sum(d_post * u_hat, 0), mask=local_mask)
                tl.store(base + 2 * C, tl.sum(tl.where(mask, d_out * normed, 0.0), 0), mask=local_mask)
                tl.store(base + 3 * C, tl.sum(tl.where(mask, d_out, 0.0), 0), mask=local_mask)
                tl.store(base + 4 * C, tl.sum(tl.where(mask, grad * out, 0.0), 0), mask=local_mask)
            if WRITE_DU:
                d_u = d_post * scale2[None, :]  # bn2 as the affine map it is in eval mode
                if BATCH_STATS:  # the batch mean and variance depend on every token
                    total = tl.load(totals_ptr + outs, mask=local_mask, other=0.0)
                    total_hat = tl.load(totals_ptr + C + outs, mask=local_mask, other=0.0)
                    d_u -= scale2[None, :] * (total[None, :] + u_hat * total_hat[None, :]) / count
                tl.store(du_ptr + (f * N + rows)[:, None] * C + outs[None, :], d_u, mask=mask)


def output_backward_launch(frames, shape: Shape, dtype, arch, use_ln) -> Launch:
    tokens, dim, hidden, groups, itemsize = shape.tokens, shape.dim, shape.hidden, shape.groups, dtype.itemsize
    chosen = tiles("output_backward", shape, dtype, arch)
    bn = chosen["BN"]
    token_blocks = triton.cdiv(tokens, bn)
    sweeps = 4 if use_ln else 1
    return Launch(name="output_backward", grid=(frames, token_blocks), tiles=chosen,
                  bytes_read=frames * tokens * (hidden * 4 + dim * itemsize) + dim * (hidden // groups + 8) * 4,
                  reread_factor=sweeps,
                  writes={"du": ((frames, tokens, dim), 4), "sums": ((frames, token_blocks, SUMS, dim), 4)},
                  host_read=frames * token_blocks * SUMS * dim * 4,
                  flops=2 * frames * tokens * dim * hidden // groups * sweeps)


def run_output_backward(launch: Launch, grad, z, bn1_affine, bn2_affine, bn2_stats, p, hyper, batch_stats,
                        interpret):
    """(du [F, N, C] float32, {parameter: gradient} for bn2, ln_post and the gate)."""
    frames, tokens, dim = grad.shape
    hidden = z.shape[-1]
    groups = hidden // p["up_sampler.weight"].shape[1]
    use_ln, use_gate, use_bn = (p[k] is not None for k in ("ln_post.weight", "gate", "bn2.weight"))
    mean2, var2 = bn2_stats if use_bn else (bn2_affine[1], bn2_affine[0])  # u_hat unused without bn2
    rstd2 = torch.rsqrt(var2.float() + hyper.bn2_eps).contiguous() if use_bn else var2
    sums = z.new_empty(frames, launch.grid[1], SUMS, dim, dtype=torch.float32)
    d_up = torch.empty(frames, tokens, dim, device=z.device, dtype=torch.float32)
    lnw = p["ln_post.weight"] if use_ln else rstd2
    lnb = p["ln_post.bias"] if use_ln else rstd2
    args = (z, *bn1_affine, p["up_sampler.weight"], *bn2_affine, mean2.float().contiguous(), rstd2, lnw, lnb,
            p["gate"] if use_gate else rstd2, grad.contiguous())
    flags = {"USE_LN": use_ln, "USE_GATE": use_gate, "BATCH_STATS": batch_stats, "INTERPRET": interpret,
             **launch.tiles}
    sizes = (tokens, dim, hidden, groups, launch.grid[1], hyper.ln_post_eps, frames * tokens)
    if batch_stats:  # the totals must be known before du
        output_backward_kernel[launch.grid](*args, sums, sums, d_up, *sizes, WRITE_SUMS=True, WRITE_DU=False,
                                            **flags)
        totals = sums.sum((0, 1))
        output_backward_kernel[launch.grid](*args, totals.contiguous(), sums, d_up, *sizes, WRITE_SUMS=False,
                                            WRITE_DU=True, **flags)
    else:
        output_backward_kernel[launch.grid](*args, sums, sums, d_up, *sizes, WRITE_SUMS=True, WRITE_DU=True,
                                            **flags)
        totals = sums.sum((0, 1))
    totals = [t.clone() for t in totals]  # separate storages: the op's outputs must not alias
    grads = {}
    if use_bn:
        grads["bn2.bias"], grads["bn2.weight"] = totals[0], totals[1]
    if use_ln:
        grads["ln_post.weight"], grads["ln_post.bias"] = totals[2], totals[3]
    if use_gate:
        grads["gate"] = totals[4].sum().reshape(1)
    return d_up, grads
