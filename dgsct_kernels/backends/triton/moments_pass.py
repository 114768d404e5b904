"""Pass 3 (training with BatchNorm): moments of the hidden activations h = relu(bn1(z)).

bn2 normalises o = h W_up^T per channel; its batch mean is W_up mean(h) and its biased
variance w_c^T Cov(h) w_c, with Cov over one group's H/G hidden channels. So the batch
statistics of the pre-bn2 output come from [G, H/G, H/G] moments of the small tensor h,
and that [F, N, C] tensor is never stored. The [H/G, H/G] matrix is computed in
[BH, BH] blocks: one program per (frame, group, i-block, j-block) writes that block of
the frame's centred second-moment matrix (and, for j-block 0, the frame's sums of the
i-block's channels), so no program holds more than a [BH, BH] float32 accumulator
(BH <= 64, tiling.py); the host combines frames (Chan et al.).
"""
import torch
import triton
import triton.language as tl

from .common import matmul, relu
from .plan import Launch
from .tiling import Shape, tiles


@triton.jit
def _hidden_block(z_ptr, scale_ptr, shift_ptr, f, rows, row_mask, channels, hidden_mask, N, H):
    """h = relu(bn1(z)) for tokens `rows` and hidden `channels`: [BN, BH] float32, 0 outside."""
    mask = row_mask[:, None] & hidden_mask[None, :]
    z = tl.load(z_ptr + (f * N + rows)[:, None] * H + channels[None, :], mask=mask, other=0.0)
    scale = tl.load(scale_ptr + channels, mask=hidden_mask, other=0.0)
    shift = tl.load(shift_ptr + channels, mask=hidden_mask, other=0.0)
    return tl.where(mask, relu(z.to(tl.float32) * scale[None, :] + shift[None, :]), 0.0)


@triton.jit
def moments_pass_kernel(z_ptr, scale_ptr, shift_ptr, sum_ptr, m2_ptr, N, H, GROUPS,
                        BN: tl.constexpr, BH: tl.constexpr, INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    pair = tl.program_id(1)
    hg = H // GROUPS
    blocks = tl.cdiv(hg, BH)
    padded = blocks * BH  # the stored matrices' side
    group = pair // (blocks * blocks)
    i_block = (pair // blocks) % blocks
    j_block = pair % blocks
    hidden_i = i_block * BH + tl.arange(0, BH)
    hidden_j = j_block * BH + tl.arange(0, BH)
    mask_i = hidden_i < hg
    mask_j = hidden_j < hg
    total_i = tl.zeros((BH,), dtype=tl.float32)
    total_j = tl.zeros((BH,), dtype=tl.float32)
    second = tl.zeros((BH, BH), dtype=tl.float32)
    tl.assume(N > 0)
    for n0 in range(0, N, BN):
        rows = n0 + tl.arange(0, BN)
        row_mask = rows < N
        h_i = _hidden_block(z_ptr, scale_ptr, shift_ptr, f, rows, row_mask, group * hg + hidden_i, mask_i, N, H)
        h_j = _hidden_block(z_ptr, scale_ptr, shift_ptr, f, rows, row_mask, group * hg + hidden_j, mask_j, N, H)
        total_i += tl.sum(h_i, 0)
        total_j += tl.sum(h_j, 0)
        # float32 (3xTF32): bn2's variance is w^T Cov(h) w, a difference of large terms
        second += matmul(tl.trans(h_i), h_j, tl.float32, INTERPRET)
    centred = second - N * (total_i / N)[:, None] * (total_j / N)[None, :]
    base = (f * GROUPS + group) * padded
    tl.store(m2_ptr + (base + hidden_i)[:, None] * padded + hidden_j[None, :], centred,
             mask=mask_i[:, None] & mask_j[None, :])
    if j_block == 0:
        tl.store(sum_ptr + base + hidden_i, total_i, mask=mask_i)


def moments_pass_launch(frames, shape: Shape, dtype, arch) -> Launch:
    tokens, hidden, groups = shape.tokens, shape.hidden, shape.groups
    chosen = tiles("moments_pass", shape, dtype, arch)
    bh = chosen["BH"]
    blocks = triton.cdiv(hidden // groups, bh)
    padded = blocks * bh
    return Launch(name="moments_pass", grid=(frames, groups * blocks * blocks), tiles=chosen,
                  reread_factor=2 * blocks,  # each z column block feeds 2 * blocks programs
                  bytes_read=frames * tokens * hidden * 4,  # z is float32
                  writes={"h_sums": ((frames, groups, padded), 4),
                          "h_moments": ((frames, groups, padded, padded), 4)},
                  host_read=frames * groups * (padded + padded * padded) * 4,
                  flops=2 * frames * tokens * hidden * hidden // groups,
                  split_flops=2 * frames * tokens * hidden * hidden // groups)  # float32 operands


def run_moments_pass(launch: Launch, z, bn1_scale, bn1_shift, groups, interpret):
    """Mean [H] and biased covariance [G, H/G, H/G] of h over all F*N tokens, in float64."""
    frames, tokens, hidden = z.shape
    padded = triton.cdiv(hidden // groups, launch.tiles["BH"]) * launch.tiles["BH"]
    sums = z.new_zeros(frames, groups, padded, dtype=torch.float32)
    m2 = z.new_zeros(frames, groups, padded, padded, dtype=torch.float32)
    moments_pass_kernel[launch.grid](z, bn1_scale, bn1_shift, sums, m2, tokens, hidden, groups,
                                     INTERPRET=interpret, **launch.tiles)
    hg = hidden // groups
    sums, m2 = sums[..., :hg].double(), m2[..., :hg, :hg].double()
    frame_means = sums / tokens  # [F, G, hg]
    mean = frame_means.mean(0)
    spread = frame_means - mean
    cov = (m2.sum(0) + tokens * torch.einsum("fgi,fgj->gij", spread, spread)) / (frames * tokens)
    return mean.reshape(hidden), cov
