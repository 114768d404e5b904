"""The cpu backend's float32 products: the library that runs them (oneDNN where it beats the
BLAS torch links, csrc/cpu/products.h), its product against float64, and the whole op held to
the parity rule under each library (a process picks its library once, so each runs in its own
process with DGSCT_CPU_GEMM set)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgsct_kernels import _extension
from _support import assert_close

pytestmark = pytest.mark.skipif(_extension._C is None, reason="the cpu extension is not built")
TESTS = Path(__file__).resolve().parent


def test_provider_is_named_with_a_reason():
    name, reason = _extension._C.cpu_gemm_provider()
    assert name in ("onednn", "blas") and reason
    from dgsct_kernels.info import report
    assert "cpu float32 products: " in report()


@pytest.mark.parametrize("shapes", [((96, 80), (80, 72)), ((3, 70, 64), (3, 64, 90)), ((4, 33, 96), (96, 70)),
                                    ((70, 64), (3, 64, 90)), ((5, 7), (7, 3)), ((2, 4, 6), (6,))],
                         ids=["2d", "batched", "3d-by-2d", "2d-by-3d", "small", "matrix-vector"])
@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "transposed"])
def test_cpu_matmul_matches_float64(shapes, transposed):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(*shapes[0], generator=generator)
    b = torch.randn(*shapes[1], generator=generator)
    if transposed and b.dim() >= 2:  # a transposed view, as the op passes W^T
        b = b.transpose(-1, -2).contiguous().transpose(-1, -2)
    expected = torch.matmul(a.double(), b.double())
    got = _extension._C.cpu_matmul(a, b)
    assert got.dtype == torch.float32
    assert_close(got, expected, 1e-5, f"cpu_matmul {shapes}")
    assert _extension._C.cpu_matmul(a.double(), b.double()).dtype == torch.float64  # other dtypes: ATen


_PARITY = """
import sys, torch
sys.path.insert(0, {tests!r})
from _support import Case
import test_backend_parity as parity
from dgsct_kernels._extension import _C
name, reason = _C.cpu_gemm_provider()
if name != {want!r}:
    print("SKIP", reason); sys.exit(0)
case = Case(frames=2, tokens=256, dim=96, guide_tokens=128, guide_dim=64, num_latents=8, reduction=4, segments=2)
for training in (True, False):
    parity._check_gradients("cpu", torch.float32, training, case)
print("OK", reason)
"""


@pytest.mark.parametrize("provider", ["onednn", "blas"])
def test_op_meets_the_parity_rule_with_each_library(provider):
    # products above products.h's kOneDnnMinWork, so the tiles and the guide path use the library
    env = dict(os.environ, DGSCT_CPU_GEMM=provider)
    done = subprocess.run([sys.executable, "-c", _PARITY.format(tests=str(TESTS), want=provider)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    if done.stdout.startswith("SKIP"):
        pytest.skip(f"{provider} not usable here: {done.stdout[5:].strip()}")
    assert done.stdout.startswith("OK"), done.stdout


def test_unknown_library_is_refused_by_name():
    env = dict(os.environ, DGSCT_CPU_GEMM="mkl")
    done = subprocess.run([sys.executable, "-c", "from dgsct_kernels._extension import _C; _C.cpu_gemm_provider()"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "DGSCT_CPU_GEMM=mkl: expected auto, blas or onednn" in done.stderr


@pytest.mark.parametrize("order", ["rewritten", "tokens-first"])
def test_cpu_guide_path_alone_matches_the_reference(order):
    # what benchmarks/run.py times as the cpu backend's guide path
    from dgsct_kernels.guide_path import prompts_and_pooled_guide
    generator = torch.Generator().manual_seed(1)
    F, N, M, D, C, K = 3, 96, 80, 48, 64, 8
    p = {"conv_adapter.weight": torch.randn(N, M, 1, 1, generator=generator) / M ** 0.5,
         "conv_adapter.bias": torch.randn(N, generator=generator),
         "fc.weight": torch.randn(C, D, generator=generator) / D ** 0.5,
         "fc.bias": torch.randn(C, generator=generator),
         "my_tokens": torch.rand(K, C, generator=generator)}
    g = torch.randn(F, M, D, generator=generator)
    want_R, want_a = prompts_and_pooled_guide(g.double(), {k: v.double() for k, v in p.items()}, order)
    R, a = _extension._C.cpu_guide_forward(g, *p.values(), order)
    assert_close(R, want_R, 1e-5, f"cpu guide R ({order})")
    assert_close(a, want_a, 1e-5, f"cpu guide a ({order})")
