"""The task registry: one place that maps a task name to everything the task needs.

A `Task` holds SPEC.md's DG-SCT settings for the task (`TaskModules`), its model presets
(encoders, input sizes, head sizes), its training defaults per preset, and, once the
task is built in this library, how to make its head and model, its loss, its data
reader and synthetic data, its evaluation, and how its head's keys are spelled in the
authors' checkpoints. `build_dgsct` and the training entry point read only this.

Adding a task: write its head, loss, data reader and evaluator, then `register_task(Task(...))`.
Names are case-insensitive (`"AVE"` is `"ave"`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from torch import nn

from .presets import PAPER, TASKS, TINY, ModelPreset, TaskModules


def _same_key(key: str) -> str:
    return key


@dataclass(frozen=True)
class Task:
    name: str
    modules: TaskModules  # SPEC.md's row: the DG-SCT modules' hyper-parameters
    presets: Mapping[str, ModelPreset] = field(default_factory=dict)
    training: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per preset
    # (modules, preset) -> head; (visual, audio, head, modules=, preset=, backend=,
    # encoders_eval=) -> model. None until the task is built here.
    head: Optional[Callable[[TaskModules, ModelPreset], nn.Module]] = None
    model: Optional[Callable[..., nn.Module]] = None
    loss: Optional[Callable] = None  # (outputs, batch) -> (loss, {name: float})
    dataset: Optional[Callable] = None  # (root, split, **options) -> Dataset
    write_synthetic: Optional[Callable] = None  # (root, **options) -> None
    # () -> an object with add(outputs, batch), merge(other) (DDP) and result() -> dict
    evaluator: Optional[Callable] = None
    score: str = "acc"  # the result's key that picks the best epoch (higher is better)
    describe: Callable[[dict], str] = str  # one line of a result for the logs
    batch_metrics: Optional[Callable] = None  # (outputs, batch) -> {name: float}, training
    synthetic: Mapping[str, Any] = field(default_factory=dict)  # write_synthetic defaults
    synthetic_version: int = 1  # raise when write_synthetic's output changes (cache key)
    eval_split: str = "test"  # the split evaluated after every epoch
    # scored once at the end with the best epoch's weights (the authors' AVVP protocol: pick
    # the epoch on eval_split, report test_split); None: the eval split is the report
    test_split: Optional[str] = None
    # seconds per clip of the tiny preset on a quiet 2-core CPU, for the expected time
    tiny_cpu_seconds: Mapping[str, float] = field(default_factory=dict)
    head_key_map: Callable[[str], str] = _same_key  # our head key -> the authors'

    @property
    def built(self) -> bool:
        return None not in (self.head, self.model, self.loss, self.dataset, self.evaluator)

    def preset(self, preset: str | ModelPreset) -> ModelPreset:
        """A preset by name (case-insensitive), or a ModelPreset as given."""
        if isinstance(preset, ModelPreset):
            return preset
        key = preset.lower() if isinstance(preset, str) else preset
        if key not in self.presets:
            raise ValueError(f"preset={preset!r}: task {self.name!r} has presets "
                             f"{sorted(self.presets)}, or pass a ModelPreset")
        return self.presets[key]

    def training_defaults(self, preset: str | ModelPreset) -> dict[str, Any]:
        name = preset.name if isinstance(preset, ModelPreset) else str(preset).lower()
        if name not in self.training:
            raise ValueError(f"preset={preset!r}: task {self.name!r} has training defaults for "
                             f"{sorted(self.training)}")
        return dict(self.training[name])


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add (or, for the same name, replace) a task."""
    if task.name != task.name.lower():
        raise ValueError(f"Task name {task.name!r}: expected lower case (names are case-insensitive)")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"task={name!r}: unknown; expected one of {task_names()} "
                         f"(built: {task_names(built=True)})")
    return _REGISTRY[name.lower()]


def task_names(built: Optional[bool] = None) -> list[str]:
    """Registered task names; `built=True` only those with a model here."""
    return sorted(n for n, t in _REGISTRY.items() if built is None or t.built == built)


