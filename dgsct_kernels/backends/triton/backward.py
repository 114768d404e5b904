"""The Triton backend's backward: SPEC.md differentiated by hand, from x, g and small state.

The forward's kernels recompute the per-frame vectors, the spatial logit s, the hidden
z [F, N, H] and the batch statistics (`FrameState`), so those are bit-identical to the
forward's. The gradient then runs in two stages, in float32:

  tail   z -> o: bn1, relu, up projection, bn2, ln_post, gate. One fused Triton pass
         (output_backward_pass.py) recomputes u from z and writes only du; train-mode bn2
         needs per-channel sums over all F*N tokens first, so in training it runs twice.
         The up projection's two products and bn1's backward (on [F, N, C/r]) follow.
  front  dz -> dx. One fused Triton pass (modulation_backward_pass.py) recomputes x1
         and the modulation, takes dy = dz W_down through ln_before and the modulation,
         reduces d scale on chip (per token for ds, per frame for dch and dtg), and
         writes y and dx1. Then the spatial, channel and prompt attention in Triton
         passes (attention_backward_pass.py: relu masks as int8, dx1 updated in place,
         per-frame sums as per-block partials, W_video_1/2 gradients as split-K
         reductions), with only their [F, C]-sized steps (d s, the channel MLP) in
         PyTorch; and the per-frame layers and guide path (its rewritten or tokens-first
         order, P never formed) through torch.func.vjp on [F, K, C] tensors.

The weight gradients of the tail and of the down projection are reductions over all F*N
tokens of two token-sized operands (y, du, h, ...) fed to cuBLAS, freed as it goes and
never saved by the forward; the attention layers' are split-K Triton reductions. Which
suits the others is for GPU timings to decide (benchmarks/NOTES.md).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...config import Hyper, dims_from_params
from ...guide_path import prompts_and_pooled_guide
from ...precision import operand_dtype
from .attention_backward_pass import (attention_backward_launches, run_attention_masks, run_attention_weight_grad,
                                      run_channel_backward, run_prompt_backward, run_spatial_backward)
from .common import dot_dtype, interpreting
from .modulation_backward_pass import modulation_backward_launch, run_modulation_backward
from .output_backward_pass import output_backward_launch, run_output_backward
from .tiling import Shape, current_arch

_GUIDE_NAMES = ("conv_adapter.weight", "conv_adapter.bias", "fc.weight", "fc.bias", "my_tokens")


def _grouped_weight_grad(grad_out: Tensor, inp: Tensor, weight: Tensor) -> Tensor:
    """d weight of `grouped_linear(inp, weight)` over all tokens."""
    cout, cin_g = weight.shape[0], weight.shape[1]
    groups = inp.shape[-1] // cin_g
    dout = grad_out.reshape(-1, groups, cout // groups)
    return torch.einsum("ngo,ngi->goi", dout, inp.reshape(-1, groups, cin_g)).reshape(weight.shape)


def _grouped_backward(grad_out: Tensor, inp: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of `grouped_linear(inp, weight)`: (d inp, d weight) over all tokens."""
    cout, cin_g = weight.shape[0], weight.shape[1]
    groups = inp.shape[-1] // cin_g
    dout = grad_out.reshape(-1, groups, cout // groups)
    d_inp = torch.einsum("ngo,goi->ngi", dout, weight.reshape(groups, cout // groups, cin_g))
    return d_inp.reshape(inp.shape), _grouped_weight_grad(grad_out, inp, weight)


def _batch_norm_backward(d_out: Tensor, inp: Tensor, weight: Tensor, mean: Tensor, var: Tensor,
                         eps: float, batch_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d input, d weight, d bias) of a channels-last BatchNorm over all tokens."""
    flat_d, flat_in = d_out.reshape(-1, d_out.shape[-1]), inp.reshape(-1, inp.shape[-1])
    rstd = torch.rsqrt(var.float() + eps)
    normed = (flat_in - mean.float()) * rstd
    d_bias = flat_d.sum(0)
    d_weight = (flat_d * normed).sum(0)
    if batch_stats:  # the batch mean and variance depend on every token
        count = flat_d.shape[0]
        d_inp = (weight * rstd) * (flat_d - (d_bias + normed * d_weight) / count)
    else:
        d_inp = flat_d * (weight * rstd)
    return d_inp.reshape(inp.shape), d_weight, d_bias


def backward(state, grads: Sequence[Tensor], x: Tensor, g: Tensor,
             params: Mapping[str, Optional[Tensor]], hyper: Hyper, training: bool, guide_order: str,
             wanted: Sequence[str]) -> dict[str, Tensor]:
    """Gradients for the names in `wanted`, given the recomputed forward `state`."""
    p = {k: v.float() if v is not None else None for k, v in params.items()}
    out: dict[str, Tensor] = {}
    grad_map, grad_tg = (t.float() for t in grads[1:])
    frames, tokens, _ = x.shape
    use_bn = p["bn1.weight"] is not None
    batch_stats = training and use_bn
    if batch_stats:
        mean1, var1, mean2, var2 = state.stats
    elif use_bn:
        mean1, var1 = p["bn1.running_mean"], p["bn1.running_var"]
        mean2, var2 = p["bn2.running_mean"], p["bn2.running_var"]

    # ---- tail: z -> o, fused up to du (output_backward_pass); then the up projection
    z = state.z
    shape = Shape.of(dims_from_params(params))
    arch = current_arch()
    launch = output_backward_launch(frames, shape, x.dtype, arch, params["ln_post.weight"] is not None)
    d_up, tail_grads = run_output_backward(launch, grads[0], z, state.bn1_affine, state.bn2_affine,
                                           (mean2, var2) if use_bn else None, params, hyper,
                                           batch_stats, interpreting())
    out.update(tail_grads)
    pre1 = z * state.bn1_affine[0] + state.bn1_affine[1]
    h = F.relu(pre1)
    d_h, out["up_sampler.weight"] = _grouped_backward(d_up, h, p["up_sampler.weight"])
    del d_up, h
    d_z = d_h * (pre1 > 0)
    if use_bn:
        d_z, out["bn1.weight"], out["bn1.bias"] = _batch_norm_backward(
            d_z, z, p["bn1.weight"], mean1, var1, hyper.bn1_eps, batch_stats)
    del pre1, d_h

    # ---- front: the down projection, ln_before and the modulation, fused
    # (modulation_backward_pass); it writes y and dx1, the operands of what follows
    prompts, ch, qa1, qa2, tg, s = state.prompts, state.ch, state.qa1, state.qa2, state.tg, state.s
    launch = modulation_backward_launch(frames, shape, x.dtype, arch, params["ln_before.weight"] is not None)
    y, d_x1, scale_row_sums, scale_frame_sums, d_ln_weight, d_ln_bias = run_modulation_backward(
        launch, x.contiguous(), prompts, ch, tg, s, d_z, params, hyper,
        dot_dtype(operand_dtype("spatial", x.dtype)), interpreting())
    out["down_sampler.weight"] = _grouped_weight_grad(d_z, y, p["down_sampler.weight"])
    del y, d_z
    if p["ln_before.weight"] is not None:
        out["ln_before.weight"], out["ln_before.bias"] = d_ln_weight, d_ln_bias
    d_ch = hyper.alpha * scale_frame_sums  # [F, C]
    d_sp_sigmoid = hyper.beta * scale_row_sums  # [F, N]
    d_tg = grad_tg + hyper.gamma * scale_row_sums.sum(1)  # [F]
    sp_sigmoid = torch.sigmoid(s)

    # the three attentions (attention_backward_pass.py). s feeds sigmoid(s) in the
    # modulation and softmax(tanh(s)) as the map: its gradient is [F, N] PyTorch
    tanh_s = torch.tanh(s)
    spatial_map = tanh_s.softmax(-1)
    d_tanh = spatial_map * (grad_map - (spatial_map * grad_map).sum(-1, keepdim=True))
    d_s = (d_sp_sigmoid * sp_sigmoid * (1 - sp_sigmoid) + d_tanh * (1 - tanh_s * tanh_s)).contiguous()
    interpret = interpreting()
    launches = attention_backward_launches(frames, shape, x.dtype, arch)
    x = x.contiguous()
    ws = p["fc_affine_v_s_att.weight"].reshape(-1)
    spatial_scale = (ws * qa2).contiguous()  # d v2 = d s * spatial_scale * (pre2 > 0)
    probs, mask2, mask1, t_sums, v1_sums = run_attention_masks(launches["attention_masks"], x, prompts, params,
                                                               ch, d_s, interpret)
    out["fc_affine_v_s_att.weight"] = (t_sums * qa2).sum(0).reshape(1, -1)  # t = sum_n d s * v2
    out["fc_affine_v_s_att.bias"] = d_s.sum().reshape(1)
    d_qa2 = t_sums * ws
    out["fc_affine_video_2.weight"], out["fc_affine_video_2.bias"] = run_attention_weight_grad(
        launches["weight_grad_video_2"], x, prompts, params, probs, mask2, spatial_scale, d_s, ch, interpret)
    d_ch += run_spatial_backward(launches["spatial_backward"], x, prompts, params, ch, d_s, spatial_scale, probs,
                                 mask2, d_x1, interpret)  # and d_x1 += d xc (1 + ch)
    del mask2

    # channel attention: ch = sigmoid(Wc relu(Wb joint + bb) + bc), joint = qa1 * mean_n(v1)
    hidden = F.relu(F.linear(state.joint, p["fc_affine_bottleneck.weight"], p["fc_affine_bottleneck.bias"]))
    d_pre_c = d_ch * ch * (1 - ch)
    out["fc_affine_v_c_att.weight"] = d_pre_c.t() @ hidden
    out["fc_affine_v_c_att.bias"] = d_pre_c.sum(0)
    d_pre_b = (d_pre_c @ p["fc_affine_v_c_att.weight"]) * (hidden > 0)
    out["fc_affine_bottleneck.weight"] = d_pre_b.t() @ state.joint
    out["fc_affine_bottleneck.bias"] = d_pre_b.sum(0)
    d_joint = d_pre_b @ p["fc_affine_bottleneck.weight"]
    d_qa1 = d_joint * (v1_sums / tokens)
    channel_scale = (d_joint * qa1 / tokens).contiguous()  # d v1 = channel_scale * (pre1 > 0)
    out["fc_affine_video_1.weight"], out["fc_affine_video_1.bias"] = run_attention_weight_grad(
        launches["weight_grad_video_1"], x, prompts, params, probs, mask1, channel_scale, interpret=interpret)
    d_logits = run_channel_backward(launches["channel_backward"], prompts, params, channel_scale, probs, mask1,
                                    d_x1, interpret)  # and d_x1 += d v1 W_video_1: the final dx1
    del mask1

    # prompt attention: x1 = x + gate_av * softmax(x R^T) R
    out["x"], d_prompts, out["gate_av"] = run_prompt_backward(launches["prompt_backward"], x, prompts, params,
                                                              probs, d_logits, d_x1, interpret)
    del d_x1, d_logits, probs

    # per-frame layers and the guide path, through the pooled guide a and the prompts R
    frame_names = ["fc_affine_audio_1.weight", "fc_affine_audio_1.bias", "fc_affine_audio_2.weight",
                   "fc_affine_audio_2.bias", "temporal_gated.0.weight", "temporal_gated.0.bias"]
    guide_names = list(_GUIDE_NAMES)

    def frame_vectors(g_, *weights):
        named = dict(zip(guide_names + frame_names, weights))
        prompts_, pooled = prompts_and_pooled_guide(g_, named, guide_order)
        qa1_ = F.relu(F.linear(pooled, named["fc_affine_audio_1.weight"], named["fc_affine_audio_1.bias"]))
        qa2_ = F.relu(F.linear(pooled, named["fc_affine_audio_2.weight"], named["fc_affine_audio_2.bias"]))
        tg_ = torch.sigmoid(F.linear(pooled, named["temporal_gated.0.weight"],
                                     named["temporal_gated.0.bias"])).reshape(frames)
        return prompts_, qa1_, qa2_, tg_

    _, pullback = torch.func.vjp(frame_vectors, g.float(), *(p[n] for n in guide_names + frame_names))
    d_frame = pullback((d_prompts, d_qa1, d_qa2, d_tg))
    out["g"] = d_frame[0].to(g.dtype)
    out.update(zip(guide_names + frame_names, d_frame[1:]))
    return {name: out[name].to(params[name].dtype) if name in params else out[name] for name in wanted}
