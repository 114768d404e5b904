"""AVE (Audio-Visual Event) data: readers, the dataset, a synthetic generator, the metric.

On-disk layout (as the DG-SCT authors' loader expects it; see shared/data/AVE/FORMAT.md):

    Annotations.txt          header + rows `Category&VideoID&Quality&StartTime&EndTime`
    categories.txt           the 28 event classes; class index = line number; 28 = background
    {train,val,test}Set.txt  the same rows, one split each (no header)
    {train,val,test}_order.h5  dataset `order`: int64 row indices into Annotations.txt
    mil_labels.h5            dataset `avadataset` [N, 29]: one-hot of the row's category
    labels.h5                dataset `avadataset` [N, 10, 29]: per-segment one-hot
    frames/<VideoID>/%08d.jpg, numbered from 1
    wave/<VideoID>.npy       10 x 32000 float samples (10 one-second segments at 32 kHz)

Split order: `AVEDataset` follows `<split>_order.h5`, as the authors do, so item i is
Annotations row `order[i]` (the row that indexes labels.h5 and mil_labels.h5). The split's
txt file only checks it (the same rows, as a set); its own order differs from the h5 one.

Labels are derived from Annotations.txt: segment s (second [s, s+1)) is the row's category
when StartTime <= s < EndTime, else background. A video id can occur in several rows (one
per event); each row is one item and they share frames and audio.
"""
from __future__ import annotations

import os
import string
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "ANNOTATION_HEADER", "AVE_CATEGORIES", "BACKGROUND", "IMAGENET_MEAN", "IMAGENET_STD",
    "NUM_CLASSES", "NUM_SEGMENTS", "SEGMENT_SAMPLES", "SPLITS", "AVEAnnotation", "AVEDataset",
    "read_annotations", "read_categories", "read_h5_labels", "read_order", "segment_accuracy",
    "segment_labels", "segment_predictions", "split_rows", "video_labels", "write_synthetic_ave",
]

ANNOTATION_HEADER = "Category&VideoID&Quality&StartTime&EndTime"
NUM_CLASSES = 28
BACKGROUND = 28  # index of the background class in the 29-wide labels
NUM_SEGMENTS = 10
SEGMENT_SAMPLES = 32000  # one second at 32 kHz
SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]


def read_wave(path, what: str) -> Tensor:
    """A clip's waveform file as [NUM_SEGMENTS, SEGMENT_SAMPLES] float32; `what` names it in
    the error for a wrong size or dtype."""
    wave = np.load(path, allow_pickle=False)
    if wave.size != NUM_SEGMENTS * SEGMENT_SAMPLES or not np.issubdtype(wave.dtype, np.floating):
        raise ValueError(f"{what}: {path} has shape {wave.shape} and dtype {wave.dtype}, "
                         f"expected float [{NUM_SEGMENTS}, {SEGMENT_SAMPLES}]")
    wave = wave.reshape(NUM_SEGMENTS, SEGMENT_SAMPLES).astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(wave))


def read_frame(path, image_size: int) -> np.ndarray:
    """One JPEG as the authors' loaders give it: RGB, bicubic to image_size x image_size,
    ImageNet-normalised, [3, S, S] float32."""
    with Image.open(path) as image:
        image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (pixels - _MEAN) / _STD

# categories.txt of the real dataset, in order (the synthetic generator writes it too)
AVE_CATEGORIES = (
    "Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane",
    "Race car, auto racing", "Female speech, woman speaking", "Helicopter", "Violin, fiddle",
    "Flute", "Ukulele", "Frying (food)", "Truck", "Shofar", "Motorcycle", "Acoustic guitar",
    "Train horn", "Clock", "Banjo", "Goat", "Baby cry, infant cry", "Bus", "Chainsaw", "Cat",
    "Horse", "Toilet flush", "Rodents, rats, mice", "Accordion", "Mandolin",
)


@dataclass(frozen=True)
class AVEAnnotation:
    """One row of Annotations.txt: an event of `category` in [start, end) seconds."""

    category: str
    video_id: str
    quality: str
    start: int
    end: int

    def line(self) -> str:
        return f"{self.category}&{self.video_id}&{self.quality}&{self.start}&{self.end}"


# ----------------------------------------------------------------------------- readers

