"""The Triton passes' multi-block paths: several hidden, channel and token blocks per program.

The parity tests' shapes fit in one block of each axis at the tiles tiling.py chooses, so
here every block is forced to its minimum of 16 (tl.dot's least), which at H/G = 32 gives
2 hidden blocks, a 2 x 2 grid of the moments pass and several channel and token blocks.
"""
import pytest
import torch

from dgsct_kernels.backends.triton import tiling

from _support import Case
import test_backend_parity as parity

SMALLEST = {"BN": 16, "BK": 16, "BO": 16, "BH": 16, "BM": 16, "BD": 16}


@pytest.fixture
def smallest_tiles(monkeypatch):
    for name, choose in list(tiling._CHOOSERS.items()):
        smallest = (lambda choose: lambda s, d, a: {k: SMALLEST.get(k, v) for k, v in choose(s, d, a).items()})(choose)
        monkeypatch.setitem(tiling._CHOOSERS, name, smallest)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_gradient_with_several_blocks_per_axis(smallest_tiles, training):
    case = Case(frames=2, tokens=40, dim=64, guide_tokens=24, guide_dim=20, num_latents=8, reduction=1)
    parity._check_gradients("triton", torch.float32, training, case)
