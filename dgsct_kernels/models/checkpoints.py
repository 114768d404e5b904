"""Weights for the model layer: the authors' DG-SCT task checkpoints, the trainable part
(safetensors) and the encoders' files.

Every loader checks the whole key set and every shape before it copies anything, and
raises `CheckpointError` naming each missing or unexpected key, so a load is complete or
does not happen. A file that cannot be read (truncated, corrupted, not a checkpoint) raises
`CheckpointError` naming the file, chained to the reader's own error.

The authors' AVE checkpoint is `torch.save(model.state_dict())` of their whole model:
  audio_adapter_blocks_p1/p2.<i>.*, vis_adapter_blocks_p1/p2.<i>.*  (i = paired block)
  temporal_attn.*, CMBS.*                                           (the head)
  htsat.bn0.running_*, num_batches_tracked   HTS-AT's BatchNorm statistics, which their
                                      train-mode encoder updated: loaded, as part of training
  other swin.*, htsat.*               frozen encoder weights: left out unless encoders=True
  adapter_token_downsampler.*         registered by their model, never used by its forward
Their modules have no `temporal_gated` layer (gamma = 0); such modules keep it at its
initial values (`FusedDGSCT.load_authors_state_dict`).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..module import TEMPORAL_GATE_KEYS
from .two_stream import ADAPTER_LISTS

log = logging.getLogger("dgsct_kernels")

PathOrState = str | os.PathLike | Mapping[str, Tensor]
TRAINABLE_FORMAT = "dgsct-kernels/trainable/1"
HEAD_PREFIXES = ("temporal_attn.", "CMBS.")  # authors' head keys, model key = "head." + key
ENCODER_PREFIXES = ("swin.", "htsat.")
UNUSED_AUTHORS_PREFIXES = ("adapter_token_downsampler.",)


@dataclass
class LoadReport:
    """What a load did: keys loaded, keys deliberately left out (by reason), and modules that
    kept their initial temporal gate because the checkpoint has none."""

    loaded: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    initial_temporal_gate: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        parts += [f"left out {len(keys)} {reason} keys" for reason, keys in self.skipped.items()]
        if self.initial_temporal_gate:
            parts.append(f"{len(self.initial_temporal_gate)} modules keep their initial "
                         "temporal_gated (the checkpoint has none)")
        return "; ".join(parts)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not match the model (missing, unexpected or
    mis-shaped keys); raised before anything is copied."""


def _describe(source: PathOrState) -> str:
    return "(dict)" if isinstance(source, Mapping) else repr(os.fspath(source))


def _unreadable(what: str, kind: str, err: Exception) -> CheckpointError:
    text = str(err)
    if "WeightsUnpickler error:" in text:  # torch's long weights_only message: keep the cause
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    reason = " ".join(text.split())[:300] or "(no message: the file ends early or is empty)"
    hint = ""
    if "Unsupported global" in reason:
        hint = ("; it holds Python objects besides tensors: if you trust the file, read it with "
                "torch.load(path, weights_only=False) and pass the state dict instead")
    return CheckpointError(f"{what}: cannot be read as {kind} (truncated, corrupted or another "
                           f"format?): {type(err).__name__}: {reason}{hint}")


def _check_tensors(state: Mapping, what: str) -> None:
    bad = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{what}: non-tensor entries ({len(bad)}): {bad[:10]}")


def _fail(what: str, missing=(), unexpected=(), shapes=()) -> None:
    if missing or unexpected or shapes:
        lines = [f"{what}: refusing a partial load"]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {sorted(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)}")
        if shapes:
            lines.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise CheckpointError("\n".join(lines))


def _read_torch(source: PathOrState, what: str) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        try:
            state = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # torch raises many types for a damaged file
            raise _unreadable(what, "a torch checkpoint", err) from err
    for wrapper in ("state_dict", "model"):  # {"state_dict": {...}} and similar wrappers
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what}: expected a state dict, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    _check_tensors(state, what)
    return dict(state)


def _check_shapes(target: Mapping[str, Tensor], source: Mapping[str, Tensor],
                  names: Mapping[str, str]) -> list[str]:
    """names maps source key -> target key."""
    return [f"{src}: checkpoint {tuple(source[src].shape)} vs model "
            f"{tuple(target[dst].shape)}"
            for src, dst in names.items() if source[src].shape != target[dst].shape]


def _copy_into(model: nn.Module, pairs: Mapping[str, Tensor]) -> None:
    targets = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for key, value in pairs.items():
            targets[key].copy_(value)