def read_annotations(path: str | os.PathLike) -> list[AVEAnnotation]:
    """Rows of Annotations.txt or of a split file (the header line is optional)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AVE annotations: {path} does not exist")
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or (number == 1 and line == ANNOTATION_HEADER):
            continue
        fields = line.split("&")
        if len(fields) != 5:
            raise ValueError(f"{path}:{number}: expected 5 '&'-separated fields "
                             f"({ANNOTATION_HEADER}), got {len(fields)}: {line!r}")
        try:
            start, end = int(fields[3]), int(fields[4])
        except ValueError:
            raise ValueError(f"{path}:{number}: StartTime/EndTime must be whole seconds, "
                             f"got {fields[3]!r}, {fields[4]!r}") from None
        if not 0 <= start <= end <= NUM_SEGMENTS:
            raise ValueError(f"{path}:{number}: expected 0 <= StartTime <= EndTime <= "
                             f"{NUM_SEGMENTS}, got {start}, {end}")
        rows.append(AVEAnnotation(fields[0], fields[1], fields[2], start, end))
    return rows


def read_categories(path: str | os.PathLike) -> list[str]:
    """categories.txt: one class a line; the index is the line number from 0."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AVE categories: {path} does not exist")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if len(names) != len(set(names)):
        raise ValueError(f"{path}: duplicate class names")
    return names


def read_order(path: str | os.PathLike, num_rows: int | None = None) -> np.ndarray:
    """A *_order.h5 file: the int64 Annotations.txt row indices of one split."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AVE split order: {path} does not exist")
    with h5py.File(path, "r") as f:
        if "order" not in f:
            raise KeyError(f"{path}: no dataset 'order' (has {list(f.keys())})")
        order = np.asarray(f["order"][:], dtype=np.int64)
    if order.ndim != 1:
        raise ValueError(f"{path}: 'order' has shape {order.shape}, expected [rows]")
    if num_rows is not None and order.size and (order.min() < 0 or order.max() >= num_rows):
        raise ValueError(f"{path}: row indices span [{order.min()}, {order.max()}], expected "
                         f"[0, {num_rows}) (rows of Annotations.txt)")
    return order


def read_h5_labels(path: str | os.PathLike) -> np.ndarray:
    """Dataset `avadataset` of mil_labels.h5 ([N, 29]) or labels.h5 ([N, 10, 29])."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AVE labels: {path} does not exist")
    with h5py.File(path, "r") as f:
        if "avadataset" not in f:
            raise KeyError(f"{path}: no dataset 'avadataset' (has {list(f.keys())})")
        return np.asarray(f["avadataset"][:], dtype=np.float32)


def _class_index(row: AVEAnnotation, categories: list[str] | tuple[str, ...]) -> int:
    try:
        return categories.index(row.category)
    except ValueError:
        raise ValueError(f"annotation of {row.video_id}: category {row.category!r} is not in "
                         "categories.txt") from None


def segment_labels(rows: list[AVEAnnotation],
                   categories: list[str] | tuple[str, ...]) -> np.ndarray:
    """[N, 10, C+1] float32 one-hot: the row's class on StartTime <= s < EndTime, else
    background (index C = len(categories))."""
    background = len(categories)
    out = np.zeros((len(rows), NUM_SEGMENTS, background + 1), dtype=np.float32)
    seconds = np.arange(NUM_SEGMENTS)
    for i, row in enumerate(rows):
        inside = (seconds >= row.start) & (seconds < row.end)
        out[i, seconds, np.where(inside, _class_index(row, categories), background)] = 1.0
    return out


def video_labels(rows: list[AVEAnnotation],
                 categories: list[str] | tuple[str, ...]) -> np.ndarray:
    """[N, C+1] float32, as mil_labels.h5 holds them: one-hot of the row's category (the
    background column stays 0, even for a row whose event covers no segment)."""
    out = np.zeros((len(rows), len(categories) + 1), dtype=np.float32)
    for i, row in enumerate(rows):
        out[i, _class_index(row, categories)] = 1.0
    return out


