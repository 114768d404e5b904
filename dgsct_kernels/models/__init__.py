"""The model layer: two frozen encoders with DG-SCT modules between their blocks, task heads,
presets and checkpoints.

    from dgsct_kernels.models import build_dgsct
    model = build_dgsct(task="ave", preset="tiny")          # or preset="paper", weights=...
    out = model(frames=frames, audio=audio)                  # [B, T, 3, S, S], [B, T, samples]
    out["is_event"], out["event"], out["spatial_maps"]
"""
from .ave import AVEModel
from .checkpoints import (
    CheckpointError,
    LoadReport,
    load_authors_checkpoint,
    load_trainable,
    save_trainable,
    trainable_state_dict,
)
from .presets import PRESETS, TASKS, ModelPreset, TaskModules, build_dgsct
from .registry import Task, get_task, register_task, task_names
from .two_stream import TwoStreamEncoder, count_modules, pair_blocks

__all__ = [
    "PRESETS",
    "TASKS",
    "AVEModel",
    "CheckpointError",
    "LoadReport",
    "ModelPreset",
    "Task",
    "TaskModules",
    "TwoStreamEncoder",
    "build_dgsct",
    "count_modules",
    "get_task",
    "load_authors_checkpoint",
    "load_trainable",
    "pair_blocks",
    "register_task",
    "save_trainable",
    "task_names",
    "trainable_state_dict",
]
