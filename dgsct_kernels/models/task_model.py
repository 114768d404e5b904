"""What every task model shares: the two-stream encoder with DG-SCT modules, its outputs
pooled per segment, then the task's head. A task subclasses `TaskModel` to name its head's
extra inputs (AVVP's clip features); `build_dgsct(task=...)` builds it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..module import check_state_dict
from .two_stream import TwoStreamEncoder, pool_tokens

if TYPE_CHECKING:
    from .presets import ModelPreset, TaskModules


class TaskModel(nn.Module):
    """`model(frames=[B, T, 3, S, S], audio=[B, T, samples], **extra)` -> dict of outputs:

      the head's outputs (see the task's head), from head(visual, audio, **extra)
      features      {"visual": [B, T, Cv], "audio": [B, T, Ca]}  pooled encoder outputs
      spatial_maps  {"visual": [B, T, H, W], "audio": [B, T, h, w]}  last p2 modules' maps

    Trainable: `encoder.*_adapter_blocks_*` (DG-SCT) and `head`; the encoders are frozen
    (their BatchNorm statistics still update in train mode, as in the authors' code, and are
    saved with the trainable part).
    """

    def __init__(self, visual: nn.Module, audio: nn.Module, head: nn.Module, *,
                 modules: TaskModules, preset: ModelPreset, backend: str = "auto",
                 encoders_eval: bool = False) -> None:
        super().__init__()
        self.task_modules, self.preset = modules, preset
        self.segments = modules.segments
        self.image_size, self.segment_samples = preset.image_size, preset.segment_samples
        self.encoder = TwoStreamEncoder(visual, audio, segments=modules.segments,
                                        module_kwargs=modules.module_kwargs(backend),
                                        audio_clip_samples=preset.clip_samples,
                                        encoders_eval=encoders_eval)
        self.head = head

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The parts that train, by their prefix in `state_dict()`."""
        out = {f"encoder.{name}": getattr(self.encoder, name)
               for name in ("audio_adapter_blocks_p1", "vis_adapter_blocks_p1",
                            "audio_adapter_blocks_p2", "vis_adapter_blocks_p2")}
        out["head"] = self.head
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict` of the whole model, all or nothing: keys (when
        `strict`), value types and shapes are checked before anything is copied, and a
        problem raises `RuntimeError` naming them (torch copies what fits, then raises).
        The trainable part alone loads with `load_trainable`."""
        check_state_dict(self, state_dict, strict=strict, what="load_state_dict")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_inputs(self, frames: Tensor, audio: Tensor) -> None:
        s, t, n = self.image_size, self.segments, self.segment_samples
        want_f = f"[B, T={t}, 3, {s}, {s}] floating"
        want_a = f"[B, T={t}, {n}] floating"
        for name, x, rank, want in (("frames", frames, 5, want_f), ("audio", audio, 3, want_a)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name}: got {type(x).__name__}, expected a Tensor {want}")
            if not x.is_floating_point():
                raise TypeError(f"{name}: dtype {x.dtype}, expected {want}")
            if x.dim() != rank:
                raise ValueError(f"{name}: shape {tuple(x.shape)}, expected {want}")
        if tuple(frames.shape[1:]) != (t, 3, s, s):
            raise ValueError(f"frames: shape {tuple(frames.shape)}, expected {want_f}")
        if tuple(audio.shape[1:]) != (t, n):
            raise ValueError(f"audio: shape {tuple(audio.shape)}, expected {want_a}")
        if audio.shape[0] != frames.shape[0]:
            raise ValueError(f"audio: shape {tuple(audio.shape)} has B={audio.shape[0]} but "
                             f"frames {tuple(frames.shape)} has B={frames.shape[0]}")
        if frames.dtype != audio.dtype:
            raise TypeError(f"frames dtype {frames.dtype} and audio dtype {audio.dtype}: "
                            "expected one dtype")
        if frames.device != audio.device:
            raise ValueError(f"frames on {frames.device} and audio on {audio.device}: expected "
                             "one device")

    # the head's extra inputs: name -> (per-clip shape after [B], what it is)
    extra_inputs: dict[str, tuple[tuple[int, ...], str]] = {}

    @property
    def input_names(self) -> tuple[str, ...]:
        """forward's arguments, as a dataset item names them."""
        return ("frames", "audio", *self.extra_inputs)

    def example_inputs(self, batch: int = 1, *, seed: int = 0) -> dict[str, Tensor]:
        """Random inputs of the right shapes for `model(**inputs)` (tests, benchmarks, docs)."""
        generator = torch.Generator().manual_seed(seed)
        t, s = self.segments, self.image_size
        inputs = {"frames": torch.randn(batch, t, 3, s, s, generator=generator),
                  "audio": 0.1 * torch.randn(batch, t, self.segment_samples, generator=generator)}
        for name, (shape, _) in self.extra_inputs.items():
            inputs[name] = torch.randn(batch, *shape, generator=generator)
        return inputs

    def _check_extra(self, frames: Tensor, extra: dict[str, Tensor]) -> None:
        unknown = sorted(set(extra) - set(self.extra_inputs))
        missing = sorted(set(self.extra_inputs) - set(extra))
        if unknown or missing:
            raise TypeError(f"{type(self).__name__}: unexpected inputs {unknown}, missing inputs "
                            f"{missing}; it takes {list(self.input_names)}")
        for name, (shape, what) in self.extra_inputs.items():
            x, want = extra[name], f"[B={frames.shape[0]}, {', '.join(map(str, shape))}] floating ({what})"
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError(f"{name}: got {getattr(x, 'dtype', type(x).__name__)}, expected {want}")
            if tuple(x.shape) != (frames.shape[0], *shape):
                raise ValueError(f"{name}: shape {tuple(x.shape)}, expected {want}")

    def head_inputs(self, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        """The head's keyword arguments from the extra inputs (by default, the same names)."""
        return extra

    def forward(self, frames: Tensor, audio: Tensor, **extra: Tensor) -> dict:
        self._check_inputs(frames, audio)
        self._check_extra(frames, extra)
        b, t = frames.shape[:2]
        out = self.encoder(frames.flatten(0, 1), audio.flatten(0, 1))
        visual = pool_tokens(out.visual, out.visual_map).view(b, t, -1)
        audio_feat = pool_tokens(out.audio, out.audio_map).view(b, t, -1)
        result = dict(self.head(visual, audio_feat, **self.head_inputs(extra)))
        result["features"] = {"visual": visual, "audio": audio_feat}
        result["spatial_maps"] = {
            "visual": out.visual_map.view(b, t, *out.visual.shape[1:3]),
            "audio": out.audio_map.view(b, t, *out.audio.shape[1:3]),
        }
        return result