def split_rows(root: str | os.PathLike, split: str,
               annotations: list[AVEAnnotation] | None = None) -> np.ndarray:
    """Row indices of one split in the authors' order (`<split>_order.h5`), checked against
    `<split>Set.txt` when that file exists (same rows as a set)."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}, expected one of {SPLITS}")
    root = Path(root)
    if annotations is None:
        annotations = read_annotations(root / "Annotations.txt")
    order = read_order(root / f"{split}_order.h5", len(annotations))
    listed = root / f"{split}Set.txt"
    if listed.is_file():
        expected = {r.line() for r in read_annotations(listed)}
        got = [annotations[i].line() for i in order]
        if set(got) != expected or len(got) != len(expected):
            missing = sorted(expected - set(got))[:3]
            raise ValueError(f"{root / f'{split}_order.h5'}: its {len(got)} rows do not match "
                             f"the {len(expected)} rows of {listed} (e.g. missing {missing})")
    return order


# ----------------------------------------------------------------------------- dataset

def _frame_indices(count: int) -> np.ndarray:
    # the authors' sampling: 10 integer frame numbers from linspace(1, count, 10)
    return np.linspace(1, count, num=NUM_SEGMENTS, dtype=int)


class AVEDataset(Dataset):
    """One Annotations.txt row per item, in the authors' `<split>_order.h5` order.

    Item: {"frames": [10, 3, S, S] float32 (bicubic to S, ImageNet-normalised),
           "audio": [10, 32000] float32, "labels": [10, 29] float32 one-hot,
           "video_id": str, "row": int (the Annotations.txt row)}.

    `frames_dir` and `wave_dir` default to `root/frames` and `root/wave`; set them when the
    metadata and the media live apart (e.g. read-only annotation files).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 192,
                 *, frames_dir: str | os.PathLike | None = None,
                 wave_dir: str | os.PathLike | None = None):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: got {image_size!r}, expected a positive int")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"AVE root: {self.root} is not a directory")
        self.split = split
        self.image_size = image_size
        self.frames_dir = Path(frames_dir) if frames_dir is not None else self.root / "frames"
        self.wave_dir = Path(wave_dir) if wave_dir is not None else self.root / "wave"
        self.categories = read_categories(self.root / "categories.txt")
        self.annotations = read_annotations(self.root / "Annotations.txt")
        self.rows = split_rows(self.root, split, self.annotations)
        self.labels = segment_labels(self.annotations, self.categories)
        self._compare_h5_labels()

    def _compare_h5_labels(self) -> None:
        # the authors train on labels.h5; say so if it disagrees with Annotations.txt
        path = self.root / "labels.h5"
        if not path.is_file():
            return
        stored = read_h5_labels(path)
        if stored.shape != self.labels.shape:
            warnings.warn(f"{path}: shape {stored.shape} differs from the labels derived from "
                          f"Annotations.txt {self.labels.shape}; using the derived ones",
                          stacklevel=3)
            return
        bad = np.flatnonzero((stored != self.labels).any(axis=(1, 2)))
        if bad.size:
            warnings.warn(f"{path}: {bad.size} rows differ from the labels derived from "
                          f"Annotations.txt (first: row {bad[0]}); using the derived ones",
                          stacklevel=3)

    def __len__(self) -> int:
        return len(self.rows)

    def video_id(self, index: int) -> str:
        return self.annotations[self.rows[index]].video_id

    def load_frames(self, video_id: str) -> Tensor:
        folder = self.frames_dir / video_id
        if not folder.is_dir():
            raise FileNotFoundError(f"AVE frames: {folder} does not exist")
        count = sum(1 for name in os.listdir(folder) if name.endswith(".jpg"))
        if count == 0:
            raise FileNotFoundError(f"AVE frames: no .jpg files in {folder}")
        size = (self.image_size, self.image_size)
        out = np.empty((NUM_SEGMENTS, 3, *size), dtype=np.float32)
        for s, k in enumerate(_frame_indices(count)):
            path = folder / f"{k:08d}.jpg"
            if not path.is_file():
                raise FileNotFoundError(f"AVE frames: {path} does not exist ({count} .jpg files "
                                        f"in {folder}, expected them numbered 1..{count})")
            out[s] = read_frame(path, self.image_size)
        return torch.from_numpy(out)

    def load_audio(self, video_id: str) -> Tensor:
        path = self.wave_dir / f"{video_id}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"AVE audio: {path} does not exist")
        return read_wave(path, "AVE audio")

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        row = int(self.rows[index])
        video_id = self.annotations[row].video_id
        return {"frames": self.load_frames(video_id), "audio": self.load_audio(video_id),
                "labels": torch.from_numpy(self.labels[row].copy()), "video_id": video_id,
                "row": row}


# ----------------------------------------------------------------------------- metric

