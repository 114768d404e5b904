"""AVVP segment- and event-level F-scores (dgsct_kernels.metrics, FORMAT.md "Metrics")."""
import time

import numpy as np
import pytest
import torch

from dgsct_kernels.metrics import AVVP_SCORE_KEYS, avvp_predictions, avvp_scores

C, T = 25, 10


def blank(videos=1):
    """Four empty int arrays [videos, 25, 10]: pred_audio, pred_visual, true_audio, true_visual."""
    return [np.zeros((videos, C, T), dtype=np.int64) for _ in range(4)]


def check(scores, **expected):
    assert set(scores) == set(AVVP_SCORE_KEYS)
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-9), key


# ----------------------------------------------------------------------------- reference

def _runs(row):
    """Maximal runs of ones as (start, end) half-open pairs, by a plain scan."""
    runs, start = [], None
    for i, v in enumerate(list(row) + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _iou(a, b):
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union


def _seg_counts(p, g):
    tp = sum(1 for i in range(T) if p[i] and g[i])
    fp = sum(1 for i in range(T) if p[i] and not g[i])
    fn = sum(1 for i in range(T) if not p[i] and g[i])
    return tp, fp, fn


def _event_counts(p, g):
    # the authors' rule: each prediction is TP if it matches any truth, else FP; each truth
    # is FN if no prediction matches it (no one-to-one assignment)
    pe, ge = _runs(p), _runs(g)
    tp = sum(1 for a in pe if any(_iou(a, b) >= 0.5 for b in ge))
    fp = len(pe) - tp
    fn = sum(1 for b in ge if not any(_iou(a, b) >= 0.5 for a in pe))
    return tp, fp, fn


def _mean_f(per_class):
    fs = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in per_class if tp + fp + fn > 0]
    return sum(fs) / len(fs) if fs else 1.0


def reference_scores(pa, pv, ta, tv):
    pa, pv, ta, tv = (np.asarray(x).astype(int).tolist() for x in (pa, pv, ta, tv))
    out = {k: [] for k in AVVP_SCORE_KEYS}
    for vid in range(len(pa)):
        for level, counts in (("segment", _seg_counts), ("event", _event_counts)):
            ca, cv, cav, cpool = [], [], [], []
            for c in range(C):
                pav = [x & y for x, y in zip(pa[vid][c], pv[vid][c])]
                tav = [x & y for x, y in zip(ta[vid][c], tv[vid][c])]
                a = counts(pa[vid][c], ta[vid][c])
                v = counts(pv[vid][c], tv[vid][c])
                ca.append(a)
                cv.append(v)
                cav.append(counts(pav, tav))
                cpool.append(tuple(x + y for x, y in zip(a, v)))
            out[f"{level}_audio"].append(_mean_f(ca))
            out[f"{level}_visual"].append(_mean_f(cv))
            out[f"{level}_av"].append(_mean_f(cav))
            out[f"{level}_event"].append(_mean_f(cpool))
    res = {k: 100 * sum(v) / len(v) for k, v in out.items() if v}
    for level in ("segment", "event"):
        res[f"{level}_type"] = (res[f"{level}_audio"] + res[f"{level}_visual"]
                                + res[f"{level}_av"]) / 3
    return res


# ----------------------------------------------------------------------------- hand-worked

def test_empty_videos_score_100():
    # no class anywhere in prediction or truth -> every score of every video is 1
    check(avvp_scores(*blank(3)), **{k: 100.0 for k in AVVP_SCORE_KEYS})


def test_perfect_prediction_scores_100():
    pa, pv, ta, tv = blank(2)
    pa[0, 0, 0:3] = ta[0, 0, 0:3] = 1
    pv[0, 0, 2:10] = tv[0, 0, 2:10] = 1
    pa[1, 24, 9] = ta[1, 24, 9] = 1
    check(avvp_scores(pa, pv, ta, tv), **{k: 100.0 for k in AVVP_SCORE_KEYS})


def test_per_class_f_is_averaged_within_a_video():
    pa, pv, ta, tv = blank()
    pa[0, 0, 0:5] = 1   # class 0: pred 0-4, truth 2-6: TP 3 (2,3,4), FP 2, FN 2 -> F = 6/10
    ta[0, 0, 2:7] = 1
    pa[0, 1, 9] = 1     # class 1: prediction only -> F = 0
    ta[0, 2, 0] = 1     # class 2: truth only -> F = 0
    # audio: mean(0.6, 0, 0) = 0.2 (pooling the counts would give 6/12 = 0.5 instead)
    # visual: nothing -> 1; AV: audio AND visual is empty in both -> 1
    # Event@AV pools audio and visual per class: visual adds nothing -> 0.2
    # events: class 0 [0,5) vs [2,7): IoU 3/7 < 0.5 -> FP 1, FN 1 -> F 0; classes 1, 2 -> 0
    check(avvp_scores(pa, pv, ta, tv),
          segment_audio=20.0, segment_visual=100.0, segment_av=100.0,
          segment_type=220.0 / 3, segment_event=20.0,
          event_audio=0.0, event_visual=100.0, event_av=100.0,
          event_type=200.0 / 3, event_event=0.0)


