"""The visual encoder: timm's Swin-V2, built from a local weights file, and its block halves.

DG-SCT injects its adapters between the two residual halves of every Swin-V2 block, so
the driver runs a block as `mlp_half(block, attention_half(block, x))`, which equals
`block(x)` exactly. Tokens are timm 1.0's NHWC `[B, H, W, C]`; each stage's downsample
runs at the start of the stage (`stage.downsample`, Identity in stage 0).
"""
from __future__ import annotations

import os
import sys
from typing import Any

from torch import Tensor, nn

__all__ = ["attention_half", "build_swin_v2", "check_weights_keys", "mlp_half"]


def build_swin_v2(name: str = "swinv2_large_window12_192", weights=None, **overrides):
    """A timm Swin-V2 without classifier (`num_classes=0`), optionally with local weights.

    `weights` is a local file (timm's `.pth`/`.bin`/`.safetensors` formats, an original
    Microsoft checkpoint included: timm remaps it). Nothing is downloaded: the model is
    `timm.create_model(name, pretrained=weights is not None,
    pretrained_cfg_overlay=dict(file=weights), num_classes=0, **overrides)`.

    timm loads with `strict=False` whenever the classifier is dropped, so a file whose
    keys do not fit would load silently in part. The keys are therefore checked here as
    well: every missing or unexpected key raises `RuntimeError` with both lists. The
    classifier keys of the file are dropped (listed as ignored). The report is left on
    the model as `model.weights_report` (`loaded`, `missing`, `unexpected`, `ignored`).
    """
    import timm

    if not isinstance(name, str) or not name.startswith("swinv2"):
        raise ValueError(f"build_swin_v2: name={name!r}: expected a timm Swin-V2 model name "
                         "(for example 'swinv2_large_window12_192')")
    if "num_classes" in overrides and overrides["num_classes"] != 0:
        raise ValueError(f"build_swin_v2: num_classes={overrides['num_classes']!r}: the encoder "
                         "is built without classifier (num_classes=0)")
    overrides.pop("num_classes", None)
    if weights is None:
        model = timm.create_model(name, pretrained=False, num_classes=0, **overrides)
        model.weights_report = None
        return model
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"build_swin_v2: weights={path!r}: no such file (pretrained "
                                "weights are read from a local file only, never downloaded)")
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path},
                              num_classes=0, **overrides)
    model.weights_report = check_weights_keys(model, path)
    return model


def check_weights_keys(model: nn.Module, path) -> dict[str, list[str]]:
    """Compare a timm weights file's keys, as timm's own filter maps them, with the model.

    Raises `RuntimeError` naming every missing and unexpected key; returns the report.
    """
    from timm.models import load_state_dict

    state = load_state_dict(os.fspath(path))
    # the model family's own filter (original-checkpoint remapping, derived buffers dropped)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head.fc"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    expected = set(model.state_dict())
    ignored = sorted(k for k in state if k not in expected
                     and any(k.startswith(c + ".") for c in classifiers))
    given = set(state) - set(ignored)
    report = {"loaded": sorted(given & expected), "missing": sorted(expected - given),
              "unexpected": sorted(given - expected), "ignored": ignored}
    if report["missing"] or report["unexpected"]:
        raise RuntimeError(f"build_swin_v2: weights {os.fspath(path)!r} do not fit "
                           f"{type(model).__name__}: missing keys {report['missing']}, "
                           f"unexpected keys {report['unexpected']}")
    return report


def _check_block(fn: str, block: Any, x: Any) -> None:
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    if not isinstance(block, SwinTransformerV2Block):
        raise TypeError(f"{fn}: block is {type(block).__name__}: expected a timm "
                        "SwinTransformerV2Block (its halves are post-norm)")
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x has shape {shape}: expected NHWC tokens [B, H, W, C]")
    dim = block.norm1.normalized_shape[0]
    if x.shape[-1] != dim:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)}: expected C={dim} channels")
    # the attention mask is precomputed for input_resolution unless timm builds it per call
    if not getattr(block, "dynamic_mask", False):
        res = tuple(block.input_resolution)
        if tuple(x.shape[1:3]) != res:
            raise ValueError(f"{fn}: x has shape {tuple(x.shape)}: expected H, W = {res}, "
                             "the block's input resolution")


def attention_half(block: nn.Module, x: Tensor) -> Tensor:
    """`x + drop_path1(norm1(_attn(x)))`: the first residual half of a Swin-V2 block."""
    _check_block("attention_half", block, x)
    return x + block.drop_path1(block.norm1(block._attn(x)))


def mlp_half(block: nn.Module, x: Tensor) -> Tensor:
    """`x + drop_path2(norm2(mlp(x)))`: the second half, on [B, H*W, C] as timm runs it."""
    _check_block("mlp_half", block, x)
    B, H, W, C = x.shape
    # DropPath draws one mask per sample either way; the reshape keeps timm's exact op order
    y = x.reshape(B, H * W, C)
    y = y + block.drop_path2(block.norm2(block.mlp(y)))
    return y.reshape(B, H, W, C)