def _check_metric_inputs(is_event_logits: Tensor, event_logits: Tensor, labels: Tensor) -> None:
    if is_event_logits.dim() != 2:
        raise ValueError(f"is_event_logits: got shape {tuple(is_event_logits.shape)}, "
                         "expected [B, T]")
    b, t = is_event_logits.shape
    if event_logits.dim() != 2 or event_logits.shape[0] != b:
        raise ValueError(f"event_logits: got shape {tuple(event_logits.shape)}, expected "
                         f"[B={b}, num_classes]")
    c = event_logits.shape[1]
    if tuple(labels.shape) != (b, t, c + 1):
        raise ValueError(f"labels: got shape {tuple(labels.shape)}, expected [B={b}, T={t}, "
                         f"{c + 1}] (one-hot, background = {c})")


def segment_predictions(is_event_logits: Tensor, event_logits: Tensor) -> Tensor:
    """[B, T] int64: the clip's top event class where sigmoid(is_event) > 0.5, else the
    background index (= event_logits.shape[-1], 28 for AVE)."""
    background = event_logits.shape[-1]
    clip_class = event_logits.argmax(dim=-1, keepdim=True)
    return torch.where(is_event_logits.sigmoid() > 0.5, clip_class,
                       torch.full_like(clip_class, background))


@torch.no_grad()
def segment_accuracy(is_event_logits: Tensor, event_logits: Tensor, labels: Tensor) -> float:
    """Percent of the B*T segments whose prediction (see `segment_predictions`) equals the
    label's class (argmax of the one-hot labels, background last). The authors' metric."""
    _check_metric_inputs(is_event_logits, event_logits, labels)
    pred = segment_predictions(is_event_logits, event_logits)
    correct = pred.eq(labels.argmax(dim=-1).to(pred.device))
    return 100.0 * correct.double().mean().item()


# ----------------------------------------------------------------------------- synthetic data

_PALETTE = np.array([  # clearly distinct RGB colours, one per class (cycled past 14)
    (230, 25, 25), (25, 200, 40), (30, 60, 235), (250, 220, 20), (240, 50, 230),
    (20, 220, 220), (255, 140, 0), (140, 60, 255), (255, 255, 255), (0, 0, 0),
    (128, 70, 20), (120, 200, 255), (160, 255, 120), (255, 150, 190)], dtype=np.uint8)
_SHAPES = ("square", "disk", "triangle", "cross")
_ID_CHARS = string.ascii_letters + string.digits + "-_"


