"""AVVP (audio-visual video parsing) metrics: segment-level and event-level F-scores.

The definition followed is the one in ``data/AVVP/FORMAT.md`` (LLP dataset, Tian et al.,
ECCV 2020, as used by DG-SCT). Where FORMAT.md is silent we follow the authors' evaluation
(``utils/eval_metrics.py`` of AVVP-ECCV20, imported unchanged by DG-SCT's ``AVVP/main.py``);
the code here is an independent, vectorised implementation.

Layout: every 0/1 array is ``[videos, 25, 10]`` = video x class x one-second segment, the
classes in FORMAT.md's index order. The model emits segment probabilities as
``[videos, 10, 25]`` (segment x class); `avvp_predictions` thresholds and transposes them.

Definitions (per video; the reported number is 100 x the mean over videos, every video
weighted equally):

* Audio-visual: prediction AV = audio AND visual, ground truth AV = audio AND visual.
* Segment level: for every class c, TP/FP/FN count the class's 10 segments; the class's
  F = 2TP / (2TP + FP + FN). A class is *active* when it occurs in the prediction or the
  ground truth (TP + FP + FN > 0). The video's score is the **mean of the per-class F over
  its active classes** (the authors' choice: F is not computed from counts summed over
  classes); a video with no active class scores 1, separately for each score (e.g. a video
  whose audio and visual events never coincide scores 1 for AV if the prediction has no
  AV segment either).
* Event@AV pools per class: TP = TP_audio + TP_visual (likewise FP, FN), then the same
  per-class F and mean over the classes active in that pooled count (the authors' choice).
* Type@AV = mean of the audio, visual and audio-visual scores (equal to the mean over
  videos of the per-video mean of the three, as everything is linear).
* Event level: an event is a maximal run of positive segments of one class (runs touching
  segment 0 or 9 are events like any other). IoU is measured in segments,
  |P & G| / |P | G|, and a pair matches when IoU >= 0.5 (inclusive, exactly 0.5 matches;
  tested with integers, ``2 |P & G| >= |P | G|``, so there is no rounding). A predicted event
  is a TP when it matches some ground-truth event of its class, otherwise an FP; a
  ground-truth event that matches no predicted event is an FN. The authors do no one-to-one
  assignment (a ground-truth event may in principle match several predictions). This makes
  no difference: two distinct maximal runs of one row are disjoint and separated by a gap,
  and two disjoint intervals can both reach IoU >= 0.5 with the same interval only by being
  its two adjacent halves, which maximal runs cannot be. So the matches form a one-to-one
  pairing; here TP = number of matching (pred, truth) pairs, FP = #pred - TP,
  FN = #truth - TP. The five scores are then formed exactly as at segment level.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["avvp_scores", "avvp_predictions", "AVVP_NUM_CLASSES", "AVVP_NUM_SEGMENTS",
           "AVVP_SCORE_KEYS"]

AVVP_NUM_CLASSES = 25
AVVP_NUM_SEGMENTS = 10
AVVP_SCORE_KEYS = (
    "segment_audio", "segment_visual", "segment_av", "segment_type", "segment_event",
    "event_audio", "event_visual", "event_av", "event_type", "event_event",
)
_LAYOUT = (AVVP_NUM_CLASSES, AVVP_NUM_SEGMENTS)


# ----------------------------------------------------------------------------- input checks

def _describe(x: Any) -> str:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"{type(x).__module__}.{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def _as_binary(x: Any, name: str) -> np.ndarray:
    """A bool numpy array [videos, 25, 10] from a 0/1 numpy array or torch tensor."""
    expected = "a 0/1 numpy array or torch tensor (bool or integer) of shape [videos, 25, 10]"
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex:
            raise TypeError(f"{name}: got {_describe(x)}, expected {expected}; threshold "
                            "probabilities first (see avvp_predictions)")
        arr = x.detach().cpu().numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    else:
        raise TypeError(f"{name}: got {_describe(x)}, expected {expected}")
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: got {_describe(x)}, expected {expected}; threshold "
                        "probabilities first (see avvp_predictions)")
    if arr.ndim != 3 or tuple(arr.shape[1:]) != _LAYOUT or arr.shape[0] == 0:
        hint = ""
        if arr.ndim == 3 and tuple(arr.shape[1:]) == _LAYOUT[::-1]:
            hint = "; this looks like [videos, segments, classes]: transpose the last two axes"
        elif arr.ndim == 2 and tuple(arr.shape) == _LAYOUT:
            hint = "; for a single video add a leading axis (x[None])"
        elif arr.ndim == 3 and arr.shape[0] == 0:
            hint = "; at least one video is needed (the scores are means over videos)"
        raise ValueError(f"{name}: got {_describe(x)}, expected shape [videos >= 1, "
                         f"{AVVP_NUM_CLASSES}, {AVVP_NUM_SEGMENTS}] (video x class x "
                         f"segment){hint}")
    if arr.dtype == np.bool_:
        return arr
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: got {_describe(x)} with {int(bad.sum())} value(s) other "
                         f"than 0 and 1 (first at index {where}: {arr[where]!r}); expected 0/1")
    return arr.astype(bool)


def _as_prob(x: Any, name: str, shape_text: str, ndim: int) -> np.ndarray:
    """A float numpy array of probabilities in [0, 1] from a numpy array or torch tensor."""
    expected = f"a floating-point numpy array or torch tensor of shape {shape_text}"
    if isinstance(x, torch.Tensor):
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name}: got {_describe(x)}, expected {expected}")
        # float16/bfloat16 -> float32 is exact, so thresholds compare as on the original
        arr = x.detach().cpu().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        arr = arr.numpy()
    elif isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name}: got {_describe(x)}, expected {expected}")
        arr = x
    else:
        raise TypeError(f"{name}: got {_describe(x)}, expected {expected}")
    if arr.ndim != ndim:
        raise ValueError(f"{name}: got {_describe(x)}, expected shape {shape_text}")
    if np.isnan(arr).any():
        raise ValueError(f"{name}: got {_describe(x)} containing {int(np.isnan(arr).sum())} "
                         "NaN value(s), expected probabilities in [0, 1]")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"{name}: got {_describe(x)} with values in [{float(arr.min()):g}, "
                         f"{float(arr.max()):g}], expected probabilities in [0, 1] (logits? "
                         "apply a sigmoid first)")
    return arr


# ----------------------------------------------------------------------------- predictions

def avvp_predictions(segment_prob: Any, video_prob: Any, threshold: float = 0.5) -> np.ndarray:
    """0/1 predictions of one modality, laid out for `avvp_scores`.

    Args:
        segment_prob: ``[videos, 10, 25]`` float probabilities, segment x class, as the model
            emits them per modality (the authors' ``a_frame_prob`` / ``v_frame_prob``).
        video_prob: ``[videos, 25]`` float video-level probabilities (the authors mask both
            modalities with the fused video-level output).
        threshold: a segment is positive when ``segment_prob >= threshold`` and its class's
            ``video_prob >= threshold`` (FORMAT.md "Predictions": 0.5 for both).

    Returns:
        A numpy bool array ``[videos, 25, 10]`` (class x segment: transposed from the input).
        Call once for audio and once for visual; `avvp_scores` forms audio AND visual itself.
        numpy arrays and torch tensors (any device, any float dtype) are accepted; inputs
        must be probabilities in [0, 1] without NaN.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, Real) \
            or not math.isfinite(float(threshold)) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold: got {threshold!r}, expected a number in [0, 1]")
    seg = _as_prob(segment_prob, "segment_prob",
                   f"[videos, {AVVP_NUM_SEGMENTS}, {AVVP_NUM_CLASSES}] (segment x class)", 3)
    vid = _as_prob(video_prob, "video_prob", f"[videos, {AVVP_NUM_CLASSES}]", 2)
    if tuple(seg.shape[1:]) != (AVVP_NUM_SEGMENTS, AVVP_NUM_CLASSES):
        hint = ""
        if tuple(seg.shape[1:]) == _LAYOUT:
            hint = "; this looks like [videos, classes, segments] already: pass it transposed"
        raise ValueError(f"segment_prob: got {_describe(segment_prob)}, expected shape "
                         f"[videos, {AVVP_NUM_SEGMENTS}, {AVVP_NUM_CLASSES}] (segment x "
                         f"class){hint}")
    if vid.shape != (seg.shape[0], AVVP_NUM_CLASSES):
        raise ValueError(f"video_prob: got {_describe(video_prob)}, expected shape "
                         f"[{seg.shape[0]}, {AVVP_NUM_CLASSES}] (videos as in segment_prob "
                         f"{tuple(seg.shape)}, classes)")
    thr = float(threshold)
    return (seg >= thr).transpose(0, 2, 1) & (vid >= thr)[:, :, None]