# The authors' AVE training (their train.sh): batch 8, gradients over 2 batches, Adam lr
# 5e-4, StepLR(3 epochs, 0.35), 50 epochs, early stop after 20 epochs without improvement,
# seed 43. The tiny preset is sized to learn the synthetic set in well under a minute.
AVE_TRAINING = {
    "paper": {"batch_size": 8, "accum_steps": 2, "lr": 5e-4, "decay": 0.35, "decay_epochs": 3,
              "epochs": 50, "early_stop": 20, "seed": 43, "num_workers": 16},
    "tiny": {"batch_size": 4, "accum_steps": 1, "lr": 2e-3, "decay": 0.5, "decay_epochs": 4,
             "epochs": 10, "early_stop": 0, "seed": 0, "num_workers": 0},
}


def _ave_head(modules: TaskModules, preset: ModelPreset) -> nn.Module:
    from .heads.ave import AVEHead
    return AVEHead(gate_weight=modules.gate_weight, **preset.head)


def _ave_model(*args, **kwargs) -> nn.Module:
    from .ave import AVEModel
    return AVEModel(*args, **kwargs)


def _ave_loss(outputs, batch):
    from .heads.ave import ave_loss
    return ave_loss(outputs, batch["labels"])


def _ave_dataset(root, split, **options):
    from ..data.ave import AVEDataset
    return AVEDataset(root, split, **options)


def _ave_synthetic(root, **options):
    from ..data.ave import write_synthetic_ave
    return write_synthetic_ave(root, **options)


class AVEEvaluator:
    """Segment accuracy over a split, next to the all-background baseline."""

    def __init__(self) -> None:
        self.correct = self.background = self.total = 0

    def add(self, outputs, batch) -> None:
        from ..data.ave import BACKGROUND, segment_predictions
        target = batch["labels"].argmax(dim=-1)
        pred = segment_predictions(outputs["is_event"].float(), outputs["event"].float())
        self.correct += int(pred.eq(target).sum())
        self.background += int(target.eq(BACKGROUND).sum())
        self.total += target.numel()

    def merge(self, other: "AVEEvaluator") -> None:
        self.correct += other.correct
        self.background += other.background
        self.total += other.total

    def result(self) -> dict[str, float]:
        total = max(self.total, 1)
        return {"acc": 100.0 * self.correct / total, "background_acc": 100.0 * self.background / total,
                "segments": self.total}


def _ave_batch_accuracy(outputs, batch) -> dict[str, float]:
    from ..data.ave import segment_accuracy
    return {"acc": segment_accuracy(outputs["is_event"].detach().float(),
                                    outputs["event"].detach().float(), batch["labels"])}


def _ave_describe(result) -> str:
    return (f"accuracy {result['acc']:.2f}% (all-background baseline "
            f"{result['background_acc']:.2f}%)")