def _draw_shape(image: Image.Image, cls: int, rng: np.random.Generator) -> None:
    s = image.size[0]
    size = int(s * rng.uniform(0.35, 0.55))
    x0, y0 = rng.integers(0, s - size + 1, size=2)
    x1, y1 = x0 + size, y0 + size
    colour = tuple(int(v) for v in _PALETTE[cls % len(_PALETTE)])
    kind = _SHAPES[(cls + cls // len(_PALETTE)) % len(_SHAPES)]
    draw = ImageDraw.Draw(image)
    if kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=colour)
    elif kind == "disk":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
    elif kind == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
    else:
        w = max(size // 4, 1)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle([x0, cy - w, x1, cy + w], fill=colour)
        draw.rectangle([cx - w, y0, cx + w, y1], fill=colour)


def _frame_segments(count: int) -> np.ndarray:
    # each frame belongs to the segment whose sampled frame is nearest, so every frame the
    # reader samples (linspace(1, count, 10)) shows exactly its own segment's content
    sampled = _frame_indices(count)
    frames = np.arange(1, count + 1)
    return np.abs(frames[:, None] - sampled[None, :]).argmin(axis=1)


def _synthetic_frames(folder: Path, cls: int, start: int, end: int, count: int, size: int,
                      rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # a static smooth colour field per video (the "scene"), fresh pixel noise per frame
    scene = Image.fromarray(rng.integers(60, 190, size=(4, 4, 3), dtype=np.uint8))
    scene = np.asarray(scene.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    segments = _frame_segments(count)
    for k in range(1, count + 1):
        noisy = scene + rng.normal(0.0, 12.0, size=scene.shape)
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        if start <= segments[k - 1] < end:
            _draw_shape(image, cls, rng)
        image.save(folder / f"{k:08d}.jpg", quality=90)


def _synthetic_wave(cls: int, start: int, end: int, rng: np.random.Generator) -> np.ndarray:
    # background: quiet white noise; event: the class's chord (root, fifth, octave)
    wave = rng.normal(0.0, 0.05, size=(NUM_SEGMENTS, SEGMENT_SAMPLES)).astype(np.float32)
    t = np.arange(SEGMENT_SAMPLES, dtype=np.float64) / SEGMENT_SAMPLES
    root = 150.0 * 2.0 ** (cls / 6.0)  # half an octave apart per class (150 Hz .. 3.4 kHz)
    for s in range(start, end):
        f0 = root * rng.uniform(0.99, 1.01)
        tone = sum(np.sin(2 * np.pi * f0 * ratio * t + rng.uniform(0, 2 * np.pi))
                   for ratio in (1.0, 1.5, 2.0))
        wave[s] += (0.3 / 3 * rng.uniform(0.7, 1.3) * tone).astype(np.float32)
    return wave


def write_synthetic_ave(root: str | os.PathLike,
                        videos_per_split: tuple[int, int, int] = (40, 10, 10),
                        num_classes: int = 4, image_size: int = 64, frames_per_video: int = 16,
                        seed: int = 0) -> Path:
    """Write a small learnable AVE-like dataset in the real layout (see the module doc).

    Each video has one event of a class c in [0, num_classes) (the first classes of the real
    28) over [StartTime, EndTime), 2 to 10 seconds long. There its sampled frames show the
    class's shape in the class's saturated colour (square, disk, triangle or cross, random
    place and size) and its audio holds the class's chord (root 150 Hz * 2**(c/6), fifth and
    octave). Elsewhere (background) frames show only the video's noisy, unsaturated scene and
    the audio only white noise. categories.txt holds all 28 real names and labels stay 29
    wide, so the real head and metric apply unchanged. Deterministic for a given seed.
    """
    counts = tuple(int(n) for n in videos_per_split)
    if len(counts) != 3 or min(counts) < 0 or sum(counts) == 0:
        raise ValueError(f"videos_per_split: got {videos_per_split!r}, expected (train, val, "
                         "test) non-negative counts, not all zero")
    if not 1 <= num_classes <= NUM_CLASSES:
        raise ValueError(f"num_classes: got {num_classes}, expected 1..{NUM_CLASSES}")
    if frames_per_video < NUM_SEGMENTS:
        raise ValueError(f"frames_per_video: got {frames_per_video}, expected >= "
                         f"{NUM_SEGMENTS} (one sampled frame per segment)")
    if image_size < 8:
        raise ValueError(f"image_size: got {image_size}, expected >= 8")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    ids: set[str] = set()
    videos = []  # (split, class, start, end, id)
    for split, n in zip(SPLITS, counts, strict=True):
        classes = rng.permutation(np.arange(n) % num_classes)
        for cls in classes:
            length = int(rng.integers(2, NUM_SEGMENTS + 1))
            start = int(rng.integers(0, NUM_SEGMENTS - length + 1))
            vid = "".join(rng.choice(list(_ID_CHARS), size=11))
            while vid in ids:
                vid = "".join(rng.choice(list(_ID_CHARS), size=11))
            ids.add(vid)
            videos.append((split, int(cls), start, start + length, vid))
    # Annotations.txt is grouped by class, as the real one is
    videos.sort(key=lambda v: v[1])
    rows = [AVEAnnotation(AVE_CATEGORIES[c], vid, "good", s, e) for _, c, s, e, vid in videos]

    (root / "categories.txt").write_text("\n".join(AVE_CATEGORIES) + "\n", encoding="utf-8")
    (root / "Annotations.txt").write_text(
        "\n".join([ANNOTATION_HEADER] + [r.line() for r in rows]) + "\n", encoding="utf-8")
    for split in SPLITS:
        index = np.array([i for i, v in enumerate(videos) if v[0] == split], dtype=np.int64)
        (root / f"{split}Set.txt").write_text(
            "".join(rows[i].line() + "\n" for i in index), encoding="utf-8")
        with h5py.File(root / f"{split}_order.h5", "w") as f:
            f.create_dataset("order", data=rng.permutation(index))  # not the txt order
    with h5py.File(root / "mil_labels.h5", "w") as f:
        f.create_dataset("avadataset", data=video_labels(rows, AVE_CATEGORIES))
    with h5py.File(root / "labels.h5", "w") as f:
        f.create_dataset("avadataset", data=segment_labels(rows, AVE_CATEGORIES))

    (root / "wave").mkdir(exist_ok=True)
    for _, cls, start, end, vid in videos:
        _synthetic_frames(root / "frames" / vid, cls, start, end, frames_per_video,
                          image_size, rng)
        np.save(root / "wave" / f"{vid}.npy", _synthetic_wave(cls, start, end, rng))
    return root
