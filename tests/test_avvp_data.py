"""AVVP data: the reader on the shipped annotation files, the synthetic generator, the dataset."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dgsct_kernels.data.ave import IMAGENET_MEAN, IMAGENET_STD
from dgsct_kernels.data.avvp import (
    AVVP_CLASSES,
    AVVP_EVAL_FILES,
    AVVP_SPLIT_FILES,
    AVVPDataset,
    read_avvp_annotations,
    tone_root_hz,
    write_synthetic_avvp,
)

C = {name: i for i, name in enumerate(AVVP_CLASSES)}


def _real_dir() -> Path | None:
    candidates = [os.environ.get("DGSCT_AVVP_META"),
                  Path(__file__).resolve().parents[1].parent / "shared" / "data" / "AVVP",
                  "/work/shared/data/AVVP"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "AVVP_train.csv").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def real_dir() -> Path:
    root = _real_dir()
    if root is None:
        pytest.skip("real AVVP annotation files not found (set DGSCT_AVVP_META to the folder "
                    "holding AVVP_train.csv; tried ../shared/data/AVVP and /work/shared/data/AVVP)")
    return root


def _segments(*runs):
    out = np.zeros(10, np.float32)
    for on, off in runs:
        out[on:off] = 1
    return out


# ----------------------------------------------------------------------------- real files

def test_classes():
    assert len(AVVP_CLASSES) == 25 and len(set(AVVP_CLASSES)) == 25
    assert AVVP_CLASSES[0] == "Speech" and AVVP_CLASSES[22] == "Baby_cry_infant_cry"
    assert AVVP_CLASSES[-1] == "Clapping"


def test_real_counts_and_flawed_rows(real_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="dgsct_kernels"):
        ann = read_avvp_annotations(real_dir)
    assert {s: len(ann[s]) for s in ("train", "val", "test")} == {
        "train": 10000, "val": 649, "test": 1200}
    assert ann["train"].audio_labels is None and ann["train"].labels.shape == (10000, 25)
    assert ann["test"].audio_labels.shape == (1200, 25, 10)
    assert ann["val"].visual_labels.shape == (649, 25, 10)
    # 4131 audio and 2495 visual rows; 17 and 11 belong to no val/test video
    assert {m: len(e) for m, e in ann.events.items()} == {"audio": 4114, "visual": 2484}
    assert len(ann.skipped) == 28 and not ann.repaired
    assert ann.skipped_counts() == {"not a val/test video": 25,
                                    "misplaced: the filename column holds a class name": 2,
                                    "stray backtick in the filename": 1}
    flawed = {(n.file, n.line): n for n in ann.skipped if n.reason != "not a val/test video"}
    assert sorted(flawed) == [("AVVP_eval_audio.csv", 930), ("AVVP_eval_audio.csv", 931),
                              ("AVVP_eval_audio.csv", 2449)]
    assert flawed["AVVP_eval_audio.csv", 930].row == ("Baby_cry_infant_cry", "0", "4", "Speech")
    assert flawed["AVVP_eval_audio.csv", 2449].row[0] == "KvIjsmANkxI_10_20`"
    assert "skipped 28 eval rows" in caplog.text
    # as the authors' exact-match evaluation saw them
    test = ann["test"]
    i = test.index("JfZEqeLZqWk_30_40")
    assert np.flatnonzero(test.labels[i]).tolist() == [C["Speech"], C["Baby_cry_infant_cry"]]
    assert test.audio_labels[i, C["Speech"]].sum() == 0
    np.testing.assert_array_equal(test.audio_labels[i, C["Baby_cry_infant_cry"]],
                                  _segments((0, 10)))
    np.testing.assert_array_equal(test.visual_labels[i, C["Baby_cry_infant_cry"]],
                                  _segments((1, 6)))
    k = test.index("KvIjsmANkxI_10_20")
    np.testing.assert_array_equal(test.audio_labels[k, C["Cat"]], _segments((3, 7), (8, 10)))


def test_real_repair(real_dir):
    ann = read_avvp_annotations(real_dir, repair=True)
    assert {m: len(e) for m, e in ann.events.items()} == {"audio": 4117, "visual": 2484}
    assert ann.skipped_counts() == {"not a val/test video": 25}
    assert [(n.line, n.filename) for n in ann.repaired] == [
        (930, "JfZEqeLZqWk_30_40"), (931, "JfZEqeLZqWk_30_40"), (2449, "KvIjsmANkxI_10_20")]
    test = ann["test"]
    i = test.index("JfZEqeLZqWk_30_40")
    np.testing.assert_array_equal(test.audio_labels[i, C["Speech"]], _segments((0, 4), (7, 10)))
    k = test.index("KvIjsmANkxI_10_20")
    np.testing.assert_array_equal(test.audio_labels[k, C["Cat"]],
                                  _segments((0, 1), (3, 7), (8, 10)))


def test_real_known_videos(real_dir):
    ann = read_avvp_annotations(real_dir)
    train = ann["train"]
    assert train.filenames[0] == "BjCEufrlXm4_20_30"
    assert np.flatnonzero(train.labels[0]).tolist() == [C["Speech"], C["Dog"]]
    test = ann["test"]
    i = test.index("KSRjje7GH44_60_70")
    assert np.flatnonzero(test.labels[i]).tolist() == [C["Speech"], C["Blender"]]
    np.testing.assert_array_equal(test.audio_labels[i, C["Blender"]], _segments((8, 10)))
    np.testing.assert_array_equal(test.audio_labels[i, C["Speech"]], _segments((0, 8)))
    np.testing.assert_array_equal(test.visual_labels[i, C["Blender"]], _segments((0, 10)))
    assert test.audio_labels[i].sum() == 10 and test.visual_labels[i].sum() == 10
    val = ann["val"]
    assert np.flatnonzero(val.labels[val.index("4O9rI-FpqLg_10_20")]).tolist() == [
        C["Speech"], C["Cheering"], C["Clapping"]]
    # onset >= offset marks nothing, as the authors' slicing (`8DF2PxdT5tE_390_400 9 0 Cheering`)
    s, j = (("val", val.index("8DF2PxdT5tE_390_400")) if "8DF2PxdT5tE_390_400" in val.filenames
            else ("test", test.index("8DF2PxdT5tE_390_400")))
    assert ann[s].audio_labels[j, C["Cheering"]].sum() == 0
    assert any(e.filename == "8DF2PxdT5tE_390_400" and (e.onset, e.offset) == (9, 0)
               for e in ann.events["audio"])
    # val and test are disjoint from train and from each other
    assert not set(train.filenames) & (set(val.filenames) | set(test.filenames))


# ----------------------------------------------------------------------------- reader errors

def _write(folder: Path, name: str, lines: list[str]) -> None:
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _tiny(folder: Path, audio: list[str] | None = None) -> Path:
    _write(folder, AVVP_SPLIT_FILES["train"], ["filename\tevent_labels", "aaa_0_10\tDog,Cat"])
    _write(folder, AVVP_SPLIT_FILES["val"], ["filename\tevent_labels", "bbb_0_10\tSpeech"])
    _write(folder, AVVP_SPLIT_FILES["test"], ["filename\tevent_labels", "ccc_0_10\tCar"])
    _write(folder, AVVP_EVAL_FILES["audio"], ["filename\tonset\toffset\tevent_labels"]
           + (audio if audio is not None else ["bbb_0_10\t2\t5\tSpeech"]))
    _write(folder, AVVP_EVAL_FILES["visual"], ["filename\tonset\toffset\tevent_labels",
                                               "ccc_0_10\t0\t10\tCar"])
    return folder


def test_reader_on_a_tiny_set(tmp_path):
    ann = read_avvp_annotations(_tiny(tmp_path, ["bbb_0_10\t2\t5\tSpeech", "Car\t1\t2\tSpeech",
                                                 "zzz_0_10\t0\t1\tDog"]))
    np.testing.assert_array_equal(ann["val"].audio_labels[0, 0], _segments((2, 5)))
    assert ann["test"].visual_labels[0, C["Car"]].sum() == 10
    assert [n.reason for n in ann.skipped] == [
        "misplaced: the filename column holds a class name", "not a val/test video"]
    repaired = read_avvp_annotations(tmp_path, repair=True)
    np.testing.assert_array_equal(repaired["val"].audio_labels[0, 0], _segments((1, 5)))


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"AVVP_train\.csv does not exist"):
        read_avvp_annotations(tmp_path)
    _tiny(tmp_path, ["bbb_0_10\t2\t5\tSpeeech"])
    with pytest.raises(ValueError, match=r"AVVP_eval_audio\.csv:2: unknown class 'Speeech'"):
        read_avvp_annotations(tmp_path)
    _tiny(tmp_path, ["bbb_0_10\t2\t11\tSpeech"])
    with pytest.raises(ValueError, match=r"AVVP_eval_audio\.csv:2: onset/offset must lie"):
        read_avvp_annotations(tmp_path)
    _tiny(tmp_path, ["bbb_0_10\t2.5\t5\tSpeech"])
    with pytest.raises(ValueError, match=r"AVVP_eval_audio\.csv:2: onset/offset must be whole"):
        read_avvp_annotations(tmp_path)
    _tiny(tmp_path, ["bbb_0_10\t2\tSpeech"])
    with pytest.raises(ValueError, match=r"AVVP_eval_audio\.csv:2: expected 4 tab-separated"):
        read_avvp_annotations(tmp_path)
    _tiny(tmp_path)
    _write(tmp_path, AVVP_SPLIT_FILES["val"], ["filename,event_labels", "bbb_0_10,Speech"])
    with pytest.raises(ValueError, match=r"AVVP_val_pd\.csv:1: expected the header"):
        read_avvp_annotations(tmp_path)
    _write(tmp_path, AVVP_SPLIT_FILES["val"], ["filename\tevent_labels", "bbb_0_10\tSpeech",
                                               "bbb_0_10\tCar"])
    with pytest.raises(ValueError, match=r"AVVP_val_pd\.csv:3: 'bbb_0_10' is listed twice"):
        read_avvp_annotations(tmp_path)
    _write(tmp_path, AVVP_SPLIT_FILES["val"], ["filename\tevent_labels", "ccc_0_10\tCar"])
    with pytest.raises(ValueError, match=r"'ccc_0_10' is in both val and test"):
        read_avvp_annotations(tmp_path)


# ----------------------------------------------------------------------------- synthetic data

COUNTS = (8, 6, 6)
SIZE = 32


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic_avvp(tmp_path_factory.mktemp("avvp"), COUNTS, num_classes=5,
                                image_size=SIZE, seed=3)


def test_synthetic_layout_and_determinism(synthetic, tmp_path):
    names = {p.name for p in synthetic.iterdir()}
    assert names == set(AVVP_SPLIT_FILES.values()) | set(AVVP_EVAL_FILES.values()) | {
        "frame", "wave", "feats"}
    ann = read_avvp_annotations(synthetic)
    assert not ann.skipped
    assert [len(ann[s]) for s in ("train", "val", "test")] == list(COUNTS)
    everything = [f for s in ("train", "val", "test") for f in ann[s].filenames]
    assert len(set(everything)) == sum(COUNTS)
    assert {p.name for p in (synthetic / "wave").iterdir()} == {f"{f}.npy" for f in everything}
    assert len(list((synthetic / "frame" / everything[0]).glob("*.jpg"))) == 10
    used = np.concatenate([ann[s].labels for s in ("train", "val", "test")]).sum(0)
    assert used[:5].min() > 0 and used[5:].sum() == 0  # the first 5 of 25 classes
    again = write_synthetic_avvp(tmp_path / "again", COUNTS, num_classes=5, image_size=SIZE,
                                 seed=3)
    for name in list(AVVP_SPLIT_FILES.values()) + list(AVVP_EVAL_FILES.values()):
        assert (again / name).read_bytes() == (synthetic / name).read_bytes()
    for sub in ("wave", "feats/r2plus1d_18"):
        assert (again / sub / f"{everything[-1]}.npy").read_bytes() == \
            (synthetic / sub / f"{everything[-1]}.npy").read_bytes()
    other = write_synthetic_avvp(tmp_path / "other", (2, 1, 1), num_classes=5, image_size=SIZE,
                                 seed=4)
    assert (other / AVVP_SPLIT_FILES["train"]).read_text() != \
        (synthetic / AVVP_SPLIT_FILES["train"]).read_text()


def test_synthetic_labels_are_llp_style(synthetic):
    ann = read_avvp_annotations(synthetic)
    audio_only = visual_only = both = 0
    for s in ("val", "test"):
        split = ann[s]
        a = split.audio_labels.max(-1)
        v = split.visual_labels.max(-1)
        np.testing.assert_array_equal(split.labels, np.maximum(a, v))  # video = union
        audio_only += int(((a == 1) & (v == 0)).sum())
        visual_only += int(((a == 0) & (v == 1)).sum())
        both += int(((a == 1) & (v == 1)).sum())
    # where a class is both audible and visible, its runs differ somewhere
    assert audio_only > 0 and visual_only > 0 and both > max(audio_only, visual_only)
    diff = [(split.audio_labels[i, c] != split.visual_labels[i, c]).any()
            for split in (ann["val"], ann["test"]) for i, c in zip(*np.nonzero(
                split.audio_labels.max(-1) * split.visual_labels.max(-1)), strict=True)]
    assert any(diff)


def test_synthetic_tones_fall_in_different_mel_bands_of_the_tiny_front_end():
    from dgsct_kernels.models.encoders.htsat import slaney_mel_filters
    from dgsct_kernels.models.presets import TINY
    a = TINY.audio
    filters = slaney_mel_filters(a["sample_rate"], a["n_fft"], a["mel_bins"], 50.0, 14000.0)
    hz_per_bin = a["sample_rate"] / a["n_fft"]
    bands = [int(filters[round(tone_root_hz(c, 5) / hz_per_bin)].argmax()) for c in range(5)]
    assert len(set(bands)) == 5, bands


def test_dataset_items(synthetic):
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    train = AVVPDataset(synthetic, "train", image_size=SIZE)
    item = train[0]
    assert set(item) == {"frames", "audio", "feats", "labels", "video_id", "row"}
    assert item["frames"].shape == (10, 3, SIZE, SIZE) and item["frames"].dtype == torch.float32
    assert item["audio"].shape == (10, 32000) and item["audio"].dtype == torch.float32
    assert item["feats"].shape == (10, 512) and item["feats"].dtype == torch.float32
    assert item["labels"].shape == (25,) and item["video_id"] == train.video_id(0)
    pixels = item["frames"] * std + mean
    assert pixels.min() > -0.05 and pixels.max() < 1.05
    assert AVVPDataset(synthetic, "train", image_size=48)[0]["frames"].shape == (10, 3, 48, 48)

    val = AVVPDataset(synthetic, "val", image_size=SIZE)
    batch = next(iter(DataLoader(val, batch_size=3)))
    assert batch["audio_labels"].shape == (3, 25, 10)
    assert batch["visual_labels"].shape == (3, 25, 10)
    assert batch["frames"].shape == (3, 10, 3, SIZE, SIZE) and batch["feats"].shape == (3, 10, 512)
    torch.testing.assert_close(batch["labels"], torch.maximum(
        batch["audio_labels"].amax(-1), batch["visual_labels"].amax(-1)))
    assert val[-1]["row"] == len(val) - 1
    with pytest.raises(IndexError):
        val[len(val)]


def _tone_power(wave: np.ndarray, cls: int) -> float:
    f0 = tone_root_hz(cls, 5)
    spectrum = np.abs(np.fft.rfft(wave)) ** 2  # 1 Hz bins for one second at 32 kHz
    return float(spectrum[int(f0 * 0.988):int(f0 * 1.012) + 1].sum())


def test_synthetic_signals_follow_the_dense_labels(synthetic):
    ds = AVVPDataset(synthetic, "test", image_size=SIZE)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    from dgsct_kernels.data.ave import _PALETTE
    on_a, off_a, on_v, off_v, rows = [], [], [], [], {}
    for index in range(len(ds)):
        item = ds[index]
        wave = item["audio"].numpy()
        rgb = ((item["frames"] * std + mean) * 255).permute(0, 2, 3, 1).numpy()
        for c in np.flatnonzero(item["labels"].numpy()):
            colour = _PALETTE[c].astype(np.float32)
            share = (np.abs(rgb - colour).max(-1) < 35).mean(axis=(1, 2))  # per segment
            for s in range(10):
                power = _tone_power(wave[s], c)
                (on_a if item["audio_labels"][c, s] else off_a).append(power)
                (on_v if item["visual_labels"][c, s] else off_v).append(share[s])
                if item["visual_labels"][c, s]:
                    rows.setdefault(c, []).append(item["feats"][s].numpy())
    assert min(on_a) > 20 * max(off_a)  # the class tone only where audible
    assert min(on_v) > 0.02 and max(off_v) < 0.005  # its colour patch only where visible
    # feature rows of the same visible class share a pattern
    for c, feats in rows.items():
        if len(feats) >= 2:
            a, b = feats[0], feats[-1]
            assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.2


def test_write_is_fast_and_validates(tmp_path):
    import time
    start = time.perf_counter()
    write_synthetic_avvp(tmp_path / "default")
    assert time.perf_counter() - start < 10
    with pytest.raises(ValueError, match="num_classes"):
        write_synthetic_avvp(tmp_path / "x", num_classes=26)
    with pytest.raises(ValueError, match="videos_per_split"):
        write_synthetic_avvp(tmp_path / "x", (0, 0, 0))
    with pytest.raises(ValueError, match="max_events"):
        write_synthetic_avvp(tmp_path / "x", num_classes=2, max_events=3)


# ----------------------------------------------------------------------------- dataset errors

def test_dataset_errors_name_the_path(synthetic, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synthetic, root)
    ds = AVVPDataset(root, "val", image_size=SIZE)
    name = ds.video_id(0)
    (root / "wave" / f"{name}.npy").unlink()
    with pytest.raises(FileNotFoundError, match=rf"AVVP audio: .*wave/{name}\.npy does not exist"):
        ds[0]
    (root / "feats" / "r2plus1d_18" / f"{name}.npy").unlink()
    with pytest.raises(FileNotFoundError, match=rf"r2plus1d_18/{name}\.npy does not exist"):
        ds.load_feats(name)
    np.save(root / "feats" / "r2plus1d_18" / f"{name}.npy", np.zeros((10, 256), np.float32))
    with pytest.raises(ValueError, match=r"has shape \(10, 256\)"):
        ds.load_feats(name)
    (root / "frame" / name / "00000007.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"frame/{name}/00000007\.jpg does not exist"):
        ds.load_frames(name)
    shutil.rmtree(root / "frame" / name)
    with pytest.raises(FileNotFoundError, match=rf"AVVP frames: .*frame/{name} does not exist"):
        ds.load_frames(name)
    with pytest.raises(FileNotFoundError, match="AVVP root"):
        AVVPDataset(tmp_path / "nothere", "val")
    with pytest.raises(ValueError, match="split"):
        AVVPDataset(root, "dev")
    with pytest.raises(FileNotFoundError, match=r"AVVP_train\.csv does not exist"):
        AVVPDataset(tmp_path, "val")


def test_dataset_falls_back_to_the_youtube_id(synthetic, tmp_path):
    # the authors' loader names media by the 11-character YouTube id (filename[:11])
    root = tmp_path / "short"
    shutil.copytree(synthetic, root)
    ds = AVVPDataset(root, "test", image_size=SIZE, annotation_dir=synthetic)
    name = ds.video_id(1)
    expected = ds[1]
    (root / "frame" / name).rename(root / "frame" / name[:11])
    (root / "wave" / f"{name}.npy").rename(root / "wave" / f"{name[:11]}.npy")
    feats = root / "feats" / "r2plus1d_18"
    (feats / f"{name}.npy").rename(feats / f"{name[:11]}.npy")
    got = ds[1]
    for key in ("frames", "audio", "feats", "audio_labels"):
        torch.testing.assert_close(got[key], expected[key])
