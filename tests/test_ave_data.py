"""AVE data: readers on the real split files, the synthetic generator, the dataset, the metric."""
from __future__ import annotations

import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dgsct_kernels.data.ave import (
    ANNOTATION_HEADER,
    AVE_CATEGORIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    AVEDataset,
    read_annotations,
    read_categories,
    read_h5_labels,
    read_order,
    segment_accuracy,
    segment_labels,
    segment_predictions,
    split_rows,
    video_labels,
    write_synthetic_ave,
)


def _real_meta_root() -> Path | None:
    # CI runs a clean clone in a temp dir, so the sibling of this checkout may not exist
    candidates = [os.environ.get("DGSCT_AVE_META"),
                  Path(__file__).resolve().parents[1].parent / "shared" / "data" / "AVE",
                  "/work/shared/data/AVE"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "Annotations.txt").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def real_root() -> Path:
    root = _real_meta_root()
    if root is None:
        pytest.skip("real AVE annotation files not found (set DGSCT_AVE_META to the folder "
                    "holding Annotations.txt; tried ../shared/data/AVE and /work/shared/data/AVE)")
    return root


# ----------------------------------------------------------------------------- real files

def test_real_annotations_categories_and_splits(real_root):
    rows = read_annotations(real_root / "Annotations.txt")
    categories = read_categories(real_root / "categories.txt")
    assert len(rows) == 4143
    assert tuple(categories) == AVE_CATEGORIES and len(categories) + 1 == 29  # + background
    sizes = {split: len(split_rows(real_root, split, rows)) for split in SPLITS}
    assert sizes == {"train": 3339, "val": 402, "test": 402}
    orders = [split_rows(real_root, split, rows) for split in SPLITS]
    together = np.concatenate(orders)
    assert len(set(together.tolist())) == 4143  # disjoint and covering every row
    for split in SPLITS:
        assert len(read_annotations(real_root / f"{split}Set.txt")) == sizes[split]


def test_real_labels_agree_with_mil_labels(real_root):
    rows = read_annotations(real_root / "Annotations.txt")
    categories = read_categories(real_root / "categories.txt")
    derived = segment_labels(rows, categories)
    mil = read_h5_labels(real_root / "mil_labels.h5")
    assert derived.shape == (4143, 10, 29) and mil.shape == (4143, 29)
    assert np.all(derived.sum(-1) == 1)
    np.testing.assert_array_equal(video_labels(rows, categories), mil)
    # every foreground segment carries the video's mil class; mil marks no background
    foreground = derived[:, :, :28].max(axis=1)
    assert np.all(foreground <= mil[:, :28])
    assert mil[:, 28].sum() == 0
    # background segments are exactly those outside [StartTime, EndTime)
    starts = np.array([r.start for r in rows])
    ends = np.array([r.end for r in rows])
    seconds = np.arange(10)
    outside = (seconds < starts[:, None]) | (seconds >= ends[:, None])
    np.testing.assert_array_equal(derived[:, :, 28] == 1, outside)


# ----------------------------------------------------------------------------- readers

def test_reader_errors_name_the_file(tmp_path):
    bad = tmp_path / "Annotations.txt"
    bad.write_text(ANNOTATION_HEADER + "\nChurch bell&abc&good&0\n")
    with pytest.raises(ValueError, match=r"Annotations.txt:2: expected 5"):
        read_annotations(bad)
    bad.write_text("Church bell&abc&good&7&3\n")
    with pytest.raises(ValueError, match=r"Annotations.txt:1: expected 0 <= StartTime"):
        read_annotations(bad)
    with pytest.raises(FileNotFoundError, match=r"nothere\.txt"):
        read_annotations(tmp_path / "nothere.txt")
    with h5py.File(tmp_path / "train_order.h5", "w") as f:
        f.create_dataset("order", data=np.array([0, 5], dtype=np.int64))
    with pytest.raises(ValueError, match=r"train_order.h5: row indices span \[0, 5\]"):
        read_order(tmp_path / "train_order.h5", num_rows=3)


def _rows(tmp_path, lines):
    path = tmp_path / "rows.txt"
    path.write_text("\n".join(lines) + "\n")
    return read_annotations(path)


def test_segment_labels_by_hand(tmp_path):
    rows = _rows(tmp_path, ["Bark&a&good&2&5", "Cat&b&good&0&10", "Church bell&c&good&0&0"])
    labels = segment_labels(rows, AVE_CATEGORIES)
    assert labels.argmax(-1).tolist() == [
        [28, 28, 2, 2, 2, 28, 28, 28, 28, 28], [22] * 10, [28] * 10]
    with pytest.raises(ValueError, match=r"'Dog' is not in categories\.txt"):
        segment_labels(_rows(tmp_path, ["Dog&d&good&0&1"]), AVE_CATEGORIES)


# ----------------------------------------------------------------------------- synthetic data

