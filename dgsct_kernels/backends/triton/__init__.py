"""The `triton` backend: SPEC.md's forward in a few fused passes over the tokens.

  guide path   R and a without forming P, in the cheapest runnable order (guide_path.py)
  per frame    qa1, qa2, tg from a; after pass 1, ch (tiny [F, C] products, PyTorch)
  pass 1       channel_pass: the token sum of qa1 * qv1 (x read, x1/qv1 on chip)
  pass 2       bottleneck_pass: s, modulation, ln_before, down projection -> z [F, N, C/r]
  pass 3       moments_pass (training with BatchNorm): bn2's batch statistics from h's moments
  pass 4       output_pass: bn1, relu, up projection, bn2, ln_post, gate -> o

No [F, N, C] intermediate of steps 3, 5, 6 or 8 is written. The backward (backward.py)
reruns the guide path and passes 1-3 to recompute the frame state (s, z, batch statistics:
bit-identical to the forward's) and differentiates SPEC.md by hand in float32, with the
matrix products in torch; fusing its elementwise chains into token passes waits for a GPU
to measure. Until the backend has been measured on a GPU, `auto` does not choose it
(select it with backend="triton").
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...config import Hyper, dims_from_params
from ...dispatch import Backend, Problem, register
from ...precision import operand_dtype
from ...measured import gpu_auto_reasons
from ...guide_path import plan_guide_path, prompts_and_pooled_guide
from ...reference import RawOutputs

try:
    import triton

    from .common import dot_dtype, interpreting
    from .tiling import Shape, current_arch
    _IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # the backend reports itself unavailable
    _IMPORT_ERROR = str(error)

    def interpreting() -> bool:
        return False


class TritonBackend(Backend):
    name = "triton"
    rank = 20
    devices = ("cuda", "cpu")
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    description = ("fused Triton forward passes; hand-derived backward from recomputed frame "
                   "state (CPU through TRITON_INTERPRET=1)")
    # the guide pass keeps float32 operands (3xTF32) for now; the backward's products are float32
    low_precision_products = frozenset({"channel", "spatial"})

    def unavailable_reason(self) -> Optional[str]:
        return f"triton is not importable ({_IMPORT_ERROR})" if _IMPORT_ERROR else None

    def shape_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        if problem.device_type == "cpu" and not interpreting():
            reasons.append("CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)")
        return reasons

    def auto_reasons(self, problem: Problem) -> list[str]:
        if problem.device_type == "cpu":
            return ["the CPU runs Triton only through its interpreter, for tests"]
        # on GPUs: measured speed, else the roofline estimate among compile-clean backends (measured.py)
        return gpu_auto_reasons(self.name, problem)

    def roofline_works(self, problem: Problem):
        plan = self.plan(problem.frames, problem.dims, problem.dtype, problem.training, True, True,
                         problem.use_bn)
        return [launch.work(problem.dtype) for launch in plan.launches]

    def plan(self, frames: int, dims, dtype: torch.dtype, training: bool, use_ln_before: bool,
             use_ln_post: bool, use_bn: bool, arch: Optional[int] = None):
        """The launches of one forward call; `arch` defaults to sm_90 (H100/H200) off a GPU."""
        return _plan(frames, dims, dtype, training and use_bn, use_ln_before, use_ln_post,
                     90 if arch is None else arch)

    def forward(self, x: Tensor, g: Tensor, params: Mapping[str, Optional[Tensor]], hyper: Hyper,
                training: bool) -> RawOutputs:
        with _interpreter_guard():
            return _forward(x.contiguous(), g.contiguous(), params, hyper, training)

    def backward(self, grads: Sequence[Tensor], x: Tensor, g: Tensor,
                 params: Mapping[str, Optional[Tensor]], hyper: Hyper, training: bool,
                 wanted: Sequence[str]) -> dict[str, Tensor]:
        from .backward import backward

        with _interpreter_guard():
            _, _, state = _frame_state(x.contiguous(), g.contiguous(), params, hyper, training)
            order = _plan_guide(x.shape[0], dims_from_params(params)).order
            return backward(state, grads, x, g, params, hyper, training, order, wanted)


_interpreter_lock = threading.Lock()


def _interpreter_guard():
    """Triton's CPU interpreter patches triton.language globally while a kernel runs, so two
    threads interpreting at once break each other; compiled GPU launches need no lock."""
    return _interpreter_lock if interpreting() else contextlib.nullcontext()


def _plan_guide(frames, dims):
    return plan_guide_path(frames, dims.tokens, dims.guide_tokens, dims.guide_dim, dims.dim,
                           dims.num_latents)


def _plan(frames, dims, dtype, batch_stats, use_ln_before, use_ln_post, arch):
    from .bottleneck_pass import bottleneck_pass_launch
    from .channel_pass import channel_pass_launch
    from .guide_pass import guide_pass_launches
    from .moments_pass import moments_pass_launch
    from .output_pass import output_pass_launch
    from .plan import Plan, guide_path_launch

    itemsize = dtype.itemsize
    N, C, K = dims.tokens, dims.dim, dims.num_latents
    shape = Shape.of(dims)
    plan = Plan()
    guide = _plan_guide(frames, dims)
    plan.guide_order, plan.guide_flops = guide.order, guide.flops
    if guide.order == "rewritten":
        for launch in guide_pass_launches(frames, shape, dtype, arch):
            plan.add(launch)
    else:
        plan.add(guide_path_launch(guide.order, frames, N, dims.guide_tokens, dims.guide_dim, C, K,
                                   itemsize, guide.flops[guide.order]))
    plan.add(channel_pass_launch(frames, shape, dtype, arch))
    plan.add(bottleneck_pass_launch(frames, shape, dtype, arch, use_ln_before))
    if batch_stats:
        plan.add(moments_pass_launch(frames, shape, dtype, arch))
    plan.add(output_pass_launch(frames, shape, dtype, arch, use_ln_post))
    return plan


def _bn_affine(weight, bias, mean, var, eps, size, like):
    """BatchNorm as per-channel (scale, shift) in float32; identity when there is none."""
    if weight is None:
        return (torch.ones(size, device=like.device), torch.zeros(size, device=like.device))
    scale = weight.double() * torch.rsqrt(var.double() + eps)
    return scale.float().contiguous(), (bias.double() - mean.double() * scale).float().contiguous()


@dataclass
class FrameState:
    """What the forward computes besides o: per-frame vectors, s, z and BatchNorm's maps.

    The backward recomputes this with the same kernels (so its s, z and batch statistics
    are the forward's exactly) and differentiates from it.
    """
    prompts: Tensor  # R [F, K, C], float32
    pooled: Tensor  # a [F, C]
    qa1: Tensor
    qa2: Tensor
    tg: Tensor  # [F]
    joint: Tensor  # [F, C], the channel attention's token mean
    ch: Tensor
    s: Tensor  # spatial logit [F, N]
    z: Tensor  # pre-bn1 hidden [F, N, H], float32
    bn1_affine: tuple[Tensor, Tensor]  # per-channel (scale, shift), float32
    bn2_affine: tuple[Tensor, Tensor]
    stats: list[Tensor]  # batch mean, var of bn1 and bn2 (empty unless training with BN)


def _forward(x, g, p, hyper, training) -> RawOutputs:
    from .output_pass import run_output_pass

    _, launches, state = _frame_state(x, g, p, hyper, training)
    o = run_output_pass(launches["output_pass"], state.z, state.bn1_affine, state.bn2_affine, p, hyper,
                        x.shape[-1], x.dtype, interpreting())
    spatial_map = torch.tanh(state.s).softmax(-1)
    return RawOutputs(o, spatial_map.to(x.dtype), state.tg.to(x.dtype), *state.stats)


def _frame_state(x, g, p, hyper, training):
    """Guide path, per-frame vectors and token passes 1-3: everything before pass 4."""
    from .bottleneck_pass import run_bottleneck_pass
    from .channel_pass import run_channel_pass
    from .guide_pass import run_guide_pass
    from .moments_pass import run_moments_pass

    frames, tokens, dim = x.shape
    use_bn = p["bn1.weight"] is not None
    batch_stats = training and use_bn
    dims = dims_from_params(p)
    plan = _plan(frames, dims, x.dtype, batch_stats, p["ln_before.weight"] is not None,
                 p["ln_post.weight"] is not None, current_arch())
    launches = {k.name: k for k in plan.launches}
    interpret = interpreting()
    # the small per-frame layers run in float32; the large weights stay in x's dtype
    f32 = {k: v.float() for k, v in p.items()
           if v is not None and k.startswith(("fc_affine", "temporal_gated"))}

    # guide path and the per-frame vectors, in float32
    if plan.guide_order == "rewritten":
        guide = [k for k in plan.launches if k.name.startswith("guide_")]
        prompts, pooled = run_guide_pass(guide, g, p, interpret)
    else:
        guide_params = {k: v.float() if v is not None else None for k, v in p.items()}
        prompts, pooled = prompts_and_pooled_guide(g.float(), guide_params, plan.guide_order)
        prompts = prompts.contiguous()
    qa1 = F.relu(F.linear(pooled, f32["fc_affine_audio_1.weight"], f32["fc_affine_audio_1.bias"])).contiguous()
    qa2 = F.relu(F.linear(pooled, f32["fc_affine_audio_2.weight"], f32["fc_affine_audio_2.bias"])).contiguous()
    tg = torch.sigmoid(F.linear(pooled, f32["temporal_gated.0.weight"], f32["temporal_gated.0.bias"]))
    tg = tg.reshape(frames).contiguous()

    joint = run_channel_pass(launches["channel_pass"], x, prompts, p["gate_av"], p["fc_affine_video_1.weight"],
                             p["fc_affine_video_1.bias"], qa1,
                             dot_dtype(operand_dtype("channel", x.dtype)), interpret) / tokens
    hidden = F.relu(F.linear(joint, f32["fc_affine_bottleneck.weight"], f32["fc_affine_bottleneck.bias"]))
    ch = torch.sigmoid(F.linear(hidden, f32["fc_affine_v_c_att.weight"], f32["fc_affine_v_c_att.bias"]))
    ch = ch.contiguous()

    s, z, zsum, zm2 = run_bottleneck_pass(launches["bottleneck_pass"], x, prompts, p["gate_av"], ch, qa2, tg,
                                          p, hyper, dot_dtype(operand_dtype("spatial", x.dtype)), interpret)

    H = dims.hidden
    stats = [x.new_empty(0) for _ in range(4)]
    if batch_stats:
        count = frames * tokens
        block_counts = _block_counts(tokens, launches["bottleneck_pass"].tiles["BN"], x.device)
        block_means = zsum.double() / block_counts[:, None]
        mean1 = zsum.double().sum((0, 1)) / count
        var1 = (zm2.double().sum((0, 1))
                + (block_counts[:, None] * (block_means - mean1) ** 2).sum((0, 1))) / count
        bn1_affine = _bn_affine(p["bn1.weight"], p["bn1.bias"], mean1, var1, hyper.bn1_eps, H, x)
        mean_h, cov_h = run_moments_pass(launches["moments_pass"], z, *bn1_affine, dims.groups, interpret)
        w_up = p["up_sampler.weight"].double().reshape(dims.groups, dim // dims.groups, -1)
        mean2 = torch.einsum("goi,gi->go", w_up, mean_h.reshape(dims.groups, -1)).reshape(dim)
        var2 = torch.einsum("goi,gij,goj->go", w_up, cov_h, w_up).reshape(dim)
        bn2_affine = _bn_affine(p["bn2.weight"], p["bn2.bias"], mean2, var2, hyper.bn2_eps, dim, x)
        stats = [mean1.float(), var1.float(), mean2.float(), var2.float()]
    elif use_bn:
        bn1_affine = _bn_affine(p["bn1.weight"], p["bn1.bias"], p["bn1.running_mean"], p["bn1.running_var"],
                                hyper.bn1_eps, H, x)
        bn2_affine = _bn_affine(p["bn2.weight"], p["bn2.bias"], p["bn2.running_mean"], p["bn2.running_var"],
                                hyper.bn2_eps, dim, x)
    else:
        bn1_affine = _bn_affine(None, None, None, None, 0.0, H, x)
        bn2_affine = _bn_affine(None, None, None, None, 0.0, dim, x)
    state = FrameState(prompts, pooled, qa1, qa2, tg, joint, ch, s, z, bn1_affine, bn2_affine, stats)
    return plan, launches, state


def _block_counts(tokens: int, block: int, device) -> Tensor:
    """Tokens in each block of `block` rows (the last one may be partial)."""
    blocks = triton.cdiv(tokens, block)
    counts = torch.full((blocks,), float(block), dtype=torch.float64, device=device)
    counts[-1] = tokens - block * (blocks - 1)
    return counts


register(TritonBackend())