register_task(Task(
    "ave", TASKS["ave"], presets={"paper": PAPER, "tiny": TINY}, training=AVE_TRAINING,
    head=_ave_head, model=_ave_model, loss=_ave_loss, dataset=_ave_dataset,
    write_synthetic=_ave_synthetic, evaluator=AVEEvaluator, score="acc",
    describe=_ave_describe, batch_metrics=_ave_batch_accuracy,
    synthetic={"videos_per_split": (32, 8, 16), "num_classes": 4, "image_size": 64, "seed": 0},
    # one training step's share per clip (forward, backward, Adam), one evaluation forward's,
    # and start-up (imports, model, synthetic set); AMD EPYC, torch 2.14, 2 threads. The
    # default run measured 36-40 s in all (benchmarks/NOTES.md, issue 11).
    tiny_cpu_seconds={"train_clip": 0.09, "eval_clip": 0.04, "setup": 6.0},
))
# AVVP: the authors' train.sh and main.py: batch 8, Adam lr 3e-4, StepLR(10 epochs, x0.1),
# 40 epochs, seed 1, the best epoch by segment-level Type@AV on the val split. Their
# AudioSet-backbone mixup is not reproduced.
AVVP_TRAINING = {
    "paper": {"batch_size": 8, "accum_steps": 1, "lr": 3e-4, "decay": 0.1, "decay_epochs": 10,
              "epochs": 40, "early_stop": 0, "seed": 1, "num_workers": 16},
    # tiny: sized on the synthetic set below (issue 12, benchmarks/NOTES.md). With 40 or 100
    # train clips the head memorised them; val loss stops improving after about 8 epochs.
    # Encoders in eval mode: with random-init encoders SpecAugment's stripes and DropPath
    # hide the events the weak labels name, and the video-level gate never learns.
    "tiny": {"batch_size": 4, "accum_steps": 1, "lr": 2e-3, "decay": 0.5, "decay_epochs": 4,
             "epochs": 8, "early_stop": 0, "seed": 0, "num_workers": 0,
             "encoders_eval": True},
}
AVVP_PRESETS = {
    # the MGN head's defaults are the paper's (dim 128, d_model 64, depths 3/3/6)
    "paper": replace(PAPER, head={"visual_dim": 1536, "audio_dim": 768}),
    "tiny": replace(TINY, head={"visual_dim": 128, "audio_dim": 128, "dim": 32, "d_model": 32,
                                "temporal_ff_dim": 64, "depth_aud": 1, "depth_vis": 1,
                                "depth_av": 2, "num_heads": 4,
                                # random class tokens: the authors' zeros need ~300 steps of
                                # class-token loss before the groups differ (NOTES.md)
                                "token_init_std": 0.02}),
}


def _avvp_head(modules: TaskModules, preset: ModelPreset) -> nn.Module:
    from .heads.avvp import AVVPHead
    return AVVPHead(gate_weight=modules.gate_weight, num_segments=modules.segments, **preset.head)


def _avvp_model(*args, **kwargs) -> nn.Module:
    from .avvp import AVVPModel
    return AVVPModel(*args, **kwargs)


def _avvp_loss(outputs, batch):
    from .heads.avvp import avvp_loss
    return avvp_loss(outputs, batch["labels"])


def _avvp_dataset(root, split, **options):
    from ..data.avvp import AVVPDataset
    return AVVPDataset(root, split, **options)


def _avvp_synthetic(root, **options):
    from ..data.avvp import write_synthetic_avvp
    return write_synthetic_avvp(root, **options)


def _avvp_evaluator():
    from .avvp import AVVPEvaluator
    return AVVPEvaluator()


def _avvp_describe(result) -> str:
    from .avvp import describe
    return describe(result)


register_task(Task(
    "avvp", TASKS["avvp"], presets=AVVP_PRESETS, training=AVVP_TRAINING,
    head=_avvp_head, model=_avvp_model, loss=_avvp_loss, dataset=_avvp_dataset,
    write_synthetic=_avvp_synthetic, evaluator=_avvp_evaluator, score="segment_type",
    describe=_avvp_describe, eval_split="val", test_split="test",
    synthetic={"videos_per_split": (400, 100, 100), "num_classes": 5, "image_size": 64,
               "max_events": 2, "seed": 0},
    # 2: tones spread over the mel bands, half the events audio-visual; 3: 400/100/100 clips,
    # at most 2 events per video
    synthetic_version=3,
    # per clip and epoch on a quiet 2-core CPU (AMD EPYC, torch 2.14, 2 threads, the cpu
    # backend's products on oneDNN): 36 s an epoch, 5.0 min a default run (issue 12); see
    # the AVE entry for the meaning
    tiny_cpu_seconds={"train_clip": 0.08, "eval_clip": 0.04, "setup": 8.0},
))
for _name, _modules in TASKS.items():  # SPEC.md's other tasks: settings only, so far
    if _name not in _REGISTRY:
        register_task(Task(_name, _modules))
