"""Per-task settings (SPEC.md's table), model presets and `build_dgsct`.

`build_dgsct(task="ave", preset="paper" | "tiny", weights=None, backend="auto")` returns a
ready model. `weights` is one of
  - None: encoders and modules at their initial values (encoders from a fixed seed, so a
    trainable-part file saved from such a model reloads onto the same encoders);
  - a path: the trained part only, i.e. `{"dgsct": path}`;
  - a dict with any of
      "visual": timm Swin-V2 weights (.safetensors / .pth / .bin, timm's or the original
                layout),
      "audio":  an HTS-AT Lightning checkpoint (.ckpt),
      "dgsct":  the authors' DG-SCT task checkpoint (a torch state dict of their whole model;
                its adapter lists, `temporal_attn.*` and `CMBS.*` are loaded), or a
                trainable-part .safetensors file written by `save_trainable` (DG-SCT
                modules, head, and the encoders' BatchNorm statistics).
Every loader is strict: missing or unexpected keys raise, naming them. What each loader
did is left on the model as `model.weights_report`. A preset whose encoders are meant to be
pretrained (`pretrained_encoders`, the paper's) warns when built without "visual" / "audio"
weights: its encoders would be random, and its results meaningless.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

WeightsArg = str | os.PathLike | Mapping[str, str | os.PathLike] | None
WEIGHT_KINDS = ("visual", "audio", "dgsct")


@dataclass(frozen=True)
class TaskModules:
    """DG-SCT hyper-parameters of one task (SPEC.md, the authors' configurations)."""

    alpha: float
    beta: float
    gamma: float
    num_latents: int  # K
    reduction: int  # r
    segments: int  # T
    temporal_attention: bool
    gate_weight: float | None  # of the temporal attention after the encoders
    groups: int = 2

    def module_kwargs(self, backend: str) -> dict[str, Any]:
        return {"num_latents": self.num_latents, "reduction": self.reduction,
                "groups": self.groups, "alpha": self.alpha, "beta": self.beta,
                "gamma": self.gamma, "backend": backend}


TASKS: dict[str, TaskModules] = {
    "ave": TaskModules(0.3, 0.05, 0.0, 32, 8, 10, True, 0.1),
    "avvp": TaskModules(0.3, 0.05, 0.0, 32, 8, 10, True, 0.05),
    "avs_s4": TaskModules(0.3, 0.05, 0.0, 32, 8, 5, True, 0.05),
    "avs_ms3": TaskModules(0.2, 0.1, 0.0, 32, 2, 5, True, 0.1),
    "avqa": TaskModules(0.3, 0.05, 0.0, 2, 8, 10, False, None),
    "pretrain": TaskModules(0.3, 0.01, 0.05, 2, 8, 10, False, None),
}


@dataclass(frozen=True)
class ModelPreset:
    """Encoders, input sizes and head of one preset."""

    name: str
    image_size: int  # frames are [B, T, 3, image_size, image_size]
    segment_samples: int  # audio is [B, T, segment_samples]
    clip_samples: int  # each segment is tiled to this many samples before the audio encoder
    visual: dict = field(default_factory=dict)  # build_swin_v2 arguments
    audio: dict = field(default_factory=dict)  # HTSAT arguments
    head: dict = field(default_factory=dict)  # head arguments (the task's head)
    # the encoders are meant to be loaded from pretrained weights; build_dgsct warns without
    pretrained_encoders: bool = False


# The paper: Swin-V2-L at 192 px, HTS-AT (AudioSet) on 1 s at 32 kHz tiled to 10 s, with
# AVE's head. Training defaults live with the task (registry.py).
PAPER = ModelPreset(
    name="paper", image_size=192, segment_samples=32000, clip_samples=320000,
    visual={"name": "swinv2_large_window12_192"},
    audio={},  # HTSAT's defaults are the paper's
    head={"visual_dim": 1536, "audio_dim": 768},
    pretrained_encoders=True,
)

# A CPU-sized model with the same structure: four stages each, a 6-vs-2 stage so the
# r*k + r - 1 pairing runs, 64 px frames and a small log-mel front end.
TINY = ModelPreset(
    name="tiny", image_size=64, segment_samples=32000, clip_samples=320000,
    visual={"name": "swinv2_tiny_window8_256", "img_size": 64, "embed_dim": 16,
            "depths": (2, 2, 6, 2), "num_heads": (1, 2, 4, 8), "window_size": 4},
    # 320000 samples at hop 5120 fill the 64 frames of a 32 x 32 image (freq_ratio 2)
    audio={"sample_rate": 32000, "n_fft": 512, "hop_length": 5120, "mel_bins": 16,
           "spec_size": 32, "embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8),
           "window_size": 4, "time_drop_width": 4, "freq_drop_width": 2},
    head={"visual_dim": 128, "audio_dim": 128, "video_fc_dim": 32, "audio_fc_dim": 16,
          "d_model": 32, "num_heads": 4, "ff_dim": 64},
)
PRESETS: dict[str, ModelPreset] = {"paper": PAPER, "tiny": TINY}  # AVE's (registry.py)


def get_preset(preset: str | ModelPreset) -> ModelPreset:
    if isinstance(preset, ModelPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(PRESETS)} or a ModelPreset")
    return PRESETS[preset]


def normalize_weights(weights: WeightsArg) -> dict[str, str]:
    """The `weights` argument as {kind: path}; refuses unknown kinds and missing files."""
    if weights is None:
        return {}
    if isinstance(weights, (str, os.PathLike)):
        weights = {"dgsct": weights}
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights: got {type(weights).__name__}, expected None, a path or a dict "
                        f"with keys from {WEIGHT_KINDS}")
    unknown = sorted(set(weights) - set(WEIGHT_KINDS))
    if unknown:
        raise ValueError(f"weights: unknown keys {unknown}, expected keys from {WEIGHT_KINDS}")
    out = {}
    for kind, path in weights.items():
        if path is None:
            continue
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights[{kind!r}]: no file at {path!r}")
        out[kind] = path
    return out


