"""AVVP (audio-visual video parsing, the LLP dataset): readers, the dataset, a synthetic generator.

Annotation files (tab-separated, header row; see shared/data/AVVP/FORMAT.md):

    AVVP_train.csv                    filename, event_labels  (weak, video-level labels)
    AVVP_val_pd.csv, AVVP_test_pd.csv filename, event_labels
    AVVP_eval_audio.csv               filename, onset, offset, event_labels  (dense audio
    AVVP_eval_visual.csv              and visual events of the val and test videos)

Media, under a root (as the authors' loader reads them):

    frame/<filename>/%08d.jpg         the first 10 frames (1 per second), numbered from 1
    wave/<filename>.npy               10 x 32000 float samples
    feats/r2plus1d_18/<filename>.npy  [10, 512] R(2+1)D-18 clip features

When `<filename>` is missing, the 11-character YouTube id (`filename[:11]`, the name the
authors' loader uses) is tried before failing.

Labels: video-level labels are multi-hot [25] from `event_labels` (classes in AVVP_CLASSES
order). Dense labels of a val/test video are [25, 10] (class x segment): an eval row marks
segment s (second [s, s+1)) of its class when onset <= s < offset, so a row with onset >= offset
marks nothing (the authors' `GT[c, onset:offset] = 1` does the same). Video-level labels come
from the *_pd.csv files as they are; in 82 real val/test videos they differ from the union of
the dense classes, and they are kept so (the authors' metric masks with them too).

Flawed eval rows (see `read_avvp_annotations`): by default every eval row whose filename is
not a val/test video is attributed to no video and listed in `AVVPAnnotations.skipped` with
its reason, which is what the authors' evaluation (exact filename match) did for the
published numbers. On the shipped files that is 17 audio rows and 11 visual rows: the two
`Baby_cry_infant_cry` rows (misplaced: the filename column holds a class name), the row
named `KvIjsmANkxI_10_20` plus a stray backtick, and 25 rows of videos in no split. With
`repair=True` the two misplaced rows go to the video named by the row before them
(`JfZEqeLZqWk_30_40`, whose video-level labels hold their class `Speech`) and the backtick
is stripped (`KvIjsmANkxI_10_20`, the name of its media); both are then listed in
`AVVPAnnotations.repaired` instead.
"""
from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

from .ave import _ID_CHARS, _PALETTE, NUM_SEGMENTS, SEGMENT_SAMPLES, read_frame, read_wave

__all__ = [
    "AVVP_CLASSES", "AVVP_EVAL_FILES", "AVVP_FEAT_DIM", "AVVP_SPLIT_FILES", "AVVP_SPLITS",
    "AVVPAnnotations", "AVVPDataset", "AVVPEvent", "AVVPRowNote", "AVVPSplit",
    "NUM_AVVP_CLASSES", "read_avvp_annotations", "write_synthetic_avvp",
]

log = logging.getLogger("dgsct_kernels")

AVVP_CLASSES = (
    "Speech", "Car", "Cheering", "Dog", "Cat", "Frying_(food)", "Basketball_bounce",
    "Fire_alarm", "Chainsaw", "Cello", "Banjo", "Singing", "Chicken_rooster", "Violin_fiddle",
    "Vacuum_cleaner", "Baby_laughter", "Accordion", "Lawn_mower", "Motorcycle", "Helicopter",
    "Acoustic_guitar", "Telephone_bell_ringing", "Baby_cry_infant_cry", "Blender", "Clapping",
)
NUM_AVVP_CLASSES = len(AVVP_CLASSES)
AVVP_FEAT_DIM = 512
AVVP_SPLITS = ("train", "val", "test")
AVVP_SPLIT_FILES = {"train": "AVVP_train.csv", "val": "AVVP_val_pd.csv",
                    "test": "AVVP_test_pd.csv"}
AVVP_EVAL_FILES = {"audio": "AVVP_eval_audio.csv", "visual": "AVVP_eval_visual.csv"}
_SPLIT_HEADER = ("filename", "event_labels")
_EVAL_HEADER = ("filename", "onset", "offset", "event_labels")
_CLASS_INDEX = {name: i for i, name in enumerate(AVVP_CLASSES)}

