"""The Triton backend's plan report at the paper's AVE shapes (no kernel runs here)."""
import sys
from pathlib import Path

import pytest
import torch

from dgsct_kernels.dispatch import get_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes import AVE_SHAPES, cost  # noqa: E402

FRAMES = 80  # the paper's training batch: B = 8 clips of T = 10 segments


def _plan(shape, training):
    return get_backend("triton").plan(FRAMES, shape.dims(), torch.bfloat16, training, True, True, True)


@pytest.mark.parametrize("shape", AVE_SHAPES, ids=lambda s: s.label)
def test_guide_path_runs_the_cheapest_association(shape):
    plan = _plan(shape, training=False)
    assert plan.guide_flops[plan.guide_order] == min(plan.guide_flops.values()), plan.guide_flops
    guide_flops = sum(k.flops for k in plan.launches if k.name.startswith("guide"))
    assert guide_flops == plan.guide_flops[plan.guide_order]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", AVE_SHAPES, ids=lambda s: s.label)
def test_forward_writes_no_token_sized_intermediate(shape, training):
    """The only [F, N, C] tensor written is o itself (no x1, qv1, xc, qv2 or xm)."""
    plan = _plan(shape, training)
    d = shape.dims()
    written = [(k.name, name, shp) for k in plan.launches for name, (shp, _) in k.writes.items()]
    token_sized = [w for w in written if w[2] == (FRAMES, d.tokens, d.dim)]
    assert token_sized == [("output_pass", "o", (FRAMES, d.tokens, d.dim))], written
    assert [k.name for k in plan.launches].count("moments_pass") == int(training)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", AVE_SHAPES, ids=lambda s: s.label)
def test_bytes_stay_within_the_current_design(shape, training):
    """A regression guard at today's design (2.3x-3.3x the floor); SPEC's 1.6x (eval) and
    2x (training) targets are not met yet, see benchmarks/NOTES.md."""
    plan = _plan(shape, training)
    ratio = plan.bytes_moved / cost(shape, FRAMES, 2).floor_bytes
    assert ratio <= 3.5, plan.report()
