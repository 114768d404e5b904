"""Pass 3 (training with BatchNorm): moments of the hidden activations h = relu(bn1(z)).

bn2 normalises o = h W_up^T per channel; its batch mean is W_up mean(h) and its biased
variance w_c^T Cov(h) w_c, with Cov over one group's H/G hidden channels. So the batch
statistics of the pre-bn2 output come from [G, H/G, H/G] moments of the small tensor h,
and that [F, N, C] tensor is never stored. One program per (frame, group) writes the
frame's sum and centred second-moment matrix; the host combines frames (Chan et al.).
"""
import torch
import triton
import triton.language as tl

from .common import matmul
from .plan import Launch
from .tiling import Shape, tiles


@triton.jit
def moments_pass_kernel(z_ptr, scale_ptr, shift_ptr, sum_ptr, m2_ptr, N, H, GROUPS,
                        BN: tl.constexpr, BH: tl.constexpr, INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    group = tl.program_id(1)
    hg = H // GROUPS
    hidden = tl.arange(0, BH)
    hidden_mask = hidden < hg
    channels = group * hg + hidden
    scale = tl.load(scale_ptr + channels, mask=hidden_mask, other=0.0)
    shift = tl.load(shift_ptr + channels, mask=hidden_mask, other=0.0)
    total = tl.zeros((BH,), dtype=tl.float32)
    second = tl.zeros((BH, BH), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rows = n0 + tl.arange(0, BN)
        mask = (rows < N)[:, None] & hidden_mask[None, :]
        z = tl.load(z_ptr + (f * N + rows)[:, None] * H + channels[None, :], mask=mask, other=0.0)
        h = tl.where(mask, tl.maximum(z.to(tl.float32) * scale[None, :] + shift[None, :], 0.0), 0.0)
        total += tl.sum(h, 0)
        second += matmul(tl.trans(h), h, tl.float32, INTERPRET)
    mean = total / N
    centred = second - N * mean[:, None] * mean[None, :]
    pair_mask = hidden_mask[:, None] & hidden_mask[None, :]
    base = (f * GROUPS + group) * BH
    tl.store(sum_ptr + base + hidden, total, mask=hidden_mask)
    tl.store(m2_ptr + (base + hidden)[:, None] * BH + hidden[None, :], centred, mask=pair_mask)


def moments_pass_launch(frames, shape: Shape, dtype, arch) -> Launch:
    tokens, hidden, groups = shape.tokens, shape.hidden, shape.groups
    chosen = tiles("moments_pass", shape, dtype, arch)
    bh = chosen["BH"]
    return Launch(name="moments_pass", grid=(frames, groups), tiles=chosen, reread_factor=1,
                  bytes_read=frames * tokens * hidden * 4,  # z is float32
                  writes={"h_sums": ((frames, groups, bh), 4), "h_moments": ((frames, groups, bh, bh), 4)},
                  host_read=frames * groups * (bh + bh * bh) * 4,
                  flops=2 * frames * tokens * hidden * hidden // groups)


def run_moments_pass(launch: Launch, z, bn1_scale, bn1_shift, groups, interpret):
    """Mean [H] and biased covariance [G, H/G, H/G] of h over all F*N tokens, in float64."""
    frames, tokens, hidden = z.shape
    bh = launch.tiles["BH"]
    sums = z.new_zeros(frames, groups, bh, dtype=torch.float32)
    m2 = z.new_zeros(frames, groups, bh, bh, dtype=torch.float32)
    moments_pass_kernel[launch.grid](z, bn1_scale, bn1_shift, sums, m2, tokens, hidden, groups,
                                     INTERPRET=interpret, **launch.tiles)
    hg = hidden // groups
    sums, m2 = sums[..., :hg].double(), m2[..., :hg, :hg].double()
    frame_means = sums / tokens  # [F, G, hg]
    mean = frame_means.mean(0)
    spread = frame_means - mean
    cov = (m2.sum(0) + tokens * torch.einsum("fgi,fgj->gij", spread, spread)) / (frames * tokens)
    return mean.reshape(hidden), cov