def test_iou_exactly_half_matches_at_clip_start_and_end():
    pa, pv, ta, tv = blank()
    pa[0, 3, 0:4] = 1   # pred events [0,4) and [8,10): touch segment 0 and segment 9
    pa[0, 3, 8:10] = 1
    ta[0, 3, 0:2] = 1   # truth [0,2): IoU with [0,4) = 2/4 = 0.5 -> match
    ta[0, 3, 9] = 1     # truth [9,10): IoU with [8,10) = 1/2 = 0.5 -> match
    # events: TP 2, FP 0, FN 0 -> 1.  segments: TP 3 (0,1,9), FP 3 (2,3,8), FN 0 -> 6/9
    s = avvp_scores(pa, pv, ta, tv)
    check(s, segment_audio=200.0 / 3, event_audio=100.0, segment_event=200.0 / 3,
          event_event=100.0, segment_visual=100.0, event_visual=100.0,
          segment_av=100.0, event_av=100.0)
    # the same in the visual stream
    s2 = avvp_scores(pv, pa, tv, ta)
    check(s2, segment_visual=200.0 / 3, event_visual=100.0, segment_audio=100.0)


def test_partial_overlap_below_half_is_fp_and_fn():
    pa, pv, ta, tv = blank()
    pa[0, 7, 0:3] = 1   # pred [0,3), truth [1,5): inter 2, union 5 -> IoU 0.4 < 0.5
    ta[0, 7, 1:5] = 1
    # events: FP 1, FN 1 -> 0.  segments: TP 2, FP 1, FN 2 -> 4/7
    check(avvp_scores(pa, pv, ta, tv), event_audio=0.0, segment_audio=400.0 / 7,
          event_event=0.0, segment_event=400.0 / 7)


def test_split_prediction_of_one_long_event():
    pa, pv, ta, tv = blank()
    ta[0, 4, 0:5] = 1   # truth [0,5)
    pa[0, 4, 0:3] = 1   # pred [0,3): IoU 3/5 -> TP
    pa[0, 4, 4] = 1     # pred [4,5): IoU 1/5 -> FP; truth is matched -> FN 0
    # events: TP 1, FP 1, FN 0 -> 2/3.  segments: TP 4, FP 0, FN 1 -> 8/9
    check(avvp_scores(pa, pv, ta, tv), event_audio=200.0 / 3, segment_audio=800.0 / 9)
    pa[0, 4] = 0
    pa[0, 4, 0:2] = 1   # pred [0,2) and [3,5): IoU 2/5 each -> FP 2, FN 1 -> 0
    pa[0, 4, 3:5] = 1
    check(avvp_scores(pa, pv, ta, tv), event_audio=0.0, segment_audio=800.0 / 9)


def test_audio_visual_type_and_event_pooling():
    pa, pv, ta, tv = blank()
    pa[0, 5, 0:6] = 1   # class 5 audio: pred [0,6) = truth [0,6) -> F 1
    ta[0, 5, 0:6] = 1
    pv[0, 5, 3:10] = 1  # class 5 visual: pred [3,10), truth [4,10): TP 6, FP 1 -> 12/13
    tv[0, 5, 4:10] = 1
    pv[0, 7, 0] = 1     # class 7 visual: prediction only -> 0
    # AV class 5: pred [3,6), truth [4,6): TP 2, FP 1 -> 4/5
    # segment: audio 1, visual mean(12/13, 0) = 6/13, AV 0.8
    #   Event@AV per class: class 5 TP 6+6, FP 0+1, FN 0 -> 24/25; class 7 -> 0: mean 0.48
    # events: audio 1; visual class 5 [3,10) vs [4,10): IoU 6/7 -> 1, class 7 FP -> 0: 0.5
    #   AV [3,6) vs [4,6): IoU 2/3 -> 1; Event@AV class 5 TP 2 -> 1, class 7 -> 0: 0.5
    seg_visual = 100 * 6 / 13
    check(avvp_scores(pa, pv, ta, tv),
          segment_audio=100.0, segment_visual=seg_visual, segment_av=80.0,
          segment_type=(100.0 + seg_visual + 80.0) / 3, segment_event=48.0,
          event_audio=100.0, event_visual=50.0, event_av=100.0,
          event_type=250.0 / 3, event_event=50.0)


