"""Pass 4 over the tokens: up projection, bn2, ln_post and the gate (SPEC.md step 9).

Reads z [F, N, H], applies bn1 and relu, the grouped up projection, bn2 as a per-channel
affine map (batch or running statistics folded on the host), ln_post over the C
channels (two sweeps for its statistics, one to write) and the gate; writes o.
"""
import triton
import triton.language as tl

from .common import matmul, relu
from .plan import Launch
from .tiling import Shape, tiles


@triton.jit
def up_projection(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, f, rows, row_mask, group, outs_local, out_mask,
                  N, C, H, GROUPS, BN: tl.constexpr, BO: tl.constexpr, BH: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """up(relu(bn1(z))) for output channels group*C/G + outs_local, before bn2: [BN, BO] float32.

    The group's H/G hidden channels are the product's inner axis, taken BH at a time."""
    hg = H // GROUPS
    cg = C // GROUPS
    outs = group * cg + outs_local
    acc = tl.zeros((BN, BO), dtype=tl.float32)
    tl.assume(hg > 0)
    for h0 in range(0, hg, BH):
        hidden = h0 + tl.arange(0, BH)
        hidden_mask = hidden < hg
        channels = group * hg + hidden
        mask = row_mask[:, None] & hidden_mask[None, :]
        z = tl.load(z_ptr + (f * N + rows)[:, None] * H + channels[None, :], mask=mask, other=0.0)
        scale1 = tl.load(scale1_ptr + channels, mask=hidden_mask, other=0.0)
        shift1 = tl.load(shift1_ptr + channels, mask=hidden_mask, other=0.0)
        h = tl.where(mask, relu(z.to(tl.float32) * scale1[None, :] + shift1[None, :]), 0.0)
        w = tl.load(wu_ptr + outs[:, None] * hg + hidden[None, :],
                    mask=out_mask[:, None] & hidden_mask[None, :], other=0.0)
        # float32 (3xTF32): bn2's batch statistics come from the moments of the unrounded h, so
        # the values it normalises must not carry a low-precision rounding that the statistics lack
        acc += matmul(h, tl.trans(w), tl.float32, INTERPRET)
    return acc


@triton.jit
def bn2_output(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, scale2_ptr, shift2_ptr, f, rows, row_mask, group,
               outs_local, out_mask, N, C, H, GROUPS, BN: tl.constexpr, BO: tl.constexpr, BH: tl.constexpr,
               INTERPRET: tl.constexpr):
    """bn2(up(relu(bn1(z)))) for output channels group*C/G + outs_local: [BN, BO] float32, 0 outside."""
    u = up_projection(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, f, rows, row_mask, group, outs_local,
                      out_mask, N, C, H, GROUPS, BN, BO, BH, INTERPRET)
    outs = group * (C // GROUPS) + outs_local
    scale2 = tl.load(scale2_ptr + outs, mask=out_mask, other=0.0)
    shift2 = tl.load(shift2_ptr + outs, mask=out_mask, other=0.0)
    return tl.where(row_mask[:, None] & out_mask[None, :], u * scale2[None, :] + shift2[None, :], 0.0)


@triton.jit
def ln_post_statistics(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, scale2_ptr, shift2_ptr, f, rows, row_mask,
                       N, C, H, GROUPS, ln_eps, BN: tl.constexpr, BO: tl.constexpr, BH: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """ln_post's per-token mean and 1/std over the C channels (two sweeps: mean, centred variance)."""
    cg = C // GROUPS
    tl.assume(GROUPS > 0)
    tl.assume(cg > 0)
    mean = tl.zeros((BN,), dtype=tl.float32)
    for group in range(GROUPS):
        for o0 in range(0, cg, BO):
            local = o0 + tl.arange(0, BO)
            u = bn2_output(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, scale2_ptr, shift2_ptr, f, rows, row_mask,
                           group, local, local < cg, N, C, H, GROUPS, BN, BO, BH, INTERPRET)
            mean += tl.sum(u, 1)
    mean = mean / C
    var = tl.zeros((BN,), dtype=tl.float32)
    for group in range(GROUPS):
        for o0 in range(0, cg, BO):
            local = o0 + tl.arange(0, BO)
            local_mask = local < cg
            u = bn2_output(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, scale2_ptr, shift2_ptr, f, rows, row_mask,
                           group, local, local_mask, N, C, H, GROUPS, BN, BO, BH, INTERPRET)
            centred = tl.where(local_mask[None, :], u - mean[:, None], 0.0)
            var += tl.sum(centred * centred, 1)
    return mean, 1.0 / tl.sqrt(var / C + ln_eps)


@triton.jit
def output_pass_kernel(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, scale2_ptr, shift2_ptr,
                       lnw_ptr, lnb_ptr, gate_ptr, o_ptr, N, C, H, GROUPS, ln_eps,
                       BN: tl.constexpr, BO: tl.constexpr, BH: tl.constexpr, USE_LN: tl.constexpr,
                       USE_GATE: tl.constexpr, INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    nb = tl.program_id(1)
    rows = nb * BN + tl.arange(0, BN)
    row_mask = rows < N
    cg = C // GROUPS
    tl.assume(GROUPS > 0)
    tl.assume(cg > 0)
    if USE_LN:
        mean, rstd = ln_post_statistics(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, scale2_ptr, shift2_ptr, f, rows,
                                        row_mask, N, C, H, GROUPS, ln_eps, BN, BO, BH, INTERPRET)
    gate = tl.load(gate_ptr).to(tl.float32) if USE_GATE else 1.0
    for group in range(GROUPS):
        for o0 in range(0, cg, BO):
            local = o0 + tl.arange(0, BO)
            local_mask = local < cg
            u = bn2_output(z_ptr, scale1_ptr, shift1_ptr, wu_ptr, scale2_ptr, shift2_ptr, f, rows, row_mask,
                           group, local, local_mask, N, C, H, GROUPS, BN, BO, BH, INTERPRET)
            outs = group * cg + local
            if USE_LN:
                lnw = tl.load(lnw_ptr + outs, mask=local_mask, other=0.0).to(tl.float32)
                lnb = tl.load(lnb_ptr + outs, mask=local_mask, other=0.0).to(tl.float32)
                u = (u - mean[:, None]) * rstd[:, None] * lnw[None, :] + lnb[None, :]
            tl.store(o_ptr + (f * N + rows)[:, None] * C + outs[None, :], (gate * u).to(o_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & local_mask[None, :])


def output_pass_launch(frames, shape: Shape, dtype, arch, use_ln) -> Launch:
    tokens, dim, hidden, groups, itemsize = shape.tokens, shape.dim, shape.hidden, shape.groups, dtype.itemsize
    chosen = tiles("output_pass", shape, dtype, arch)
    bn, bo = chosen["BN"], chosen["BO"]
    token_blocks = triton.cdiv(tokens, bn)
    sweeps = 3 if use_ln else 1
    return Launch(name="output_pass", grid=(frames, token_blocks), tiles=chosen,
                  bytes_read=frames * tokens * hidden * 4 + dim * (hidden // groups + 4) * itemsize,
                  reread_factor=sweeps * triton.cdiv(dim // groups, bo),  # z tile per output block
                  writes={"o": ((frames, tokens, dim), itemsize)},
                  flops=2 * frames * tokens * dim * hidden // groups * sweeps,
                  split_flops=2 * frames * tokens * dim * hidden // groups * sweeps)  # float32 operands


def run_output_pass(launch: Launch, z, bn1_affine, bn2_affine, p, hyper, dim, out_dtype, interpret):
    frames, tokens, hidden = z.shape
    groups = hidden // p["up_sampler.weight"].shape[1]
    o = z.new_empty(frames, tokens, dim, dtype=out_dtype)
    use_ln = p["ln_post.weight"] is not None
    use_gate = p["gate"] is not None
    lnw = p["ln_post.weight"] if use_ln else bn2_affine[0]
    lnb = p["ln_post.bias"] if use_ln else bn2_affine[0]
    output_pass_kernel[launch.grid](
        z, *bn1_affine, p["up_sampler.weight"], *bn2_affine, lnw, lnb,
        p["gate"] if use_gate else bn2_affine[0], o, tokens, dim, hidden, groups, hyper.ln_post_eps,
        USE_LN=use_ln, USE_GATE=use_gate, INTERPRET=interpret, **launch.tiles)
    return o