def random_encoders_warning(spec: ModelPreset, files: Mapping[str, str]) -> str | None:
    """The warning for a preset built without the pretrained encoder weights it is meant to
    have (None when there is nothing to warn about)."""
    if not spec.pretrained_encoders:
        return None
    random = [kind for kind in ("visual", "audio") if kind not in files]
    if not random:
        return None
    plural = len(random) > 1
    return (f"build_dgsct(preset={spec.name!r}): no weights for the {' and '.join(random)} "
            f"encoder{'s' if plural else ''}, so {'they are' if plural else 'it is'} randomly "
            "initialised (frozen random encoders cannot give the paper's results). Pass the "
            "pretrained files as weights={'visual': <timm Swin-V2 weights>, 'audio': <HTS-AT "
            ".ckpt>}, or load an authors' checkpoint's encoders afterwards with "
            "load_authors_checkpoint(model, path, encoders=True).")


def build_dgsct(task: str = "ave", preset: str | ModelPreset = "paper",
                weights: WeightsArg = None, backend: str = "auto", *,
                encoders_eval: bool = False, encoder_seed: int = 0):
    """Build the DG-SCT model of `task` (see the module docstring for `weights`).

    `backend` goes to every FusedDGSCT. `encoders_eval=True` keeps the frozen encoders in
    eval mode during training (the authors leave them in train mode). Encoders are built
    under `encoder_seed` without touching the global RNG. A preset meant for pretrained
    encoders (the paper's) warns (`UserWarning`) when `weights` lacks "visual" or "audio".
    """
    from . import checkpoints
    from .encoders.htsat import HTSAT
    from .encoders.swin_v2 import build_swin_v2
    from .registry import get_task, task_names

    entry = get_task(task)
    if not entry.built:
        raise NotImplementedError(f"task={task!r}: its settings exist (TASKS) but its model does "
                                  f"not yet; built tasks: {task_names(built=True)}")
    modules = entry.modules
    spec = entry.preset(preset)
    files = normalize_weights(weights)
    warning = random_encoders_warning(spec, files)
    if warning:
        warnings.warn(warning, UserWarning, stacklevel=2)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.default_generator.manual_seed(encoder_seed)
        visual_args = dict(spec.visual)
        visual = build_swin_v2(visual_args.pop("name"), weights=files.get("visual"),
                               **visual_args)
        audio = HTSAT(**spec.audio)
    reports = {"visual": getattr(visual, "weights_report", None)}
    if "audio" in files:
        reports["audio"] = checkpoints.load_htsat(audio, files["audio"])
    head = entry.head(modules, spec)
    model = entry.model(visual, audio, head, modules=modules, preset=spec, backend=backend,
                        encoders_eval=encoders_eval)
    model.task = entry.name
    if "dgsct" in files:
        reports["dgsct"] = checkpoints.load_dgsct(model, files["dgsct"])
    # what each loader did (loaded / ignored keys); None where nothing was loaded
    model.weights_report = {kind: reports.get(kind) for kind in WEIGHT_KINDS}
    return model


def with_overrides(preset: str | ModelPreset, **changes) -> ModelPreset:
    """A copy of a preset with some fields replaced (dict fields are merged)."""
    base = get_preset(preset)
    merged = {k: ({**getattr(base, k), **v} if isinstance(getattr(base, k), dict) else v)
              for k, v in changes.items()}
    return replace(base, **merged)