def test_av_empty_in_both_scores_100_even_when_modalities_are_not():
    pa, pv, ta, tv = blank()
    pa[0, 0, 0:5] = ta[0, 0, 0:5] = 1    # audio in the first half
    pv[0, 0, 5:10] = tv[0, 0, 5:10] = 1  # visual in the second half: AND is empty
    check(avvp_scores(pa, pv, ta, tv), segment_av=100.0, event_av=100.0)
    tv[0, 0, 0] = 1  # now truth AV has segment 0, prediction AV nothing -> 0
    check(avvp_scores(pa, pv, ta, tv), segment_av=0.0, event_av=0.0)


def test_average_over_videos():
    pa, pv, ta, tv = blank(4)
    pa[1, 0, :] = 1   # video 1: audio predicts class 0, truth is class 1 -> audio 0
    ta[1, 1, :] = 1
    # videos 0, 2, 3 are empty -> 1: mean (1 + 0 + 1 + 1) / 4 = 0.75
    check(avvp_scores(pa, pv, ta, tv), segment_audio=75.0, event_audio=75.0,
          segment_visual=100.0, segment_event=75.0, event_event=75.0)


# ----------------------------------------------------------------------------- reference

def _random_runs(rng, videos, density):
    """Event-like data: per (video, class), with probability `density`, 1-3 random runs."""
    x = np.zeros((videos, C, T), dtype=bool)
    for v, c in zip(*np.nonzero(rng.random((videos, C)) < density)):
        for _ in range(rng.integers(1, 4)):
            s = rng.integers(0, T)
            x[v, c, s:rng.integers(s + 1, T + 1)] = True
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("density", [0.02, 0.1, 0.3, 0.6, 0.9])
def test_matches_simple_loop_on_iid_segments(seed, density):
    rng = np.random.default_rng(seed)
    videos = 30
    # sparse classes (as in AVVP: a few classes per video), i.i.d. segments within them;
    # predictions = truth with 15% of the segments of some classes flipped
    live = rng.random((2, videos, C, 1)) < 0.2
    ta, tv = live & (rng.random((2, videos, C, T)) < density)
    noisy = rng.random((2, videos, C, 1)) < 0.3
    pa, pv = np.stack([ta, tv]) ^ (noisy & (rng.random((2, videos, C, T)) < 0.15))
    got = avvp_scores(pa, pv, ta, tv)
    want = reference_scores(pa, pv, ta, tv)
    for k in AVVP_SCORE_KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5])
def test_matches_simple_loop_on_event_like_data(seed, density):
    rng = np.random.default_rng(seed)
    videos = 30
    truth_a, truth_v = _random_runs(rng, videos, density), _random_runs(rng, videos, density)
    # predictions: the truth with some segments flipped, plus some fresh runs
    def flip(x):
        return (x ^ (rng.random(x.shape) < 0.1)) | _random_runs(rng, videos, density / 2)

    pa, pv = flip(truth_a), flip(truth_v)
    got = avvp_scores(pa, pv, truth_a, truth_v)
    want = reference_scores(pa, pv, truth_a, truth_v)
    for k in AVVP_SCORE_KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_dense_all_ones_and_all_zeros():
    ones = np.ones((2, C, T), dtype=np.int32)
    zeros = np.zeros((2, C, T), dtype=np.int32)
    got = avvp_scores(ones, zeros, zeros, ones)
    assert got == pytest.approx(reference_scores(ones, zeros, zeros, ones))
    check(got, segment_audio=0.0, segment_visual=0.0, segment_av=100.0, event_av=100.0)


def test_torch_and_dtypes_agree():
    rng = np.random.default_rng(7)
    arrs = [rng.random((5, C, T)) < 0.3 for _ in range(4)]
    want = avvp_scores(*arrs)
    for conv in (lambda a: torch.from_numpy(a), lambda a: torch.from_numpy(a).to(torch.int64),
                 lambda a: a.astype(np.uint8), lambda a: a.astype(np.int32)):
        assert avvp_scores(*[conv(a) for a in arrs]) == want
    assert all(isinstance(v, float) for v in want.values())


def test_fast_on_1200_videos():
    rng = np.random.default_rng(8)
    arrs = [rng.random((1200, C, T)) < 0.1 for _ in range(4)]
    avvp_scores(*arrs)  # warm up (interval table)
    best = min(_timed(avvp_scores, arrs) for _ in range(3))
    assert best < 1.0, f"avvp_scores took {best:.3f} s on 1200 videos"


