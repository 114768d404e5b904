"""SPEC.md in plain PyTorch, token-major: the single source of truth for the semantics.

`reference_forward` follows SPEC.md's steps 1-9 in the order written (the guide path
forms P, as the authors' module does). It never permutes: x is [F, N, C], g is [F, M, D].
It is functional: in training mode it returns BatchNorm's batch statistics instead of
updating running buffers, so callers (the module, the functional form) do that once.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Hyper, accumulation_dtype
from .guide_path import prompts_and_pooled_guide


class RawOutputs(NamedTuple):
    """What every backend's forward returns.

    bn*_mean / bn*_var are the batch mean and biased variance (training with BatchNorm)
    in the accumulation dtype, else empty tensors.
    """

    residual: Tensor  # [F, N, C]
    spatial_map: Tensor  # [F, N]
    temporal_gate: Tensor  # [F]
    bn1_mean: Tensor
    bn1_var: Tensor
    bn2_mean: Tensor
    bn2_var: Tensor


def grouped_linear(inp: Tensor, weight: Tensor) -> Tensor:
    """A grouped 1x1 convolution on token-major input: [..., Cin] x [Cout, Cin/G, 1, 1]."""
    cout, cin_per_group = weight.shape[0], weight.shape[1]
    groups = inp.shape[-1] // cin_per_group
    w = weight.reshape(groups, cout // groups, cin_per_group)
    y = inp.reshape(*inp.shape[:-1], groups, cin_per_group)
    return torch.einsum("...gi,goi->...go", y, w).reshape(*inp.shape[:-1], cout)


def _batch_norm(z: Tensor, p: Mapping[str, Optional[Tensor]], prefix: str, eps: float,
                training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch BatchNorm over all tokens of the batch, channels last; no buffer writes."""
    flat = z.reshape(-1, z.shape[-1])  # a view for contiguous z: channels stay last
    weight, bias = p[prefix + ".weight"], p[prefix + ".bias"]
    if training:
        out, mean, invstd = torch.native_batch_norm(flat, weight, bias, None, None, True, 0.0, eps)
        acc = accumulation_dtype(z.dtype)
        # the biased batch variance PyTorch normalised with, for the running-stat update
        var = invstd.detach().to(acc).pow(-2) - eps
        return out.reshape(z.shape), mean.detach().to(acc), var
    out = F.batch_norm(flat, p[prefix + ".running_mean"], p[prefix + ".running_var"], weight, bias,
                       False, 0.0, eps)
    return out.reshape(z.shape), z.new_empty(0), z.new_empty(0)


def guide_as_written(g: Tensor, p: Mapping[str, Optional[Tensor]]) -> tuple[Tensor, Tensor]:
    """SPEC.md steps 1, 2 and 4 as written, forming P: (R [F, K, C], a [F, C])."""
    # 1. guide projection: token mixing, then channel mapping
    wtok = p["conv_adapter.weight"].reshape(p["conv_adapter.weight"].shape[0], -1)  # [N, M]
    u = torch.matmul(wtok, g) + p["conv_adapter.bias"][:, None]  # [F, N, D]
    guide = F.linear(u, p["fc.weight"], p["fc.bias"])  # P: [F, N, C]
    # 2. latent prompt tokens read the guide
    tokens = p["my_tokens"]  # [K, C]
    scores = torch.matmul(tokens, guide.transpose(1, 2)).softmax(-1)  # [F, K, N]
    prompts = tokens + torch.matmul(scores, guide)  # R: [F, K, C]
    # 4. pooled guide
    return prompts, guide.mean(1)  # a: [F, C]


def reference_forward(x: Tensor, g: Tensor, p: Mapping[str, Optional[Tensor]], hyper: Hyper,
                      training: bool, guide_order: Optional[str] = None) -> RawOutputs:
    """SPEC.md's forward. `p` maps the authors' parameter names to tensors (None: layer off).

    `guide_order` None runs steps 1, 2 and 4 as written (P is formed); an order from
    `guide_path.RUNNABLE` computes the same R and a without P.
    """
    C = x.shape[-1]
    if guide_order is None:
        prompts, pooled = guide_as_written(g, p)
    else:
        prompts, pooled = prompts_and_pooled_guide(g, p, guide_order)
    # 3. target reads the prompt tokens
    attn = torch.matmul(x, prompts.transpose(1, 2)).softmax(-1)  # [F, N, K]
    x1 = x + p["gate_av"] * torch.matmul(attn, prompts)
    # 5. channel attention
    qa1 = F.relu(F.linear(pooled, p["fc_affine_audio_1.weight"], p["fc_affine_audio_1.bias"]))
    qv1 = F.relu(F.linear(x1, p["fc_affine_video_1.weight"], p["fc_affine_video_1.bias"]))
    joint = (qa1[:, None, :] * qv1).mean(1)  # [F, C]
    hidden = F.relu(F.linear(joint, p["fc_affine_bottleneck.weight"], p["fc_affine_bottleneck.bias"]))
    channel = torch.sigmoid(F.linear(hidden, p["fc_affine_v_c_att.weight"], p["fc_affine_v_c_att.bias"]))
    channel = channel[:, None, :]  # [F, 1, C]
    # 6. spatial attention
    xc = x1 * (channel + 1)
    qv2 = F.relu(F.linear(xc, p["fc_affine_video_2.weight"], p["fc_affine_video_2.bias"]))
    qa2 = F.relu(F.linear(pooled, p["fc_affine_audio_2.weight"], p["fc_affine_audio_2.bias"]))
    logit = F.linear(qv2 * qa2[:, None, :], p["fc_affine_v_s_att.weight"], p["fc_affine_v_s_att.bias"])
    spatial_sigmoid = torch.sigmoid(logit)  # [F, N, 1]
    spatial_map = torch.tanh(logit).squeeze(-1).softmax(-1)  # [F, N]
    # 7. temporal gate, one scalar per frame
    temporal = torch.sigmoid(F.linear(pooled, p["temporal_gated.0.weight"], p["temporal_gated.0.bias"]))
    # 8. modulation
    scale = (hyper.alpha * channel + hyper.beta * spatial_sigmoid + hyper.gamma * temporal[:, :, None]
             + 1 - hyper.alpha)
    xm = x1 * scale
    # 9. bottleneck adapter
    y = xm
    if p.get("ln_before.weight") is not None:
        y = F.layer_norm(y, (C,), p["ln_before.weight"], p["ln_before.bias"], hyper.ln_before_eps)
    z = grouped_linear(y, p["down_sampler.weight"])
    bn1_mean, bn1_var, bn2_mean, bn2_var = (x.new_empty(0) for _ in range(4))
    use_bn = p.get("bn1.weight") is not None
    if use_bn:
        z, bn1_mean, bn1_var = _batch_norm(z, p, "bn1", hyper.bn1_eps, training)
    out = grouped_linear(F.relu(z), p["up_sampler.weight"])
    if use_bn:
        out, bn2_mean, bn2_var = _batch_norm(out, p, "bn2", hyper.bn2_eps, training)
    if p.get("ln_post.weight") is not None:
        out = F.layer_norm(out, (C,), p["ln_post.weight"], p["ln_post.bias"], hyper.ln_post_eps)
    if p.get("gate") is not None:
        out = p["gate"] * out
    return RawOutputs(out, spatial_map, temporal.squeeze(-1), bn1_mean, bn1_var, bn2_mean, bn2_var)