# reasons of AVVPRowNote
MISPLACED = "misplaced: the filename column holds a class name"
BACKTICK = "stray backtick in the filename"
NO_VIDEO = "not a val/test video"


@dataclass(frozen=True)
class AVVPEvent:
    """One dense eval row: `label` (class name) in [onset, offset) seconds of `filename`."""

    filename: str
    onset: int
    offset: int
    label: str
    modality: str  # "audio" or "visual"
    line: int      # line number in its file (the header is line 1)


@dataclass(frozen=True)
class AVVPRowNote:
    """An eval row that was skipped or repaired, and why."""

    file: str
    line: int
    row: tuple[str, ...]
    reason: str
    filename: str | None = None  # the video it was attributed to (repaired rows)


@dataclass
class AVVPSplit:
    """One split: filenames in file order, labels [N, 25], dense labels [N, 25, 10]
    (val/test only; None for train)."""

    name: str
    filenames: list[str]
    labels: np.ndarray
    audio_labels: np.ndarray | None = None
    visual_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.filenames)

    def index(self, filename: str) -> int:
        try:
            return self.filenames.index(filename)
        except ValueError:
            raise KeyError(f"AVVP {self.name}: no video {filename!r}") from None


@dataclass
class AVVPAnnotations:
    """What `read_avvp_annotations` returns. `events` holds the eval rows attributed to a
    val/test video (per modality), `skipped` the rows attributed to none, `repaired` the rows
    attributed after a repair (only with repair=True)."""

    splits: dict[str, AVVPSplit]
    events: dict[str, list[AVVPEvent]]
    skipped: list[AVVPRowNote] = field(default_factory=list)
    repaired: list[AVVPRowNote] = field(default_factory=list)

    def __getitem__(self, split: str) -> AVVPSplit:
        if split not in self.splits:
            raise KeyError(f"split: got {split!r}, expected one of {AVVP_SPLITS}")
        return self.splits[split]

    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(note.reason for note in self.skipped))


# ----------------------------------------------------------------------------- readers