def _timed(fn, arrs):
    t0 = time.perf_counter()
    fn(*arrs)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- predictions

def test_predictions_threshold_mask_and_transpose():
    seg = np.zeros((2, T, C), dtype=np.float32)   # [videos, segments, classes]
    vid = np.zeros((2, C), dtype=np.float32)
    seg[0, 2, 3] = 0.5    # exactly at the threshold: positive
    vid[0, 3] = 0.5
    seg[0, 9, 4] = 0.9    # segment positive but video-level 0.49: masked out
    vid[0, 4] = 0.49
    seg[1, 0, 24] = 0.49  # segment below threshold although video-level is sure
    vid[1, 24] = 1.0
    out = avvp_predictions(seg, vid)
    assert out.shape == (2, C, T) and out.dtype == np.bool_
    assert np.argwhere(out).tolist() == [[0, 3, 2]]
    # another threshold; torch float16 input gives the same
    out2 = avvp_predictions(torch.from_numpy(seg).half(), torch.from_numpy(vid).half(), 0.4)
    assert np.argwhere(out2).tolist() == [[0, 3, 2], [0, 4, 9], [1, 24, 0]]


def test_predictions_feed_scores():
    rng = np.random.default_rng(9)
    seg_a, seg_v = rng.random((2, 6, T, C))
    vid = rng.random((6, C))
    pa, pv = avvp_predictions(seg_a, vid), avvp_predictions(seg_v, vid)
    ta, tv = _random_runs(rng, 6, 0.3), _random_runs(rng, 6, 0.3)
    assert avvp_scores(pa, pv, ta, tv) == pytest.approx(reference_scores(pa, pv, ta, tv))


# ----------------------------------------------------------------------------- bad inputs

def test_scores_reject_bad_inputs():
    ok = np.zeros((2, C, T), dtype=bool)
    with pytest.raises(TypeError, match=r"pred_audio: got list"):
        avvp_scores(ok.tolist(), ok, ok, ok)
    with pytest.raises(TypeError, match=r"true_visual: .*float64.*avvp_predictions"):
        avvp_scores(ok, ok, ok, ok.astype(np.float64))
    with pytest.raises(TypeError, match=r"pred_visual: .*torch.float32"):
        avvp_scores(ok, torch.zeros(2, C, T), ok, ok)
    with pytest.raises(ValueError, match=r"true_audio: .*\(2, 10, 25\).*transpose"):
        avvp_scores(ok, ok, np.zeros((2, T, C), dtype=bool), ok)
    with pytest.raises(ValueError, match=r"pred_audio: .*\(25, 10\).*x\[None\]"):
        avvp_scores(ok[0], ok, ok, ok)
    with pytest.raises(ValueError, match=r"pred_audio: .*at least one video"):
        avvp_scores(ok[:0], ok[:0], ok[:0], ok[:0])
    bad = ok.astype(np.int64)
    bad[1, 3, 4] = 2
    with pytest.raises(ValueError, match=r"pred_visual: .*1 value\(s\) other than 0 and 1 "
                                         r"\(first at index \(1, 3, 4\)"):
        avvp_scores(ok, bad, ok, ok)
    with pytest.raises(ValueError, match=r"same shape.*pred_audio \(2, 25, 10\).*"
                                         r"true_visual \(3, 25, 10\)"):
        avvp_scores(ok, ok, ok, np.zeros((3, C, T), dtype=bool))


def test_predictions_reject_bad_inputs():
    seg = np.full((2, T, C), 0.7, dtype=np.float32)
    vid = np.full((2, C), 0.7, dtype=np.float32)
    with pytest.raises(TypeError, match=r"segment_prob: .*bool"):
        avvp_predictions(seg > 0.5, vid)
    with pytest.raises(TypeError, match=r"video_prob: got list"):
        avvp_predictions(seg, vid.tolist())
    with pytest.raises(ValueError, match=r"segment_prob: .*\(2, 25, 10\).*transposed"):
        avvp_predictions(seg.transpose(0, 2, 1), vid)
    with pytest.raises(ValueError, match=r"video_prob: .*\(3, 25\).*\[2, 25\]"):
        avvp_predictions(seg, np.full((3, C), 0.7))
    with pytest.raises(ValueError, match=r"segment_prob: .*\[-2, 3\].*logits"):
        avvp_predictions(np.linspace(-2, 3, 2 * T * C).reshape(2, T, C), vid)
    nan = vid.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"video_prob: .*1 NaN"):
        avvp_predictions(seg, nan)
    for thr in (1.5, -0.1, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match=r"threshold"):
            avvp_predictions(seg, vid, threshold=thr)
