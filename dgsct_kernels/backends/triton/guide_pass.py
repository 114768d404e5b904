"""The guide path in Triton, in SPEC.md's rewritten order (P and U are never formed).

  scores_kernel    one sweep over g: Sg = Q g^T [F, K, M] and the partial sums of wbar g,
                   with Q = my_tokens Wfc and wbar the mean row of Wtok
  logits_kernel    S = Sg Wtok^T + (Q 1_D) btok^T [F, K, N]
  apply_kernel     A = softmax_N(S) on the fly (row max and sum from one sweep of S),
                   A Wtok for a block of M, times g: partial ((A Wtok) g) [F, blocks, K, D],
                   and A btok

The host adds the partials and finishes with [K, D] x Wfc^T products (SPEC.md's
identities). Everything accumulates in float32; g is read in its own dtype, twice. The
products take float32 operands (3xTF32 on tensor cores, common.matmul): R and a feed
every later step of every token.
"""
import torch
import triton
import triton.language as tl

from .common import matmul
from .plan import Launch
from .tiling import Shape, latents_block, tiles


@triton.jit
def scores_kernel(g_ptr, q_ptr, wbar_ptr, sg_ptr, pooled_ptr, M, D, K,
                  BM: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    mb = tl.program_id(1)
    ms = mb * BM + tl.arange(0, BM)
    m_mask = ms < M
    ks = tl.arange(0, KP)
    wbar = tl.load(wbar_ptr + ms, mask=m_mask, other=0.0)
    acc = tl.zeros((KP, BM), dtype=tl.float32)
    tl.assume(D > 0)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_mask = ds < D
        g = tl.load(g_ptr + (f * M + ms)[:, None] * D + ds[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        q = tl.load(q_ptr + ks[:, None] * D + ds[None, :], mask=(ks[:, None] < K) & d_mask[None, :],
                    other=0.0)
        acc += matmul(q, tl.trans(g), tl.float32, INTERPRET)
        tl.store(pooled_ptr + (f * tl.num_programs(1) + mb) * D + ds, tl.sum(wbar[:, None] * g, 0),
                 mask=d_mask)
    tl.store(sg_ptr + (f * K + ks)[:, None] * M + ms[None, :], acc,
             mask=(ks[:, None] < K) & m_mask[None, :])


@triton.jit
def logits_kernel(sg_ptr, wtok_ptr, btok_ptr, qsum_ptr, s_ptr, N, M, K,
                  BN: tl.constexpr, BM: tl.constexpr, KP: tl.constexpr, INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    nb = tl.program_id(1)
    ns = nb * BN + tl.arange(0, BN)
    n_mask = ns < N
    ks = tl.arange(0, KP)
    k_mask = ks < K
    acc = tl.zeros((KP, BN), dtype=tl.float32)
    tl.assume(M > 0)
    for m0 in range(0, M, BM):
        ms = m0 + tl.arange(0, BM)
        m_mask = ms < M
        sg = tl.load(sg_ptr + (f * K + ks)[:, None] * M + ms[None, :],
                     mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        w = tl.load(wtok_ptr + ns[:, None] * M + ms[None, :], mask=n_mask[:, None] & m_mask[None, :],
                    other=0.0)
        acc += matmul(sg, tl.trans(w), tl.float32, INTERPRET)
    btok = tl.load(btok_ptr + ns, mask=n_mask, other=0.0).to(tl.float32)
    qsum = tl.load(qsum_ptr + ks, mask=k_mask, other=0.0)
    acc += qsum[:, None] * btok[None, :]
    tl.store(s_ptr + (f * K + ks)[:, None] * N + ns[None, :], acc, mask=k_mask[:, None] & n_mask[None, :])


@triton.jit
def apply_kernel(s_ptr, wtok_ptr, btok_ptr, g_ptr, applied_ptr, attn_bias_ptr, N, M, D, K,
                 BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr,
                 INTERPRET: tl.constexpr):
    f = tl.program_id(0)
    mb = tl.program_id(1)
    ks = tl.arange(0, KP)
    k_mask = ks < K
    tl.assume(N > 0)
    tl.assume(D > 0)
    # softmax statistics of the frame's K score rows over the N tokens
    row_max = tl.full((KP,), float("-inf"), dtype=tl.float32)
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)
        s = tl.load(s_ptr + (f * K + ks)[:, None] * N + ns[None, :],
                    mask=k_mask[:, None] & (ns < N)[None, :], other=float("-inf"))
        row_max = tl.maximum(row_max, tl.max(s, 1))
    row_max = tl.where(k_mask, row_max, 0.0)
    row_sum = tl.zeros((KP,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)
        s = tl.load(s_ptr + (f * K + ks)[:, None] * N + ns[None, :],
                    mask=k_mask[:, None] & (ns < N)[None, :], other=float("-inf"))
        row_sum += tl.sum(tl.exp(s - row_max[:, None]), 1)
    row_sum = tl.where(k_mask, row_sum, 1.0)

    ms = mb * BM + tl.arange(0, BM)
    m_mask = ms < M
    attn_w = tl.zeros((KP, BM), dtype=tl.float32)  # (A Wtok)[:, block]
    attn_b = tl.zeros((KP,), dtype=tl.float32)  # A btok
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)
        n_mask = ns < N
        s = tl.load(s_ptr + (f * K + ks)[:, None] * N + ns[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=float("-inf"))
        a = tl.where(k_mask[:, None] & n_mask[None, :], tl.exp(s - row_max[:, None]) / row_sum[:, None], 0.0)
        w = tl.load(wtok_ptr + ns[:, None] * M + ms[None, :], mask=n_mask[:, None] & m_mask[None, :],
                    other=0.0)
        attn_w += matmul(a, w, tl.float32, INTERPRET)
        attn_b += tl.sum(a * tl.load(btok_ptr + ns, mask=n_mask, other=0.0).to(tl.float32)[None, :], 1)
    if mb == 0:
        tl.store(attn_bias_ptr + f * K + ks, attn_b, mask=k_mask)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_mask = ds < D
        g = tl.load(g_ptr + (f * M + ms)[:, None] * D + ds[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        part = matmul(attn_w, g, tl.float32, INTERPRET)
        tl.store(applied_ptr + ((f * tl.num_programs(1) + mb) * K + ks)[:, None] * D + ds[None, :], part,
                 mask=k_mask[:, None] & d_mask[None, :])


def guide_pass_launches(frames, shape: Shape, dtype, arch) -> list[Launch]:
    F, N, M, D, K = frames, shape.tokens, shape.guide_tokens, shape.guide_dim, shape.latents
    dim, itemsize = shape.dim, dtype.itemsize
    scores_tiles, logits_tiles, apply_tiles = (tiles(name, shape, dtype, arch)
                                               for name in ("guide_scores", "guide_logits", "guide_apply"))
    bm_scores, bn, bm_apply = scores_tiles["BM"], logits_tiles["BN"], apply_tiles["BM"]
    m_blocks_scores, m_blocks_apply = triton.cdiv(M, bm_scores), triton.cdiv(M, bm_apply)
    f32 = 4
    g_bytes, wtok_bytes = F * M * D * itemsize, N * M * itemsize
    sg_bytes, s_bytes = F * K * M * f32, F * K * N * f32  # read back by the next kernel
    return [
        Launch("guide_scores", (F, m_blocks_scores), scores_tiles,
               bytes_read=g_bytes + M * f32 + K * D * f32,
               writes={"Sg": ((F, K, M), f32), "pooled_partials": ((F, m_blocks_scores, D), f32)},
               flops=2 * F * K * M * D, split_flops=2 * F * K * M * D,  # float32 operands
               host_read=F * m_blocks_scores * D * f32),
        Launch("guide_logits", (F, triton.cdiv(N, bn)), logits_tiles,
               bytes_read=sg_bytes + wtok_bytes + N * itemsize, writes={"S": ((F, K, N), f32)},
               flops=2 * F * K * M * N, split_flops=2 * F * K * M * N),
        Launch("guide_apply", (F, m_blocks_apply), apply_tiles,
               bytes_read=s_bytes + wtok_bytes + g_bytes + N * itemsize,
               writes={"applied_partials": ((F, m_blocks_apply, K, D), f32), "A_btok": ((F, K), f32)},
               # plus the host's [K, D] x Wfc^T finish
               flops=2 * F * K * M * N + 2 * F * K * M * D + 2 * F * K * D * dim, reread_factor=3,
               split_flops=2 * F * K * M * N + 2 * F * K * M * D + 2 * F * K * D * dim,
               host_read=F * m_blocks_apply * K * D * f32 + F * K * f32),
    ]


def run_guide_pass(launches, g, p, interpret):
    """(R [F, K, C], a [F, C]) in float32, reading g and Wtok in their own dtype."""
    scores, logits, apply = launches
    frames, guide_tokens, guide_dim = g.shape
    wtok = p["conv_adapter.weight"].reshape(p["conv_adapter.weight"].shape[0], -1)
    tokens = wtok.shape[0]
    my_tokens, wfc = p["my_tokens"].float(), p["fc.weight"].float()
    btok, bfc = p["conv_adapter.bias"], p["fc.bias"].float()
    latents = my_tokens.shape[0]
    kp = latents_block(latents)
    q = (my_tokens @ wfc).contiguous()  # [K, D], frame-independent
    wbar = wtok.float().mean(0).contiguous()
    f32 = dict(device=g.device, dtype=torch.float32)
    sg = torch.empty(frames, latents, guide_tokens, **f32)
    pooled_parts = torch.empty(frames, scores.grid[1], guide_dim, **f32)
    scores_kernel[scores.grid](g, q, wbar, sg, pooled_parts, guide_tokens, guide_dim, latents,
                               KP=kp, INTERPRET=interpret, **scores.tiles)
    s = torch.empty(frames, latents, tokens, **f32)
    logits_kernel[logits.grid](sg, wtok, btok, q.sum(1).contiguous(), s, tokens, guide_tokens, latents,
                               KP=kp, INTERPRET=interpret, **logits.tiles)
    applied_parts = torch.empty(frames, apply.grid[1], latents, guide_dim, **f32)
    attn_bias = torch.empty(frames, latents, **f32)
    apply_kernel[apply.grid](s, wtok, btok, g, applied_parts, attn_bias, tokens, guide_tokens, guide_dim,
                             latents, KP=kp, INTERPRET=interpret, **apply.tiles)
    wfc_rowsum = wfc.sum(1)
    # A P = ((A Wtok) g) Wfc^T + (A btok)(Wfc 1_D)^T + rowsum(A) bfc^T, and rowsum(A) = 1
    prompts = my_tokens + applied_parts.sum(1) @ wfc.t() + attn_bias[..., None] * wfc_rowsum + bfc
    pooled = pooled_parts.sum(1) @ wfc.t() + btok.float().mean() * wfc_rowsum + bfc
    return prompts.contiguous(), pooled