# ----------------------------------------------------------------------------- counting

def _segment_counts(pred: np.ndarray, true: np.ndarray):
    """TP, FP, FN per video and class over the segments: three int arrays [videos, classes]."""
    tp = np.count_nonzero(pred & true, axis=-1)
    fp = np.count_nonzero(pred & ~true, axis=-1)
    fn = np.count_nonzero(~pred & true, axis=-1)
    return tp, fp, fn


_INTERVAL_CACHE: Dict[int, tuple] = {}


def _intervals(length: int):
    """All half-open intervals [s, e) of a row of `length` segments, and which pairs match."""
    if length not in _INTERVAL_CACHE:
        s, e = np.triu_indices(length + 1, k=1)  # 0 <= s < e <= length
        inter = np.clip(np.minimum(e[:, None], e[None, :]) - np.maximum(s[:, None], s[None, :]),
                        0, None)
        union = (e - s)[:, None] + (e - s)[None, :] - inter
        match = (2 * inter >= union).astype(np.float64)  # IoU >= 0.5, in integers
        _INTERVAL_CACHE[length] = (s, e, match)
    return _INTERVAL_CACHE[length]


def _events(x: np.ndarray, s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """[..., intervals] bool: whether each interval [s, e) is a maximal run of ones in x."""
    t = x.shape[-1]
    cum = np.zeros(x.shape[:-1] + (t + 1,), dtype=np.int16)
    np.cumsum(x, axis=-1, out=cum[..., 1:])
    pad = np.zeros(x.shape[:-1] + (t + 2,), dtype=bool)  # pad[..., i + 1] = x[..., i]
    pad[..., 1:-1] = x
    full = (cum[..., e] - cum[..., s]) == (e - s)
    return full & ~pad[..., s] & ~pad[..., e + 1]


def _event_counts(pred: np.ndarray, true: np.ndarray):
    """Event-level TP, FP, FN per video and class: three int arrays [videos, classes]."""
    s, e, match = _intervals(pred.shape[-1])
    pe = _events(pred, s, e)
    ge = _events(true, s, e)
    n_pred = np.count_nonzero(pe, axis=-1)
    n_true = np.count_nonzero(ge, axis=-1)
    # matching (pred, truth) pairs; one-to-one by construction (see the module docstring)
    hits = (pe.astype(np.float64) @ match) * ge  # per true event: matching predictions
    tp = hits.sum(axis=-1).round().astype(np.int64)
    return tp, n_pred - tp, n_true - tp


def _video_f(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Per-video score [videos]: mean per-class F over active classes, 1 when none is."""
    denom = 2 * tp + fp + fn
    active = denom > 0
    f = np.divide(2.0 * tp, denom, out=np.zeros(tp.shape, dtype=np.float64), where=active)
    n_active = active.sum(axis=-1)
    return np.where(n_active > 0, f.sum(axis=-1) / np.maximum(n_active, 1), 1.0)


def _five_scores(counts, pa, pv, pav, ta, tv, tav, prefix: str) -> Dict[str, float]:
    ca, cv, cav = counts(pa, ta), counts(pv, tv), counts(pav, tav)
    pooled = tuple(x + y for x, y in zip(ca, cv))
    audio = 100.0 * float(_video_f(*ca).mean())
    visual = 100.0 * float(_video_f(*cv).mean())
    av = 100.0 * float(_video_f(*cav).mean())
    return {
        f"{prefix}_audio": audio,
        f"{prefix}_visual": visual,
        f"{prefix}_av": av,
        f"{prefix}_type": (audio + visual + av) / 3.0,
        f"{prefix}_event": 100.0 * float(_video_f(*pooled).mean()),
    }


# ----------------------------------------------------------------------------- public API

def avvp_scores(pred_audio: Any, pred_visual: Any, true_audio: Any,
                true_visual: Any) -> Dict[str, float]:
    """The ten AVVP F-scores, in percent, averaged over videos.

    Args:
        pred_audio, pred_visual, true_audio, true_visual: 0/1 arrays of shape
            ``[videos, 25, 10]`` (video x class x one-second segment), numpy arrays or torch
            tensors of a bool or integer dtype, all four with the same shape. Predictions
            are usually built with `avvp_predictions`. Audio-visual is formed here as
            audio AND visual, for the prediction and the ground truth alike.

    Returns:
        ``{"segment_audio", "segment_visual", "segment_av", "segment_type",
        "segment_event", "event_audio", "event_visual", "event_av", "event_type",
        "event_event"}`` -> float in [0, 100]. "type" is Type@AV (mean of audio, visual,
        audio-visual), "event" is Event@AV (audio and visual counts pooled per class).
        See the module docstring for the exact definitions and the points where FORMAT.md
        is silent (per-class F averaged within a video, empty video = 100, IoU >= 0.5
        inclusive, no one-to-one assignment needed).

    Raises:
        TypeError: an argument is not a numpy array / torch tensor, or has a float dtype.
        ValueError: a wrong shape, values other than 0/1, or shapes that disagree.
    """
    args = {"pred_audio": pred_audio, "pred_visual": pred_visual,
            "true_audio": true_audio, "true_visual": true_visual}
    arrs = {name: _as_binary(x, name) for name, x in args.items()}
    shapes = {name: tuple(a.shape) for name, a in arrs.items()}
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"avvp_scores: the four arrays must have the same shape [videos, "
                         f"{AVVP_NUM_CLASSES}, {AVVP_NUM_SEGMENTS}], got {listed}")
    pa, pv, ta, tv = (arrs[k] for k in args)
    pav, tav = pa & pv, ta & tv
    scores = _five_scores(_segment_counts, pa, pv, pav, ta, tv, tav, "segment")
    scores.update(_five_scores(_event_counts, pa, pv, pav, ta, tv, tav, "event"))
    return {k: scores[k] for k in AVVP_SCORE_KEYS}
