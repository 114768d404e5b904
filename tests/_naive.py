"""A deliberately naive float64 DG-SCT, frame by frame, written step by step from SPEC.md.

It shares no code with the package: softmax, sigmoid, LayerNorm and BatchNorm are
spelled out, and the 1x1 convolutions run as F.conv2d on the authors' [1, C, N, 1]
layout so the weight layouts are checked independently of `reference.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _softmax(t):
    e = torch.exp(t - t.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _sigmoid(t):
    return 1.0 / (1.0 + torch.exp(-t))


def _relu(t):
    return torch.where(t > 0, t, torch.zeros_like(t))


def _layer_norm(t, weight, bias, eps):
    mean = t.sum(-1, keepdim=True) / t.shape[-1]
    var = ((t - mean) ** 2).sum(-1, keepdim=True) / t.shape[-1]
    return (t - mean) / torch.sqrt(var + eps) * weight + bias


def _conv1x1(tokens_by_channel, weight, groups):
    """[N, Cin] through a (grouped) 1x1 Conv2d on the authors' [1, Cin, N, 1] layout."""
    image = tokens_by_channel.t().reshape(1, tokens_by_channel.shape[1], tokens_by_channel.shape[0], 1)
    return F.conv2d(image, weight, groups=groups)[0, :, :, 0].t()


def _batch_norm_all_frames(frames, p, prefix, eps, training):
    """BatchNorm over every token of every frame; returns outputs and (mean, biased var)."""
    stacked = torch.stack(frames)  # [F, N, Ch]
    count = stacked.shape[0] * stacked.shape[1]
    if training:
        mean = stacked.sum((0, 1)) / count
        var = ((stacked - mean) ** 2).sum((0, 1)) / count
    else:
        mean, var = p[prefix + ".running_mean"], p[prefix + ".running_var"]
    out = (stacked - mean) / torch.sqrt(var + eps) * p[prefix + ".weight"] + p[prefix + ".bias"]
    return list(out), mean, var


def naive_dgsct(x, g, p, *, alpha, beta, gamma, groups, training, eps=1e-5, momentum=0.1):
    """Returns (residual [F,N,C], spatial_map [F,N], temporal_gate [F], new running stats dict)."""
    frames, N, C = x.shape
    use_bn = p.get("bn1.weight") is not None
    pre_bn1, maps, gates = [], [], []
    for f in range(frames):
        # 1. U = Wtok g + btok (Conv2d over the guide tokens), P = U Wfc^T + bfc
        guide_image = g[f].reshape(1, g.shape[1], g.shape[2], 1)
        u = F.conv2d(guide_image, p["conv_adapter.weight"], p["conv_adapter.bias"])[0, :, :, 0]
        P = u @ p["fc.weight"].t() + p["fc.bias"]
        # 2. R = my_tokens + softmax(my_tokens P^T) P
        tokens = p["my_tokens"]
        R = tokens + _softmax(tokens @ P.t()) @ P
        # 3. x1 = x + gate_av softmax(x R^T) R
        x1 = x[f] + p["gate_av"] * (_softmax(x[f] @ R.t()) @ R)
        # 4. a = mean over rows of P
        a = P.sum(0) / N
        # 5. channel attention
        qa1 = _relu(p["fc_affine_audio_1.weight"] @ a + p["fc_affine_audio_1.bias"])
        qv1 = _relu(x1 @ p["fc_affine_video_1.weight"].t() + p["fc_affine_video_1.bias"])
        joint = (qa1 * qv1).sum(0) / N
        hidden = _relu(p["fc_affine_bottleneck.weight"] @ joint + p["fc_affine_bottleneck.bias"])
        ch = _sigmoid(p["fc_affine_v_c_att.weight"] @ hidden + p["fc_affine_v_c_att.bias"])
        # 6. spatial attention
        xc = x1 * (1 + ch)
        qv2 = _relu(xc @ p["fc_affine_video_2.weight"].t() + p["fc_affine_video_2.bias"])
        qa2 = _relu(p["fc_affine_audio_2.weight"] @ a + p["fc_affine_audio_2.bias"])
        s = (qv2 * qa2) @ p["fc_affine_v_s_att.weight"][0] + p["fc_affine_v_s_att.bias"][0]
        sp_sig = _sigmoid(s)
        maps.append(_softmax(torch.tanh(s)))
        # 7. temporal gate
        tg = _sigmoid(p["temporal_gated.0.weight"][0] @ a + p["temporal_gated.0.bias"][0])
        gates.append(tg)
        # 8. modulation
        xm = x1 * (alpha * ch + beta * sp_sig[:, None] + gamma * tg + 1 - alpha)
        # 9. bottleneck, up to the first BatchNorm
        y = xm
        if p.get("ln_before.weight") is not None:
            y = _layer_norm(xm, p["ln_before.weight"], p["ln_before.bias"], eps)
        pre_bn1.append(_conv1x1(y, p["down_sampler.weight"], groups))
    stats = {}
    hidden_frames = pre_bn1
    if use_bn:
        hidden_frames, stats["bn1.mean"], stats["bn1.var"] = _batch_norm_all_frames(pre_bn1, p, "bn1", eps, training)
    pre_bn2 = [_conv1x1(_relu(z), p["up_sampler.weight"], groups) for z in hidden_frames]
    outs = pre_bn2
    if use_bn:
        outs, stats["bn2.mean"], stats["bn2.var"] = _batch_norm_all_frames(pre_bn2, p, "bn2", eps, training)
    final = []
    for o in outs:
        if p.get("ln_post.weight") is not None:
            o = _layer_norm(o, p["ln_post.weight"], p["ln_post.bias"], eps)
        if p.get("gate") is not None:
            o = p["gate"] * o
        final.append(o)
    running = {}
    if use_bn and training:
        count = frames * N
        for prefix in ("bn1", "bn2"):
            mean, var = stats[prefix + ".mean"].detach(), stats[prefix + ".var"].detach()
            running[prefix + ".running_mean"] = (1 - momentum) * p[prefix + ".running_mean"] + momentum * mean
            running[prefix + ".running_var"] = ((1 - momentum) * p[prefix + ".running_var"]
                                                + momentum * var * count / (count - 1))
    return torch.stack(final), torch.stack(maps), torch.stack(gates), running