COUNTS = (6, 3, 3)
NUM_CLASSES = 3
FRAMES = 13


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ave")
    return write_synthetic_ave(root, COUNTS, num_classes=NUM_CLASSES, image_size=24,
                               frames_per_video=FRAMES, seed=3)


def test_synthetic_layout(synthetic):
    names = {p.name for p in synthetic.iterdir()}
    assert names == {"Annotations.txt", "categories.txt", "trainSet.txt", "valSet.txt",
                     "testSet.txt", "train_order.h5", "val_order.h5", "test_order.h5",
                     "mil_labels.h5", "labels.h5", "frames", "wave"}
    lines = (synthetic / "Annotations.txt").read_text().splitlines()
    assert lines[0] == ANNOTATION_HEADER and len(lines) == 1 + sum(COUNTS)
    assert tuple(read_categories(synthetic / "categories.txt")) == AVE_CATEGORIES
    rows = read_annotations(synthetic / "Annotations.txt")
    assert {r.category for r in rows} == set(AVE_CATEGORIES[:NUM_CLASSES])
    assert all(r.quality == "good" and len(r.video_id) == 11 and r.end - r.start >= 2
               for r in rows)
    for split, count in zip(SPLITS, COUNTS, strict=True):
        order = read_order(synthetic / f"{split}_order.h5")
        assert order.dtype == np.int64 and len(order) == count
        assert len(split_rows(synthetic, split)) == count  # same rows as the txt
    with h5py.File(synthetic / "labels.h5") as f:
        assert f["avadataset"].shape == (sum(COUNTS), 10, 29)
    np.testing.assert_array_equal(read_h5_labels(synthetic / "labels.h5"),
                                  segment_labels(rows, AVE_CATEGORIES))
    np.testing.assert_array_equal(read_h5_labels(synthetic / "mil_labels.h5"),
                                  video_labels(rows, AVE_CATEGORIES))
    for row in rows:
        frames = sorted((synthetic / "frames" / row.video_id).iterdir())
        assert [p.name for p in frames] == [f"{k:08d}.jpg" for k in range(1, FRAMES + 1)]
        wave = np.load(synthetic / "wave" / f"{row.video_id}.npy")
        assert wave.shape == (10, 32000) and wave.dtype == np.float32


def test_synthetic_is_deterministic(tmp_path, synthetic):
    again = write_synthetic_ave(tmp_path, COUNTS, num_classes=NUM_CLASSES, image_size=24,
                                frames_per_video=FRAMES, seed=3)
    for name in ("Annotations.txt", "trainSet.txt"):
        assert (again / name).read_text() == (synthetic / name).read_text()
    assert np.array_equal(read_order(again / "val_order.h5"),
                          read_order(synthetic / "val_order.h5"))


def _max_or_zero(t: torch.Tensor) -> float:
    return t.max().item() if t.numel() else 0.0


def test_dataset_reads_synthetic(synthetic):
    for split, count in zip(SPLITS, COUNTS, strict=True):
        assert len(AVEDataset(synthetic, split, image_size=32)) == count
    ds = AVEDataset(synthetic, "train", image_size=32)
    rows = read_annotations(synthetic / "Annotations.txt")
    order = read_order(synthetic / "train_order.h5")
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    for i in range(len(ds)):
        item = ds[i]
        assert item["frames"].shape == (10, 3, 32, 32) and item["frames"].dtype == torch.float32
        assert item["audio"].shape == (10, 32000) and item["audio"].dtype == torch.float32
        assert item["labels"].shape == (10, 29) and item["labels"].dtype == torch.float32
        row = rows[order[i]]  # the authors' order, not the txt one
        assert item["video_id"] == row.video_id and item["row"] == order[i]
        expected = [AVE_CATEGORIES.index(row.category) if row.start <= s < row.end else 28
                    for s in range(10)]
        assert item["labels"].argmax(-1).tolist() == expected
        assert torch.all(item["labels"].sum(-1) == 1)
        pixels = item["frames"] * std + mean  # undo the ImageNet normalisation
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        # the class's chord (root 150 Hz * 2**(class/6), fifth, octave) sounds in the event
        event = torch.tensor([s != 28 for s in expected])
        energy = item["audio"].pow(2).mean(-1)
        assert energy[event].min() > 2 * _max_or_zero(energy[~event])
        peak_hz = torch.fft.rfft(item["audio"][event]).abs().argmax(-1).double()  # 1 Hz bins
        root = 150.0 * 2.0 ** (AVE_CATEGORIES.index(row.category) / 6.0)
        off = torch.stack([(peak_hz / (root * r) - 1).abs() for r in (1.0, 1.5, 2.0)])
        assert off.amin(0).max() < 0.02


def test_synthetic_frames_show_the_event(synthetic):
    # the sampled frames carry a saturated class-coloured shape exactly in event segments
    ds = AVEDataset(synthetic, "test", image_size=24)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    for i in range(len(ds)):
        item = ds[i]
        pixels = item["frames"] * std + mean
        saturation = pixels.amax(1) - pixels.amin(1)  # [10, S, S]
        strong = (saturation > 0.6).float().mean((1, 2))
        event = item["labels"].argmax(-1) != 28
        assert strong[event].min() > 0.02 and _max_or_zero(strong[~event]) < 0.005