# ---------------------------------------------------------------------------------------
# the trainable part


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What training changes: parameters and buffers of the DG-SCT modules and the head,
    and the encoders' BatchNorm statistics (train-mode encoders update them)."""
    out = {}
    for prefix, module in model.trainable_modules().items():
        for key, value in module.state_dict().items():
            out[f"{prefix}.{key}"] = value
    for key, value in model.encoder.encoder_statistics().items():
        out[f"encoder.{key}"] = value
    return out


def save_trainable(model: nn.Module, path: str | os.PathLike,
                   metadata: Mapping[str, str] | None = None) -> None:
    """Write the trainable part (`trainable_state_dict`) as safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable_state_dict(model).items()}
    meta = {"format": TRAINABLE_FORMAT}
    preset = getattr(model, "preset", None)
    if preset is not None:
        meta["preset"] = preset.name
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(tensors, path, metadata=meta)


def load_trainable(model: nn.Module, source: PathOrState) -> LoadReport:
    """Load a trainable-part file (or dict) written by `save_trainable`, all or nothing.

    A damaged file, a file not from `save_trainable`, and any missing, unexpected or
    mis-shaped key raise `CheckpointError` naming the file or the keys, before anything
    is copied."""
    what = f"trainable part {_describe(source)}"
    state = dict(source) if isinstance(source, Mapping) else _read_trainable_file(source, what)
    _check_tensors(state, what)
    expected = trainable_state_dict(model)
    _fail(what, missing=set(expected) - set(state), unexpected=set(state) - set(expected),
          shapes=_check_shapes(expected, state, {k: k for k in state if k in expected}))
    _copy_into(model, state)
    return LoadReport(loaded=len(state))


def _read_trainable_file(path: str | os.PathLike, what: str) -> dict[str, Tensor]:
    """Every tensor of a save_trainable file; a damaged or foreign file raises naming it."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file")
    try:
        # safe_open checks the header and that the data it describes is all there
        with safe_open(path, framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
            if fmt != TRAINABLE_FORMAT:
                raise CheckpointError(
                    f"{what}: metadata format {fmt!r}: a safetensors file without the metadata "
                    f"format={TRAINABLE_FORMAT!r} is not from save_trainable")
            return {key: f.get_tensor(key) for key in f.keys()}
    except CheckpointError:
        raise
    except Exception as err:  # safetensors' own error type, OSError, ...
        raise _unreadable(what, "safetensors", err) from err


# ---------------------------------------------------------------------------------------
# the authors' task checkpoints


def authors_key_map(model: nn.Module) -> dict[str, str]:
    """Every model key of the trainable part -> its name in the authors' checkpoint."""
    out = {}
    for key in trainable_state_dict(model):
        if key.startswith("encoder.visual."):
            out[key] = "swin." + key[len("encoder.visual."):]
        elif key.startswith("encoder.audio."):  # bn0: same name in the original HTS-AT
            out[key] = "htsat." + key[len("encoder.audio."):]
        elif key.startswith("encoder."):
            out[key] = key[len("encoder."):]
        elif key.startswith("head."):
            out[key] = key[len("head."):]
        else:  # pragma: no cover - trainable_state_dict has only these prefixes
            raise AssertionError(key)
    return out


def _is_temporal_gate(authors_key: str) -> bool:
    return any(authors_key.startswith(name + ".") and authors_key.split(".", 2)[2] in
               TEMPORAL_GATE_KEYS for name in ADAPTER_LISTS)


def load_authors_checkpoint(model: nn.Module, source: PathOrState, *,
                            encoders: bool = False) -> LoadReport:
    """Load the authors' DG-SCT task checkpoint (their key names) into `model`.

    The DG-SCT modules, the head and the encoders' BatchNorm statistics load. Their other
    `swin.*` / `htsat.*` encoder weights are left out and reported, unless
    `encoders=True` loads them too (timm's layout conversion for Swin-V2). Any other
    unknown key, any missing key except an absent `temporal_gated` layer, and any shape
    mismatch raises before anything is copied.
    """
    what = f"authors' checkpoint {_describe(source)}"
    state = _read_torch(source, what)
    to_authors = authors_key_map(model)
    from_authors = {v: k for k, v in to_authors.items()}
    report = LoadReport()
    encoder_keys = [k for k in state if k.startswith(ENCODER_PREFIXES) and k not in from_authors]
    unused = [k for k in state if k.startswith(UNUSED_AUTHORS_PREFIXES)]
    unexpected = [k for k in state if k not in from_authors and k not in encoder_keys
                  and k not in unused]
    absent = [k for k in from_authors if k not in state]
    missing = [k for k in absent if not _is_temporal_gate(k)]
    # a module without temporal_gated must lack both of its keys
    gate_modules = {".".join(k.split(".")[:2]) for k in absent if _is_temporal_gate(k)}
    half = [f"{m}.{g}" for m in gate_modules for g in TEMPORAL_GATE_KEYS if f"{m}.{g}" in state]
    model_state = trainable_state_dict(model)
    shapes = _check_shapes(model_state, state, {k: from_authors[k] for k in state
                                                if k in from_authors})
    _fail(what, missing=missing, unexpected=unexpected + half, shapes=shapes)
    if encoders:
        if not encoder_keys:
            raise CheckpointError(f"{what}: encoders=True but it has no swin.* / htsat.* keys")
        _load_authors_encoders(model, state, what)
        report.loaded += len(encoder_keys)
    elif encoder_keys:
        report.skipped["encoder (swin.*, htsat.*)"] = encoder_keys
    if unused:
        report.skipped["unused by the authors' forward"] = unused
    _copy_into(model, {from_authors[k]: v for k, v in state.items() if k in from_authors})
    report.loaded += sum(k in from_authors for k in state)
    report.initial_temporal_gate = sorted(gate_modules)
    for name in gate_modules:  # the authors' gamma=0 modules; warn if ours uses the gate
        lst, idx = name.split(".")
        module = getattr(model.encoder, lst)[int(idx)]
        if module.gamma != 0:
            log.warning("%s: the checkpoint has no temporal_gated layer (the authors' gamma=0) "
                        "but this module uses gamma=%s", name, module.gamma)
    log.info("%s: %s", what, report.summary())
    return report


def _load_authors_encoders(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    from timm.models.swin_transformer_v2 import checkpoint_filter_fn

    from .encoders.htsat import load_htsat_checkpoint

    visual = model.encoder.visual
    swin = {k[len("swin."):]: v for k, v in state.items() if k.startswith("swin.")}
    try:
        swin = checkpoint_filter_fn(swin, visual)
    except Exception as err:  # timm's layout conversion fails on damaged keys or shapes
        raise CheckpointError(f"{what} swin.*: timm cannot convert it to Swin-V2's layout: "
                              f"{type(err).__name__}: {err}") from err
    swin = {k: v for k, v in swin.items() if not k.startswith("head.")}
    # the visual part is checked first, the audio loader checks before it copies, and only
    # then the checked visual part loads: a refusal anywhere leaves both encoders untouched
    _check_strict(visual, swin, f"{what} swin.*")
    htsat = {k[len("htsat."):]: v for k, v in state.items() if k.startswith("htsat.")}
    try:
        load_htsat_checkpoint(model.encoder.audio, htsat)
    except (RuntimeError, TypeError) as err:
        raise CheckpointError(f"{what} htsat.*: {err}") from err
    visual.load_state_dict(swin, strict=True)


def load_strict(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """`load_state_dict(strict=True)` that names the keys and shapes, and checks first.

    Non-persistent buffers the module rebuilds itself are not expected in `state`.
    """
    _check_strict(module, state, what)
    module.load_state_dict(state, strict=True)


def _check_strict(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    _check_tensors(state, what)
    expected = module.state_dict()
    _fail(what, missing=set(expected) - set(state), unexpected=set(state) - set(expected),
          shapes=_check_shapes(expected, state, {k: k for k in state if k in expected}))


# ---------------------------------------------------------------------------------------
# entry points used by build_dgsct


def _is_trainable_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                return False
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(header, dict) and (header.get("__metadata__") or {}).get(
        "format") == TRAINABLE_FORMAT


def load_dgsct(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """A trainable-part safetensors file or the authors' task checkpoint, by content.

    A `.safetensors` name goes to the trainable-part reader even when its header is
    unreadable, so a damaged file is reported as damaged, not as a torch checkpoint.
    """
    path = os.fspath(path)
    if _is_trainable_file(path) or path.endswith(".safetensors"):
        return load_trainable(model, path)
    return load_authors_checkpoint(model, path)


def load_htsat(audio: nn.Module, path: str | os.PathLike) -> dict:
    """An HTS-AT checkpoint through the encoder's strict loader; returns its report."""
    from .encoders.htsat import load_htsat_checkpoint

    return load_htsat_checkpoint(audio, os.fspath(path))
