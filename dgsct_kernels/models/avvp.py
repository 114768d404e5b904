"""The AVVP model (weakly supervised audio-visual video parsing, LLP) and its evaluation.

The model is the shared task model (two-stream encoder with DG-SCT modules, pooled per
segment) with the authors' MGN head, which also reads the R(2+1)D-18 clip features
(`feats`, [B, 10, 512]). Build it with `build_dgsct(task="avvp", ...)`.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from ..metrics import avvp_predictions, avvp_scores
from .task_model import TaskModel

ST_FEATURES = 512  # R(2+1)D-18 clip features per segment


class AVVPModel(TaskModel):
    """`model(frames=[B, T, 3, S, S], audio=[B, T, samples], feats=[B, T, 512])` -> dict:

      video_prob, audio_prob, visual_prob   [B, 25]     video-level probabilities
      audio_frame_prob, visual_frame_prob   [B, T, 25]  per-segment scores
      audio_cls_logits, visual_cls_logits, audio_gate   (see AVVPHead)
      features, spatial_maps                as every task model
    """

    extra_inputs = {"feats": ((10, ST_FEATURES), "R(2+1)D-18 clip features")}

    def head_inputs(self, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"visual_st": extra["feats"]}


class AVVPEvaluator:
    """The ten AVVP scores over a split (FORMAT.md), next to two trivial baselines: nothing
    present, and each video's labels copied to all of its segments in both modalities."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in (
            "pred_audio", "pred_visual", "true_audio", "true_visual", "video_labels")}

    def add(self, outputs, batch) -> None:
        video = outputs["video_prob"].detach().float()
        # the authors mask both modalities' segments with the fused video-level output; their
        # soft-assignment segment scores reach up to 2 (AVVPHead), and clipping at 1 keeps
        # every threshold decision at 0.5
        for key, name in (("pred_audio", "audio_frame_prob"), ("pred_visual", "visual_frame_prob")):
            scores = outputs[name].detach().float().clamp(0.0, 1.0)
            self.parts[key].append(avvp_predictions(scores, video))
        for key, name in (("true_audio", "audio_labels"), ("true_visual", "visual_labels")):
            if name not in batch:
                raise KeyError(f"batch: no {name!r} (dense labels); evaluate a val or test split")
            self.parts[key].append(batch[name].detach().cpu().numpy().astype(np.uint8))
        self.parts["video_labels"].append(batch["labels"].detach().cpu().numpy() > 0.5)

    def merge(self, other: "AVVPEvaluator") -> None:
        for key, arrays in other.parts.items():
            self.parts[key].extend(arrays)

    def result(self) -> dict[str, float]:
        if not self.parts["pred_audio"]:
            raise ValueError("AVVPEvaluator: no batch was added")
        p = {k: np.concatenate(v) for k, v in self.parts.items()}
        result = avvp_scores(p["pred_audio"], p["pred_visual"], p["true_audio"], p["true_visual"])
        absent = np.zeros_like(p["true_audio"])
        copied = np.repeat(p["video_labels"][:, :, None], p["true_audio"].shape[-1], axis=2)
        for name, pred in (("absent", absent), ("copied", copied)):
            base = avvp_scores(pred, pred, p["true_audio"], p["true_visual"])
            result[f"{name}_segment_type"] = base["segment_type"]
            result[f"{name}_event_type"] = base["event_type"]
        result["videos"] = len(p["true_audio"])
        return result


def describe(result: dict) -> str:
    seg = "/".join(f"{result['segment_' + k]:.1f}" for k in ("audio", "visual", "av", "type", "event"))
    event = "/".join(f"{result['event_' + k]:.1f}" for k in ("audio", "visual", "av", "type", "event"))
    return (f"segment Type@AV {result['segment_type']:.2f} (all-absent "
            f"{result['absent_segment_type']:.2f}, video labels copied "
            f"{result['copied_segment_type']:.2f}); A/V/AV/Type/Event segment {seg}, event {event}")
