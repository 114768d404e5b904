"""Pass 1 over the tokens: the channel attention's token sum (SPEC.md step 5).

joint[f] = sum over n of qa1[f] * relu(x1[f, n] W_video_1^T + b). Each program takes a
block of tokens and of output channels and writes its partial sum; the host adds the
partials in a fixed order (deterministic, no atomics). x1 is never stored.
"""
import triton
import triton.language as tl

from .common import prompt_probabilities, relu, x1_times_weight
from .plan import Launch
from .tiling import Shape, latents_block, tiles


@triton.jit
def channel_pass_kernel(x_ptr, r_ptr, gate_av_ptr, w_ptr, b_ptr, qa1_ptr, partial_ptr,
                        N, C, K, token_blocks,
                        BN: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, KP: tl.constexpr,
                        DOT: tl.constexpr, INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    nb = tl.program_id(1)
    ob = tl.program_id(2)
    rows = nb * BN + tl.arange(0, BN)
    row_mask = rows < N
    x_frame = x_ptr + f * N * C
    r_frame = r_ptr + f * K * C
    gate_av = tl.load(gate_av_ptr).to(tl.float32)
    probs = prompt_probabilities(x_frame, r_frame, rows, row_mask, C, K, BN, BK, KP, DOT, INTERPRET)

    outs = ob * BO + tl.arange(0, BO)
    out_mask = outs < C
    acc = x1_times_weight(x_frame, r_frame, probs, gate_av, qa1_ptr, w_ptr, rows, row_mask, outs,
                          out_mask, C, K, BN, BK, BO, KP, False, DOT, INTERPRET)
    bias = tl.load(b_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)
    qv1 = tl.where(row_mask[:, None], relu(acc + bias[None, :]), 0.0)
    qa1 = tl.load(qa1_ptr + f * C + outs, mask=out_mask, other=0.0)
    partial = tl.sum(qv1 * qa1[None, :], 0)
    tl.store(partial_ptr + (f * token_blocks + nb) * C + outs, partial, mask=out_mask)


def channel_pass_launch(frames, shape: Shape, dtype, arch) -> Launch:
    tokens, dim, latents, itemsize = shape.tokens, shape.dim, shape.latents, dtype.itemsize
    chosen = tiles("channel_pass", shape, dtype, arch)
    bn, bo = chosen["BN"], chosen["BO"]
    token_blocks, out_blocks = triton.cdiv(tokens, bn), triton.cdiv(dim, bo)
    return Launch(
        name="channel_pass", grid=(frames, token_blocks, out_blocks),
        tiles=chosen,
        bytes_read=(frames * tokens * dim + dim * dim + dim) * itemsize  # x, W_video_1, b
        + frames * (latents + 1) * dim * 4,  # R and qa1 (float32)
        writes={"joint_partials": ((frames, token_blocks, dim), 4)},
        reread_factor=out_blocks,  # programs of one token block share x through the cache
        host_read=frames * token_blocks * dim * 4,
        flops=frames * tokens * (2 * dim * dim + out_blocks * 4 * dim * latents),
        split_flops=frames * tokens * out_blocks * 4 * dim * latents)  # x1's products


def run_channel_pass(launch: Launch, x, prompts, gate_av, weight, bias, qa1, dot_dtype, interpret):
    frames, tokens, dim = x.shape
    partial = x.new_empty(frames, launch.grid[1], dim, dtype=qa1.dtype)
    channel_pass_kernel[launch.grid](
        x, prompts, gate_av, weight, bias, qa1, partial, tokens, dim, prompts.shape[1], launch.grid[1],
        KP=latents_block(prompts.shape[1]), DOT=dot_dtype, INTERPRET=interpret, **launch.tiles)
    return partial.sum(1)

