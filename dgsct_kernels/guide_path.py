"""SPEC.md steps 1, 2 and 4 without forming P, in PyTorch: shared by the fused backends.

P = (Wtok g + btok) Wfc^T + bfc is [F, N, C]; the prompts R and the pooled guide a only
need products with it, so they can be evaluated in a cheaper order (SPEC.md, "Cost
model"). Two orders never form P:

  tokens-first  U = Wtok g [F, N, D] is formed; S = Q U^T, A U, mean(U) follow.
  rewritten     S = (Q g^T) Wtok^T + (Q 1_D) btok^T, A P = ((A Wtok) g) Wfc^T + ...;
                only [F, K, M] and [F, K, N] products are formed.

`plan_guide_path` counts the FLOPs of these and of SPEC.md's channels-first order (which
must form P, so it is reported but never run) and picks the cheapest runnable one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor

ORDERS = ("as-written", "channels-first", "tokens-first", "rewritten")
RUNNABLE = ("tokens-first", "rewritten")


@dataclass(frozen=True)
class GuidePlan:
    order: str
    flops: dict[str, int]  # per order, the matrix-product FLOPs of steps 1, 2 and 4


def plan_guide_path(frames: int, tokens: int, guide_tokens: int, guide_dim: int, dim: int,
                    num_latents: int) -> GuidePlan:
    F, N, M, D, C, K = frames, tokens, guide_tokens, guide_dim, dim, num_latents
    prompt_on_p = 4 * F * K * N * C  # S = T P^T and A P on a materialised P
    flops = {
        "as-written": 2 * F * N * M * D + 2 * F * N * D * C + prompt_on_p,
        "channels-first": 2 * F * M * D * C + 2 * F * N * M * C + prompt_on_p,
        # U = Wtok g, then S = Q U^T and A U on [N, D], then [K, D] x Wfc^T
        "tokens-first": 2 * F * N * M * D + 4 * F * K * N * D + 2 * F * K * D * C,
        "rewritten": 2 * F * K * (2 * M * N + 2 * M * D + D * C),
    }
    order = min(RUNNABLE, key=flops.get)
    return GuidePlan(order, flops)


def guide_path_bytes(order: str, frames: int, tokens: int, guide_tokens: int, guide_dim: int,
                     dim: int, latents: int, input_itemsize: int) -> int:
    """DRAM bytes of `prompts_and_pooled_guide` run in float32 on inputs of
    `input_itemsize` bytes, op by op (each PyTorch op reads its inputs, writes its output)."""
    F, N, M, D, C, K = frames, tokens, guide_tokens, guide_dim, dim, latents
    f32 = 4
    upcast = (F * M * D + N * M) * (input_itemsize + f32)  # g.float() and Wtok.float()
    small = 4 * F * (K + 1) * C * f32  # [F, K, C] and [F, C] products and sums
    if order == "rewritten":
        g_reads, wtok_reads = 3, 2  # Q g^T, (A Wtok) g, wbar g; S and A Wtok
        km, kn = F * K * M * f32, F * K * N * f32
        inter = 2 * km + 6 * kn + 2 * km  # Q g^T; S (+bias), softmax, A Wtok reads A; A Wtok
    else:  # tokens-first
        g_reads, wtok_reads = 1, 1
        nd = F * N * D * f32
        inter = 2 * nd + 4 * nd + 2 * F * K * N * f32 * 2  # U, U + bias; U read by S, A U, mean
    return upcast + (g_reads * F * M * D + wtok_reads * N * M) * f32 + inter + small


def prompts_and_pooled_guide(g: Tensor, p: Mapping[str, Optional[Tensor]], order: str
                             ) -> tuple[Tensor, Tensor]:
    """(R [F, K, C], a [F, C]) in g's dtype, evaluated in `order` (see module docstring)."""
    wtok = p["conv_adapter.weight"].reshape(p["conv_adapter.weight"].shape[0], -1)  # [N, M]
    btok, wfc, bfc, tokens = p["conv_adapter.bias"], p["fc.weight"], p["fc.bias"], p["my_tokens"]
    q = tokens @ wfc  # [K, D], frame-independent
    wfc_rowsum = wfc.sum(1)  # Wfc 1_D, [C]
    if order == "tokens-first":
        u = torch.matmul(wtok, g) + btok[:, None]  # [F, N, D]
        attn = torch.matmul(q, u.transpose(1, 2)).softmax(-1)  # the T bfc term is constant in n
        prompt_res = torch.matmul(torch.matmul(attn, u), wfc.t()) + bfc
        pooled = torch.matmul(u.mean(1), wfc.t()) + bfc
    elif order == "rewritten":
        scores = torch.matmul(torch.matmul(q, g.transpose(1, 2)), wtok.t()) + (q.sum(1)[:, None] * btok)
        attn = scores.softmax(-1)  # [F, K, N]
        applied = torch.matmul(torch.matmul(attn, wtok), g)  # ((A Wtok) g): [F, K, D]
        prompt_res = (torch.matmul(applied, wfc.t()) + (attn @ btok)[..., None] * wfc_rowsum
                      + attn.sum(-1, keepdim=True) * bfc)
        pooled = torch.matmul(torch.matmul(wtok.mean(0), g), wfc.t()) + btok.mean() * wfc_rowsum + bfc
    else:
        raise ValueError(f"order={order!r}: expected one of {list(RUNNABLE)}")
    return tokens + prompt_res, pooled
