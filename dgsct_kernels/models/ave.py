"""The AVE model: the shared task model (two-stream encoder with DG-SCT modules, pooled per
segment) with the AVE head (temporal attention + CMBS). Build it with
`build_dgsct(task="ave", ...)`."""
from __future__ import annotations

from .task_model import TaskModel


class AVEModel(TaskModel):
    """`model(frames=[B, T, 3, S, S], audio=[B, T, samples])` -> dict of outputs:

      is_event      [B, T]       per-segment event logits
      event         [B, classes] clip class logits
      av_score, gate             the head's other outputs (see AVEHead)
      features      {"visual": [B, T, Cv], "audio": [B, T, Ca]}  pooled encoder outputs
      spatial_maps  {"visual": [B, T, H, W], "audio": [B, T, h, w]}  last p2 modules' maps
    """