def _read_tsv(path: Path, header: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"AVVP annotations: {path} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        lines = list(csv.reader(f, delimiter="\t"))
    if not lines or tuple(c.strip() for c in lines[0]) != header:
        got = lines[0] if lines else "an empty file"
        raise ValueError(f"{path}:1: expected the header {chr(9).join(header)!r}, got {got!r}")
    rows = []
    for number, fields in enumerate(lines[1:], start=2):
        if not fields or not "".join(fields).strip():
            continue
        if len(fields) != len(header):
            raise ValueError(f"{path}:{number}: expected {len(header)} tab-separated fields "
                             f"({', '.join(header)}), got {len(fields)}: {fields!r}")
        rows.append((number, [c.strip() for c in fields]))
    return rows


def _class_of(name: str, path: Path, number: int) -> int:
    try:
        return _CLASS_INDEX[name]
    except KeyError:
        raise ValueError(f"{path}:{number}: unknown class {name!r} (expected one of the 25 "
                         "AVVP_CLASSES)") from None


def _read_split(path: Path, name: str) -> AVVPSplit:
    rows = _read_tsv(path, _SPLIT_HEADER)
    filenames, labels, seen = [], np.zeros((len(rows), NUM_AVVP_CLASSES), np.float32), {}
    for i, (number, (filename, events)) in enumerate(rows):
        if filename in seen:
            raise ValueError(f"{path}:{number}: {filename!r} is listed twice (first on line "
                             f"{seen[filename]})")
        seen[filename] = number
        filenames.append(filename)
        for event in events.split(","):
            labels[i, _class_of(event.strip(), path, number)] = 1.0
    return AVVPSplit(name, filenames, labels)


def _read_events(path: Path, modality: str) -> list[AVVPEvent]:
    events = []
    for number, (filename, onset, offset, label) in _read_tsv(path, _EVAL_HEADER):
        try:
            on, off = int(onset), int(offset)
        except ValueError:
            raise ValueError(f"{path}:{number}: onset/offset must be whole seconds, got "
                             f"{onset!r}, {offset!r}") from None
        if not (0 <= on <= NUM_SEGMENTS and 0 <= off <= NUM_SEGMENTS):
            raise ValueError(f"{path}:{number}: onset/offset must lie in [0, {NUM_SEGMENTS}], "
                             f"got {on}, {off}")
        _class_of(label, path, number)
        events.append(AVVPEvent(filename, on, off, label, modality, number))
    return events


def read_avvp_annotations(annotation_dir: str | os.PathLike, *,
                          repair: bool = False) -> AVVPAnnotations:
    """Read the five AVVP annotation files of `annotation_dir`.

    Returns per split (train, val, test) the filenames and the multi-hot video-level labels
    [N, 25]; val and test also get dense audio and visual labels [N, 25, 10] from the eval
    files (segment s positive when onset <= s < offset).

    An eval row whose filename is not a val/test video is attributed to no video and listed
    in `.skipped` (reason: misplaced class name, stray backtick, or not a val/test video), as
    the authors' evaluation did. With `repair=True`, a row whose filename column holds a class
    name goes to the video of the nearest earlier row with a real filename when that video's
    labels hold the row's class, and a filename with stray backticks is stripped of them; such
    rows are listed in `.repaired`. The skip counts are logged (one warning).
    """
    annotation_dir = Path(annotation_dir)
    splits = {s: _read_split(annotation_dir / AVVP_SPLIT_FILES[s], s) for s in AVVP_SPLITS}
    where: dict[str, tuple[str, int]] = {}
    for s in ("val", "test"):
        for i, filename in enumerate(splits[s].filenames):
            if filename in where:
                raise ValueError(f"AVVP annotations: {filename!r} is in both {where[filename][0]}"
                                 f" and {s}")
            where[filename] = (s, i)
    for s in ("val", "test"):
        shape = (len(splits[s]), NUM_AVVP_CLASSES, NUM_SEGMENTS)
        splits[s].audio_labels = np.zeros(shape, np.float32)
        splits[s].visual_labels = np.zeros(shape, np.float32)

    result = AVVPAnnotations(splits, {"audio": [], "visual": []})
    seconds = np.arange(NUM_SEGMENTS)
    for modality, name in AVVP_EVAL_FILES.items():
        path = annotation_dir / name
        previous = None  # the last row's filename that is a val/test video
        for event in _read_events(path, modality):
            row = (event.filename, str(event.onset), str(event.offset), event.label)
            filename, reason = event.filename, None
            if filename in _CLASS_INDEX:
                reason = MISPLACED
                filename = previous if previous is not None else filename
                if repair and filename in where:
                    split, i = where[filename]
                    if not splits[split].labels[i, _CLASS_INDEX[event.label]]:
                        filename = event.filename  # the guess does not hold the class
            elif "`" in filename:
                reason = BACKTICK
                filename = filename.replace("`", "")
            elif filename not in where:
                reason = NO_VIDEO
            if reason is not None and (not repair or reason == NO_VIDEO
                                       or filename not in where):
                result.skipped.append(AVVPRowNote(name, event.line, row, reason))
                continue
            if reason is not None:
                result.repaired.append(AVVPRowNote(name, event.line, row, reason, filename))
                event = AVVPEvent(filename, event.onset, event.offset, event.label, modality,
                                  event.line)
            previous = filename
            split, i = where[filename]
            dense = getattr(splits[split], f"{modality}_labels")
            inside = (seconds >= event.onset) & (seconds < event.offset)
            dense[i, _CLASS_INDEX[event.label], inside] = 1.0
            result.events[modality].append(event)
    if result.skipped:
        counts = ", ".join(f"{n} {reason}" for reason, n in result.skipped_counts().items())
        log.warning("AVVP annotations %s: skipped %d eval rows (%s)", annotation_dir,
                    len(result.skipped), counts)
    if result.repaired:
        log.info("AVVP annotations %s: repaired %d eval rows", annotation_dir,
                 len(result.repaired))
    return result


# ----------------------------------------------------------------------------- dataset

class AVVPDataset(Dataset):
    """One video of `split` per item, in the split file's order.

    Item: {"frames": [10, 3, S, S] float32 (frames 1..10, bicubic to S, ImageNet-normalised),
           "audio": [10, 32000] float32, "feats": [10, 512] float32 (R(2+1)D-18),
           "labels": [25] float32 multi-hot (video level),
           "audio_labels", "visual_labels": [25, 10] float32 (class x segment; val/test only),
           "video_id": str (the filename), "row": int (index in the split file)}.

    `annotation_dir` defaults to `root` (where `write_synthetic_avvp` puts the csv files);
    `frames_dir`, `wave_dir` and `feats_dir` default to `root/frame`, `root/wave` and
    `root/feats/r2plus1d_18`. `repair` is passed to `read_avvp_annotations`; `annotations`
    may give the already-read files instead.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 192,
                 *, annotation_dir: str | os.PathLike | None = None,
                 frames_dir: str | os.PathLike | None = None,
                 wave_dir: str | os.PathLike | None = None,
                 feats_dir: str | os.PathLike | None = None, repair: bool = False,
                 annotations: AVVPAnnotations | None = None):
        if split not in AVVP_SPLITS:
            raise ValueError(f"split: got {split!r}, expected one of {AVVP_SPLITS}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: got {image_size!r}, expected a positive int")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"AVVP root: {self.root} is not a directory")
        self.split = split
        self.image_size = image_size
        self.annotation_dir = Path(annotation_dir) if annotation_dir is not None else self.root
        self.frames_dir = Path(frames_dir) if frames_dir is not None else self.root / "frame"
        self.wave_dir = Path(wave_dir) if wave_dir is not None else self.root / "wave"
        self.feats_dir = (Path(feats_dir) if feats_dir is not None
                          else self.root / "feats" / "r2plus1d_18")
        if annotations is None:
            annotations = read_avvp_annotations(self.annotation_dir, repair=repair)
        self.annotations = annotations
        self.data = annotations[split]

    def __len__(self) -> int:
        return len(self.data)

    def video_id(self, index: int) -> str:
        return self.data.filenames[index]

    @staticmethod
    def _media(base: Path, filename: str, suffix: str, kind: str, is_dir: bool = False) -> Path:
        test = Path.is_dir if is_dir else Path.is_file
        path = base / f"{filename}{suffix}"
        if test(path):
            return path
        short = base / f"{filename[:11]}{suffix}"  # the authors' naming: the YouTube id
        if short != path and test(short):
            return short
        also = f" (nor {short})" if short != path else ""
        raise FileNotFoundError(f"AVVP {kind}: {path} does not exist{also}")

    def load_frames(self, filename: str) -> Tensor:
        folder = self._media(self.frames_dir, filename, "", "frames", is_dir=True)
        size = (self.image_size, self.image_size)
        out = np.empty((NUM_SEGMENTS, 3, *size), dtype=np.float32)
        for s in range(NUM_SEGMENTS):
            path = folder / f"{s + 1:08d}.jpg"
            if not path.is_file():
                raise FileNotFoundError(f"AVVP frames: {path} does not exist (expected the "
                                        f"first {NUM_SEGMENTS} frames, numbered from 1)")
            out[s] = read_frame(path, self.image_size)
        return torch.from_numpy(out)

    def load_audio(self, filename: str) -> Tensor:
        path = self._media(self.wave_dir, filename, ".npy", "audio")
        return read_wave(path, "AVVP audio")

    def load_feats(self, filename: str) -> Tensor:
        path = self._media(self.feats_dir, filename, ".npy", "clip features")
        feats = np.load(path, allow_pickle=False)
        if feats.shape != (NUM_SEGMENTS, AVVP_FEAT_DIM) or not np.issubdtype(feats.dtype,
                                                                             np.number):
            raise ValueError(f"AVVP clip features: {path} has shape {feats.shape} and dtype "
                             f"{feats.dtype}, expected [{NUM_SEGMENTS}, {AVVP_FEAT_DIM}]")
        return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = index % len(self)
        filename = self.data.filenames[index]
        item = {"frames": self.load_frames(filename), "audio": self.load_audio(filename),
                "feats": self.load_feats(filename),
                "labels": torch.from_numpy(self.data.labels[index].copy())}
        if self.data.audio_labels is not None:
            item["audio_labels"] = torch.from_numpy(self.data.audio_labels[index].copy())
            item["visual_labels"] = torch.from_numpy(self.data.visual_labels[index].copy())
        item["video_id"] = filename
        item["row"] = index
        return item


# ----------------------------------------------------------------------------- synthetic data

# half the events are audio-visual and a quarter each single-modality, as in LLP where most
# events are both: a class's usual evidence in each modality is what lets a weakly supervised
# model tell the rarer single-modality events apart
_KINDS = ("both", "both", "audio", "visual")


def _intervals(rng: np.random.Generator) -> list[tuple[int, int]]:
    # one run of 2..10 seconds, or (a quarter of the time) two runs with a gap between them
    if rng.random() < 0.25:
        a = int(rng.integers(2, 5))
        b = int(rng.integers(2, 5))
        gap = int(rng.integers(1, NUM_SEGMENTS - a - b + 1))
        start = int(rng.integers(0, NUM_SEGMENTS - a - b - gap + 1))
        return [(start, start + a), (start + a + gap, start + a + gap + b)]
    length = int(rng.integers(2, NUM_SEGMENTS + 1))
    start = int(rng.integers(0, NUM_SEGMENTS - length + 1))
    return [(start, start + length)]


def _covered(runs: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(NUM_SEGMENTS, dtype=bool)
    for on, off in runs:
        mask[on:off] = True
    return mask


def _draw_patch(image: Image.Image, cls: int, cell: int) -> None:
    # the class's colour and shape filling most of one quadrant (one quadrant per class in a
    # video, so simultaneous events never hide each other)
    s = image.size[0]
    half = s // 2
    x0, y0 = (cell % 2) * half, (cell // 2) * half
    m = max(half // 8, 1)
    box = [x0 + m, y0 + m, x0 + half - m - 1, y0 + half - m - 1]
    colour = tuple(int(v) for v in _PALETTE[cls % len(_PALETTE)])
    draw = ImageDraw.Draw(image)
    kind = cls % 3
    if kind == 0:
        draw.rectangle(box, fill=colour)
    elif kind == 1:
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])],
                     fill=colour)


def tone_root_hz(cls: int, num_classes: int) -> float:
    """The synthetic class's tone root: spread evenly in log frequency over 250 Hz .. 6 kHz,
    so that the classes fall into different bands of a coarse (16-band) log-mel front end,
    as the tiny preset's is."""
    return 250.0 * 2.0 ** (cls * np.log2(6000.0 / 250.0) / max(num_classes - 1, 1))


def _tone(cls: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """One second of class `cls`'s tone: its root (within 1%) and the fifth above."""
    t = np.arange(SEGMENT_SAMPLES, dtype=np.float64) / SEGMENT_SAMPLES
    f0 = tone_root_hz(cls, num_classes) * rng.uniform(0.99, 1.01)
    tone = sum(np.sin(2 * np.pi * f0 * ratio * t + rng.uniform(0, 2 * np.pi))
               for ratio in (1.0, 1.5))
    return (0.3 / 2 * rng.uniform(0.7, 1.3) * tone).astype(np.float32)


def write_synthetic_avvp(root: str | os.PathLike,
                         videos_per_split: tuple[int, int, int] = (40, 10, 10),
                         num_classes: int = 5, image_size: int = 64, max_events: int = 3,
                         seed: int = 0) -> Path:
    """Write a small learnable LLP-style AVVP dataset in the real layout (module doc).

    Each video holds 1..max_events distinct classes c in [0, num_classes) (the first of the
    real 25). Each class is audio-visual (half the events), audio-only or visual-only (a
    quarter each; every split with at least 4 events has each kind), and its audio and visual
    runs start and stop
    independently (one run of 2..10 s, or two shorter runs with a gap). Where a class is
    visible, the frame shows its colour and shape (square, disk, triangle) in the quadrant the
    video gives it, and its R(2+1)D feature row adds the class's fixed random pattern to
    Gaussian noise; where it is audible, the audio adds the class's tone (a root, spread in
    log frequency over 250 Hz .. 6 kHz by class, and its fifth) to quiet white noise. AVVP_train.csv holds only video-level
    labels (the union of audio and visual classes); val and test get the dense eval files
    too. All 5 annotation files are written, labels stay 25 wide. Deterministic for a given
    seed; the root is overwritten (cache it as train_ave.py does, with a marker file).
    """
    counts = tuple(int(n) for n in videos_per_split)
    if len(counts) != 3 or min(counts) < 0 or sum(counts) == 0:
        raise ValueError(f"videos_per_split: got {videos_per_split!r}, expected (train, val, "
                         "test) non-negative counts, not all zero")
    if not 1 <= num_classes <= NUM_AVVP_CLASSES:
        raise ValueError(f"num_classes: got {num_classes}, expected 1..{NUM_AVVP_CLASSES}")
    if not 1 <= max_events <= min(num_classes, 4):
        raise ValueError(f"max_events: got {max_events}, expected 1..{min(num_classes, 4)} "
                         "(at most num_classes, and 4 quadrants)")
    if image_size < 8:
        raise ValueError(f"image_size: got {image_size}, expected >= 8")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = rng.normal(0.0, 1.0, size=(num_classes, AVVP_FEAT_DIM)).astype(np.float32)

    ids: set[str] = set()
    videos = []  # (split, filename, {class: (audio runs, visual runs)})
    for split, n in zip(AVVP_SPLITS, counts, strict=True):
        sizes = rng.integers(1, max_events + 1, size=n)
        kinds = rng.permutation(np.arange(int(sizes.sum())) % len(_KINDS))
        k = 0
        for size in sizes:
            vid = "".join(rng.choice(list(_ID_CHARS), size=11))
            while vid in ids:
                vid = "".join(rng.choice(list(_ID_CHARS), size=11))
            ids.add(vid)
            start = int(rng.integers(0, 300))
            events = {}
            for cls in sorted(rng.choice(num_classes, size=int(size), replace=False).tolist()):
                kind = _KINDS[kinds[k]]
                k += 1
                audio = _intervals(rng) if kind != "visual" else []
                visual = _intervals(rng) if kind != "audio" else []
                events[int(cls)] = (audio, visual)
            videos.append((split, f"{vid}_{start}_{start + NUM_SEGMENTS}", events))

    def labels(events):
        return ",".join(AVVP_CLASSES[c] for c in events)

    for split in AVVP_SPLITS:
        lines = ["\t".join(_SPLIT_HEADER)] + [f"{name}\t{labels(ev)}"
                                              for s, name, ev in videos if s == split]
        (root / AVVP_SPLIT_FILES[split]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    for m, modality in enumerate(AVVP_EVAL_FILES):
        lines = ["\t".join(_EVAL_HEADER)]
        for split, name, events in videos:
            if split == "train":
                continue
            for cls, runs in events.items():
                lines += [f"{name}\t{on}\t{off}\t{AVVP_CLASSES[cls]}" for on, off in runs[m]]
        (root / AVVP_EVAL_FILES[modality]).write_text("\n".join(lines) + "\n", encoding="utf-8")

    feats_dir = root / "feats" / "r2plus1d_18"
    feats_dir.mkdir(parents=True, exist_ok=True)
    (root / "wave").mkdir(exist_ok=True)
    for _, name, events in videos:
        cells = rng.permutation(4)
        audible = {c: _covered(a) for c, (a, _) in events.items()}
        visible = {c: _covered(v) for c, (_, v) in events.items()}
        # frames: a static smooth colour field (the scene), fresh pixel noise per frame
        folder = root / "frame" / name
        folder.mkdir(parents=True, exist_ok=True)
        scene = Image.fromarray(rng.integers(60, 190, size=(4, 4, 3), dtype=np.uint8))
        scene = np.asarray(scene.resize((image_size, image_size), Image.Resampling.BILINEAR),
                           dtype=np.float32)
        for s in range(NUM_SEGMENTS):
            noisy = scene + rng.normal(0.0, 12.0, size=scene.shape)
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
            for j, cls in enumerate(events):
                if visible[cls][s]:
                    _draw_patch(image, cls, int(cells[j]))
            image.save(folder / f"{s + 1:08d}.jpg", quality=90)
        wave = rng.normal(0.0, 0.05, size=(NUM_SEGMENTS, SEGMENT_SAMPLES)).astype(np.float32)
        feats = rng.normal(0.0, 1.0, size=(NUM_SEGMENTS, AVVP_FEAT_DIM)).astype(np.float32)
        for cls in events:
            for s in np.flatnonzero(audible[cls]):
                wave[s] += _tone(cls, num_classes, rng)
            feats[visible[cls]] += patterns[cls]
        np.save(root / "wave" / f"{name}.npy", wave)
        np.save(feats_dir / f"{name}.npy", feats)
    return root
