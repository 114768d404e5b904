"""The GPU kernels' ahead-of-time compile report (python/compile_report.py), without a GPU.

The report must run with real Triton code generation, so it runs in a subprocess without
TRITON_INTERPRET (this test session defines its kernels under the interpreter).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "python" / "compile_report.py"
sys.path.insert(0, str(REPORT.parent))


def _compiler_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(REPORT.parent), env.get("PYTHONPATH", "")])
    return env


def test_problems_name_every_failed_condition():
    from compile_report import Row, parse_ptxas

    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
           "    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 48 bytes cumulative stack size\n")
    usage = parse_ptxas(log)
    assert usage == {"registers": 255, "stack": 48, "spill_stores": 40, "spill_loads": 36}
    row = Row("triton", 89, "k", "", "float32", shared=120_000, shared_limit=101_376, has_products=True,
              tensor_core_ops=0, **usage)
    assert row.problems == ["spills 40/36 B", "stack 48 B", "shared 120000 B > 101376 B",
                            "products without tensor cores"]
    clean = Row("triton", 90, "k", "", "bfloat16", registers=128, spill_stores=0, spill_loads=0, stack=0,
                shared=1024, shared_limit=232_448, has_products=True, tensor_core_ops=8)
    assert clean.problems == []
    assert Row("nvcc", 80, "k", "", "", error="boom").problems == ["compile error"]


def test_cuda_kernels_are_named_from_their_mangled_names():
    from compile_report import kernel_name

    prefix = "_ZN5dgsct4cuda43_GLOBAL__N__618bbb7b_10_kernels_cu_e8b2379e"
    assert kernel_name(prefix + "13output_kernelI6__halfEEvNS0_8TileArgsE") == "output_kernel"
    assert kernel_name(prefix + "14moments_kernelENS0_8TileArgsE") == "moments_kernel"


def test_report_catches_fma_products_and_spills_in_real_compiles(tmp_path):
    """A float32 "ieee" dot compiles to FMA loops, and a [128, 128] accumulator in one warp
    spills: compiled for sm_90 through the report's stand-in driver, both are flagged."""
    script = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from compile_report import Row, compile_only, count_tensor_core_ops, find_tools, parse_ptxas

        @triton.jit
        def fma_dot(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
            i = tl.arange(0, BLOCK)
            a = tl.load(a_ptr + i[:, None] * BLOCK + i[None, :])
            b = tl.load(b_ptr + i[:, None] * BLOCK + i[None, :])
            tl.store(c_ptr + i[:, None] * BLOCK + i[None, :], tl.dot(a, b, input_precision=PRECISION))

        tools, rows = find_tools(), []
        def record(fn, kernel, seconds, log):
            rows.append(Row("triton", 90, fn.__name__, "", "float32", has_products=True,
                            shared=kernel.metadata.shared, shared_limit=232448,
                            tensor_core_ops=count_tensor_core_ops(kernel.asm["cubin"], tools), **parse_ptxas(log)))
        t = torch.empty(128, 128, device="meta")
        with compile_only(90, record):
            fma_dot[(1,)](t, t, t, BLOCK=32, PRECISION="ieee")
            fma_dot[(1,)](t, t, t, BLOCK=32, PRECISION="tf32x3")
            fma_dot[(1,)](t, t, t, BLOCK=128, PRECISION="tf32", num_warps=1)
        for row in rows:
            print(row.tensor_core_ops, row.spill_stores, "|".join(row.problems))
    """)
    probe = tmp_path / "probe.py"  # Triton reads a kernel's source from its file
    probe.write_text(script)
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=_compiler_env(),
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    ieee, split, spilling = done.stdout.strip().splitlines()[-3:]
    assert ieee.split()[0] == "0" and "products without tensor cores" in ieee, ieee
    assert int(split.split()[0]) > 0 and split.split()[1] == "0" and split.split()[2:] == [], split
    assert "spills" in spilling, spilling


@pytest.mark.slow
def test_ci_subset_of_the_compile_report_is_clean(tmp_path):
    """Issue 10's CI gate: s1-visual and s4-visual, bf16 and fp32, training, forward and
    backward, sm_80 and sm_90, plus csrc/cuda through nvcc: no compile error, no spill,
    tensor cores in every product kernel, shared memory within the limits."""
    command = [sys.executable, str(REPORT), "--subset", "ci", "--out", str(tmp_path), "--quiet"]
    if shutil.which("nvcc") is None:
        if os.environ.get("DGSCT_REQUIRE_CUDA_EXTENSION") == "1":
            pytest.fail("nvcc is not on PATH, but this run requires the CUDA part (DGSCT_REQUIRE_CUDA_EXTENSION=1)")
        command.append("--no-cuda")
    done = subprocess.run(command, capture_output=True, text=True, env=_compiler_env(), cwd=ROOT, timeout=1200)
    report = (tmp_path / "report.txt").read_text() if (tmp_path / "report.txt").exists() else ""
    assert done.returncode == 0, f"{report}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert (tmp_path / "report.csv").exists() and (tmp_path / "report.json").exists()