def test_dataset_batches_with_default_collate(synthetic):
    batch = next(iter(DataLoader(AVEDataset(synthetic, "val", image_size=16), batch_size=2)))
    assert batch["frames"].shape == (2, 10, 3, 16, 16)
    assert batch["audio"].shape == (2, 10, 32000) and batch["labels"].shape == (2, 10, 29)
    assert len(batch["video_id"]) == 2


def test_dataset_errors(synthetic, tmp_path):
    with pytest.raises(ValueError, match="split: got 'dev'"):
        AVEDataset(synthetic, "dev")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        AVEDataset(tmp_path / "missing")
    ds = AVEDataset(synthetic, "val", image_size=16, frames_dir=tmp_path / "frames",
                    wave_dir=tmp_path / "wave")
    video = ds.video_id(0)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "frames" / video))):
        ds[0]
    (tmp_path / "frames" / video).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no \.jpg files"):
        ds.load_frames(video)
    (tmp_path / "wave").mkdir()
    np.save(tmp_path / "wave" / f"{video}.npy", np.zeros((10, 16000), dtype=np.float32))
    with pytest.raises(ValueError, match=r"has shape \(10, 16000\).*expected float \[10, 32000\]"):
        ds.load_audio(video)
    np.save(tmp_path / "wave" / f"{video}.npy", np.zeros(320000, dtype=np.float64))
    assert ds.load_audio(video).shape == (10, 32000)  # flat waveforms are reshaped, as upstream
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_warns_when_labels_h5_disagrees(synthetic, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(synthetic, copy, ignore=shutil.ignore_patterns("frames", "wave"))
    labels = read_h5_labels(copy / "labels.h5")
    labels[1, 0] = np.roll(labels[1, 0], 1)
    with h5py.File(copy / "labels.h5", "w") as f:
        f.create_dataset("avadataset", data=labels)
    with pytest.warns(UserWarning, match="1 rows differ"):
        AVEDataset(copy, "train")


def test_write_synthetic_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        write_synthetic_ave(tmp_path, (1, 1, 1), num_classes=29)
    with pytest.raises(ValueError, match="frames_per_video"):
        write_synthetic_ave(tmp_path, (1, 1, 1), frames_per_video=9)
    with pytest.raises(ValueError, match="videos_per_split"):
        write_synthetic_ave(tmp_path, (0, 0, 0))


# ----------------------------------------------------------------------------- metric

def _one_hot(classes):
    return torch.nn.functional.one_hot(torch.tensor(classes), 29).float()


def test_segment_accuracy_by_hand():
    bg = 28
    labels = torch.stack([_one_hot([bg, bg, 3, 3, 3, bg, bg, bg, bg, bg]),
                          _one_hot([7] * 10)])
    event = torch.full((2, 28), -1.0)
    event[0, 3] = 2.0
    event[1, 7] = 2.0
    on = torch.tensor(5.0)
    is_event = torch.full((2, 10), -on)
    is_event[0, 2:5] = on
    is_event[1] = on
    assert segment_accuracy(is_event, event, labels) == 100.0
    # everything predicted background: only the 7 background segments are right
    assert segment_accuracy(torch.full((2, 10), -on), event, labels) == pytest.approx(35.0)
    # a logit of exactly 0 is sigmoid 0.5, which is not > 0.5: background
    assert segment_accuracy(torch.zeros(2, 10), event, labels) == pytest.approx(35.0)
    # the right segments but the wrong clip class in video 1: its 10 segments are wrong
    wrong = event.clone()
    wrong[1, 2] = 3.0
    assert segment_accuracy(is_event, wrong, labels) == pytest.approx(50.0)
    # event everywhere: video 0 gets only its 3 event segments right
    assert segment_accuracy(torch.full((2, 10), on), event, labels) == pytest.approx(65.0)
    pred = segment_predictions(is_event, wrong)
    assert pred.tolist() == [[bg, bg, 3, 3, 3, bg, bg, bg, bg, bg], [2] * 10]


def test_segment_accuracy_shape_errors():
    labels = torch.zeros(2, 10, 29)
    with pytest.raises(ValueError, match=r"is_event_logits: got shape \(2, 10, 1\)"):
        segment_accuracy(torch.zeros(2, 10, 1), torch.zeros(2, 28), labels)
    with pytest.raises(ValueError, match=r"event_logits: got shape \(3, 28\)"):
        segment_accuracy(torch.zeros(2, 10), torch.zeros(3, 28), labels)
    with pytest.raises(ValueError, match=r"labels: got shape \(2, 10, 28\), expected \[B=2, "
                                         r"T=10, 29\]"):
        segment_accuracy(torch.zeros(2, 10), torch.zeros(2, 28), torch.zeros(2, 10, 28))
