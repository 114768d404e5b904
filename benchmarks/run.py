"""Time DG-SCT: the eager reference, its torch.compile, and every backend that can run the call.

    python benchmarks/run.py                       # this machine's defaults (CPU: ~1 min)
    python benchmarks/run.py --full                # CPU: s1+s2, 10 repeats, compile everywhere
    python benchmarks/run.py --shapes tiny --repeats 1 --warmup 0 --no-compile

On a CPU the default is a quick run, under a minute on 2 quiet cores: the stage-2 pair of
shapes, 5 timed calls after 1 warm-up, and torch.compile on the first shape only, because
each torch.compile warm-up costs 7-16 s there (15-50 s on a busy machine). `--full` runs the
full comparison (s1 and s2, 10 timed calls after 2 warm-ups, torch.compile on every shape:
about 4 minutes on 2 quiet cores); explicit --shapes, --repeats, --warmup and
--compile-shapes override either. On a GPU the default is the full run. When other
processes keep CPU cores busy, a CPU run times on the free cores only (--threads overrides),
because a torch thread sharing a busy core stalls the others. The runner prints what it will
do and an estimate of how long at the start, how long it took at the end, and a legend of
the table's columns.

For each shape and mode it times
  eager    `reference_forward` with autograd (what the authors' module costs),
  compile  `torch.compile` of that same function,
  <name>   `FusedDGSCT(backend=name)` for every registered backend that supports the call
           (found at run time), carrying the same parameters.
Modes: `eval-fwd` (eval, no grad) and `train-fwd+bwd` (training forward, then the gradients
of all three outputs w.r.t. x, g and every parameter). For fwd+bwd it also counts the bytes
autograd keeps for the backward. Each contender's outputs must match eager's before its time
counts. Results go to stdout (a table) and to --out: results.csv, results.json, results.png.
On a GPU, eval rows of the GPU backends also carry `roofline_ms`, the forward's floor from
its bytes and FLOPs at the H100/H200 peak figures (dgsct_kernels/roofline.py), and
`vs_roofline`, the measured time over that floor ("x roofline" in the table).
The runner samples how many cores other processes keep busy before, between and after
the cases; on a CPU above 0.5 cores it marks the printed output, results.json and the plot.

Efficiency: once per run, before the cases and with the run's threads, it measures the
device's GEMM rate: torch.matmul over the guide-path products (benchmarks/shapes.py,
`guide_products`) of every selected shape, in the orders the contenders run, in float32,
bfloat16, float16 where the device multiplies it natively, and the run's dtype. Every row
then carries the FLOPs and achieved GFLOP/s of its call and of its guide path (timed apart,
as the contender runs it, where that can be reproduced; otherwise empty with the reason in
`guide_unmeasured_reason`) and their fractions of that rate. results.json's header holds
`columns` (what each row field means), `gemm_gflops_by_products` (every rate measured, by
dtype, shape and order) and `gemm_unmeasured` (the dtypes not measured and why).
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the slow imports (torch, triton): the whole run's clock

import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

import dgsct_kernels
from dgsct_kernels import dispatch
from dgsct_kernels.config import OP_PARAM_NAMES, accumulation_dtype
from dgsct_kernels.cpu_load import busy_cores, threads_beside
from dgsct_kernels.guide_path import plan_guide_path, prompts_and_pooled_guide
from dgsct_kernels.reference import guide_as_written, reference_forward
from dgsct_kernels.roofline import peaks_for, total_seconds
from shapes import (GROUPS, NUM_LATENTS, REDUCTION, SEGMENTS, TRAIN_FLOPS_OVER_FORWARD, Product, Shape,
                    call_flops, cost, guide_flops, guide_products, select_shapes)

MODES = ("eval-fwd", "train-fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# max|contender - eager| / max|eager| allowed per output. This guard catches wrong results,
# not precision (the tests own that): both sides carry the dtype's error, and plain bf16
# eager alone is ~3e-2 off float64, so low precision gets 5x SPEC.md's tolerance.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}
OUTPUT_NAMES = ("residual", "spatial_map", "temporal_gate")
DTYPE_TAGS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# Every field of a row (results.csv's columns, in order; results.json's rows): what it holds.
# Empty in the CSV and null in the JSON where not measured for that row.
COLUMNS = {
    "device": "torch device the run timed on",
    "device_name": "GPU name, or the CPU model",
    "torch": "torch version",
    "triton": "triton version, or empty",
    "date": "when the run started",
    "backend": "the contender: eager, compile or a FusedDGSCT backend (see the table legend)",
    "shape": "label of the module's sizes (benchmarks/shapes.py)",
    "N": "target tokens", "C": "target channels", "M": "guide tokens", "D": "guide channels",
    "F": "frames per call",
    "dtype": "dtype of x, g and the parameters",
    "mode": "eval-fwd or train-fwd+bwd",
    "median_ms": "median wall time of one call, ms",
    "p10_ms": "10th percentile of the call times, ms",
    "p90_ms": "90th percentile of the call times, ms",
    "repeats": "timed calls",
    "speedup_vs_eager": "eager's median_ms over this row's",
    "saved_bytes": "train: bytes autograd keeps for the backward, once per storage",
    "saved_over_x": "train: saved_bytes over the bytes of x",
    "saved_activation_bytes": "train: the part of saved_bytes that is neither an input nor a parameter",
    "floor_bytes": "SPEC.md's floor: read x, g and every weight once, write o once, bytes",
    "plan_bytes": "eval, backends with a plan report: the forward's DRAM bytes by that plan",
    "achieved_gbps": "plan_bytes over median_ms, GB/s",
    "vs_bandwidth_floor": "eval: median_ms over floor_bytes' time at the measured copy bandwidth",
    "roofline_ms": "eval, GPU backends on CUDA: the forward's roofline floor, ms",
    "vs_roofline": "median_ms over roofline_ms",
    **{f"gemm_gflops_{tag}": f"the device's GEMM rate in {dtype_name}, GFLOP/s: the best over the run's "
                             "guide-path product sets (torch.matmul back to back, median of 5 after 1 "
                             "warm-up, with the run's threads); empty where not measured"
       for dtype_name, tag in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"),
                               ("float64 (float64 runs only)", "fp64"))},
    "call_flops": "matrix-product FLOPs of one call: steps 1-9 of SPEC.md with the guide path in "
                  "guide_order; fwd+bwd is 3x the forward's (2 backward products per forward product; "
                  "recomputation not counted)",
    "call_gflops": "call_flops over median_ms, GFLOP/s",
    "call_fraction_of_gemm": "call_gflops over the GEMM rate in the run's dtype (gemm_gflops_<dtype>): "
                             "how close the whole call comes to the device's matrix-product limit",
    "guide_order": "the order the contender evaluates steps 1, 2 and 4 in (dgsct_kernels/guide_path.py): "
                   "as-written forms P like the authors' module; the fused backends run plan_guide_path's",
    "guide_dtype": "dtype the guide path multiplies in (backends upcast bf16/fp16 to float32)",
    "guide_flops": "matrix-product FLOPs of the guide path in guide_order (shapes.guide_products); "
                   "fwd+bwd 3x",
    "guide_ms": "median time of the contender's guide path timed apart, ms: the same products in the same "
                "order and dtype from Python (guide_path.prompts_and_pooled_guide, or reference_forward's "
                "as-written steps), g's upcast included; fwd+bwd (eager only) adds its autograd backward",
    "guide_gflops": "guide_flops over guide_ms, GFLOP/s",
    "guide_gemm_gflops": "GEMM rate of this shape's guide_order products alone in guide_dtype, GFLOP/s",
    "guide_fraction_of_gemm": "guide_gflops over guide_gemm_gflops: the guide path's speed against the "
                              "device's GEMM on the very same products",
    "guide_unmeasured_reason": "why guide_ms (and the columns from it) is empty for this row",
}
GEMM_COLUMNS = tuple(f"gemm_gflops_{tag}" for tag in DTYPE_TAGS.values())
GUIDE_PARAM_NAMES = ("conv_adapter.weight", "conv_adapter.bias", "fc.weight", "fc.bias", "my_tokens")
# How each contender runs its guide path: the order ("planned": plan_guide_path's), whether its
# products run in the accumulation dtype, and why it cannot be timed apart (None: it can).
GUIDE_PATHS = {
    "eager": ("as-written", False, None),
    "compile": ("as-written", False, "torch.compile fuses the guide path into the rest of its graph"),
    "reference": ("as-written", True, None),
    "cpu": ("planned", True, None),  # csrc/cpu/guide_path.cpp, timed through _C.cpu_guide_forward
    "cuda": ("planned", True, None),  # the same guide_forward in float32 (csrc/cuda/portable/driver.cpp)
    "triton": ("planned", True, None),  # prompts_and_pooled_guide, but see guide_path_of
}
GEMM_REPEATS, GEMM_WARMUP = 5, 1

Outputs = tuple[Tensor, Tensor, Tensor]  # residual [F, N, C], spatial_map [F, N], temporal_gate [F]

# Defaults per device and run size: shapes, timed calls, warm-up calls, shapes that also time
# torch.compile (None: every selected shape; "first": the first selected shape only).
QUICK_CPU = {"shapes": "s2", "repeats": 5, "warmup": 1, "compile_shapes": "first"}
FULL_CPU = {"shapes": "s1,s2", "repeats": 10, "warmup": 2, "compile_shapes": None}
FULL_CUDA = {"shapes": "all", "repeats": 50, "warmup": 10, "compile_shapes": None}
# Other processes keeping more than this many cores busy mark the run as unreliable: on a
# shared CPU every OpenMP region waits for its descheduled thread.
BUSY_CORES_LIMIT = 0.5
# Seconds of one cold-cache torch.compile warm-up (the first call compiles the forward, in
# training also the backward): eval 7-16 s, training 13-16 s at the s1 and s2 shapes on a
# quiet 2-core AMD EPYC (benchmarks/NOTES.md, issue 11), 19-22 s with one core busy. GPU figures
# are guesses of the same order; max-autotune modes also benchmark many kernel choices.
COMPILE_WARMUP_S = {("cpu", False): 12.0, ("cpu", True): 16.0,
                    ("cuda", False): 20.0, ("cuda", True): 40.0}
AUTOTUNE_FACTOR = 4.0
# Eager runs the matrix products at about this fraction of the measured GEMM rate (2 CPU
# cores: 180-230 of 250 GFLOP/s).
EAGER_MATMUL_EFFICIENCY = 0.7
# Per case: building modules, checking outputs, counting saved tensors, a busy-cores sample.
CASE_OVERHEAD_S = 1.5
# What each column of the printed table means, in its order.
TABLE_LEGEND = {
    "shape": "the module's sizes from benchmarks/shapes.py: sK-visual is stage K's visual module "
             "(guided by audio), sK-audio the audio one (guided by vision); F frames per call",
    "mode": "eval-fwd: eval forward without autograd; train-fwd+bwd: training forward, then the "
            "gradients of all three outputs w.r.t. x, g and every parameter",
    "backend": "eager: reference_forward under autograd (what the authors' module costs); compile: "
               "torch.compile of it; any other name: FusedDGSCT(backend=name)",
    "median ms": "median wall time of one call over the timed calls",
    "p10-p90 ms": "10th and 90th percentile of those times (their spread)",
    "vs eager": "eager's median over this row's median: above 1.00x is faster than eager",
    "saved MB": "train only: bytes autograd keeps from one forward for the backward, counted once "
                "per storage (inputs and weights included)",
    "saved/x": "train only: saved MB over the bytes of x",
    "activ. MB": "train only: the part of saved MB that is neither an input nor a parameter",
    "x floor": "eval only: median over the time a plain device copy of the floor's bytes takes "
               "(read x, g and the weights once, write o once) at the measured copy bandwidth; "
               "1.00 would be a purely memory-bound call at copy speed",
    "GB/s": "eval only, backends with a plan report: the plan's DRAM bytes over the median",
    "x roofline": "eval only, GPU backends on CUDA: median over the roofline floor from the plan's "
                  "bytes and FLOPs at the GPU's peak figures (dgsct_kernels/roofline.py)",
    "GFLOP/s": "the call's matrix-product FLOPs (its guide order; fwd+bwd 3x the forward's, "
               "recomputation not counted) over the median",
    "of gemm": "that rate over the GEMM rate measured in the run's dtype (printed below the table)",
    "guide GFLOP/s": "the guide path (steps 1, 2, 4) timed apart as the contender runs it: its FLOPs "
                     "over its median; '-' where it cannot be timed apart (reason in results.json)",
    "guide of gemm": "that rate over the GEMM rate of the same products in the guide's dtype",
}


@dataclass
class Contender:
    """One way to compute the operator: its forward and the tensors it differentiates."""

    name: str
    forward: Callable[[], Outputs]
    wrt: list[Tensor]  # x, g and the parameters it reads, for the fwd+bwd mode
    own: list[Tensor]  # inputs and parameters: saved tensors that are not activations


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device",
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--frames", type=int, help=f"F, a multiple of segments={SEGMENTS} "
                        "(default: 10 on cpu, 80 on cuda, the paper's training batch)")
    parser.add_argument("--full", action="store_true",
                        help="the full comparison on a CPU too: shapes s1,s2, 10 timed calls after "
                             "2 warm-ups, torch.compile on every shape (about 4 min on 2 quiet "
                             "cores); a GPU run is full by default")
    parser.add_argument("--shapes", help="comma-separated labels or sets: all, tiny, s1..s4 "
                        "(default: s2 on cpu, s1,s2 with --full, all on cuda)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated from {list(MODES)}")
    parser.add_argument("--repeats", type=int,
                        help="timed calls (default: 5 on cpu, 10 with --full, 50 on cuda)")
    parser.add_argument("--warmup", type=int, help="untimed calls after the first "
                        "(default: 1 on cpu, 2 with --full, 10 on cuda)")
    parser.add_argument("--compile-shapes", metavar="SHAPES",
                        help="the shapes whose cases also time torch.compile: 'all' (every "
                             "selected shape) or labels and sets among --shapes (default: the "
                             "first selected shape on cpu, all with --full and on cuda)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: benchmarks/out/<date>-<device>)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds (the first always runs); "
                             "rows are written after every case, so a cut-off run leaves results")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile baseline")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default on cpu: one per core that other "
                             "processes do not keep busy at the start, at most torch's default); "
                             "1 keeps timings stable when other processes share the cores")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # relative to the repository, so committed results carry no machine paths
    args.command = shlex.join(["python", "benchmarks/run.py", *argv])

    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        parser.error(f"--device={args.device!r}: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device={args.device}: CUDA is not available on this machine")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device={args.device}: expected cpu or cuda")
    on_cuda = args.device.type == "cuda"
    defaults = FULL_CUDA if on_cuda else FULL_CPU if args.full else QUICK_CPU
    args.run_size = "quick" if defaults is QUICK_CPU else "full"
    args.dtype = DTYPES[args.dtype]
    args.frames = args.frames if args.frames is not None else (80 if on_cuda else 10)
    if args.frames < 1 or args.frames % SEGMENTS:
        parser.error(f"--frames={args.frames}: expected a positive multiple of segments={SEGMENTS}")
    try:
        args.shapes = select_shapes(args.shapes or defaults["shapes"])
    except ValueError as error:
        parser.error(str(error))
    args.compile_shapes = compile_shapes(parser, args, defaults["compile_shapes"])
    args.modes = [m.strip() for m in args.modes.split(",")]
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"--modes: unknown mode {mode!r}; expected some of {list(MODES)}")
    args.repeats = args.repeats if args.repeats is not None else defaults["repeats"]
    args.warmup = args.warmup if args.warmup is not None else defaults["warmup"]
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: expected at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup}: expected 0 or more")
    if args.time_budget is not None and not args.time_budget >= 0:
        parser.error(f"--time-budget={args.time_budget}: expected 0 or more seconds")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads={args.threads}: expected at least 1")
    args.date = datetime.datetime.now().astimezone()
    if args.out is None:
        stamp = args.date.strftime("%Y%m%d-%H%M%S")
        args.out = Path(__file__).resolve().parent / "out" / f"{stamp}-{args.device.type}"
    return args


def compile_shapes(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   default: Optional[str]) -> list[Shape]:
    """The selected shapes whose cases also time torch.compile, in --shapes order."""
    if args.no_compile:
        if args.compile_shapes is not None:
            parser.error(f"--compile-shapes={args.compile_shapes!r} contradicts --no-compile; "
                         "give one of them")
        return []
    if args.compile_shapes is None:
        return args.shapes[:1] if default == "first" else list(args.shapes)
    names = args.compile_shapes
    if names.strip() == "all":
        return list(args.shapes)
    try:
        chosen = select_shapes(names, "--compile-shapes")
    except ValueError as error:
        parser.error(str(error))
    outside = [s.label for s in chosen if s not in args.shapes]
    if outside:
        parser.error(f"--compile-shapes={names!r}: {outside} not among --shapes "
                     f"{[s.label for s in args.shapes]}")
    return [s for s in args.shapes if s in chosen]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def environment(args: argparse.Namespace) -> dict:
    """The header of results.json; its first fields are repeated in every row."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if args.device.type == "cuda":
        device_name = torch.cuda.get_device_name(args.device)
    else:
        device_name = _cpu_model() or platform.processor() or platform.machine()
    return {
        "device": str(args.device), "device_name": device_name, "torch": torch.__version__,
        "triton": triton_version, "date": args.date.isoformat(timespec="seconds"),
        "python": platform.python_version(), "dgsct_kernels": dgsct_kernels.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "command": args.command,
        "dtype": dtype_name(args.dtype), "frames": args.frames,
        "warmup": args.warmup, "repeats": args.repeats,
        "compile_mode": None if args.no_compile else args.compile_mode,
        "compile_shapes": [s.label for s in args.compile_shapes], "run_size": args.run_size,
    }


def busy_warning(env: dict) -> Optional[str]:
    """A warning when other processes kept more than BUSY_CORES_LIMIT cores busy in any sample
    of a CPU run (its timings then measure the contention too); None otherwise."""
    samples = [env.get("busy_cores_before"), *env.get("busy_cores_between", []),
               env.get("busy_cores_after")]
    samples = [c for c in samples if c is not None]
    if not env["device"].startswith("cpu") or not samples or max(samples) <= BUSY_CORES_LIMIT:
        return None
    fewer_threads = "" if env.get("torch_threads", 1) == 1 else ", or with --threads 1"
    return (f"BUSY MACHINE: other processes kept up to {max(samples):.1f} of {env['cpu_count']} "
            f"cores busy (limit {BUSY_CORES_LIMIT}); these CPU timings are unreliable. Rerun on a "
            f"quiet machine{fewer_threads}")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def make_module(shape: Shape, device: torch.device, dtype: torch.dtype,
                backend: str = "auto") -> dgsct_kernels.FusedDGSCT:
    return dgsct_kernels.FusedDGSCT(shape.dim, shape.guide_dim, shape.tokens, shape.guide_tokens,
                                    num_latents=NUM_LATENTS, reduction=REDUCTION, groups=GROUPS,
                                    segments=SEGMENTS, backend=backend).to(device, dtype)


def perturb(module: dgsct_kernels.FusedDGSCT) -> None:
    """Move the zero-initialised gates and the fresh BatchNorm statistics off their initial
    values: at init the residual is exactly 0, which would make the output check vacuous."""
    with torch.no_grad():
        module.gate.fill_(1.0)
        module.gate_av.fill_(1.0)
        for bn in (module.bn1, module.bn2):
            bn.running_mean.normal_(0.0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)


def differentiable(named: dict[str, Tensor]) -> list[Tensor]:
    """The parameters the operator reads (not the unused gate_tk) that require grad."""
    return [named[n] for n in OP_PARAM_NAMES if n in named and named[n].requires_grad]


def contenders(shape: Shape, base: dgsct_kernels.FusedDGSCT, x: Tensor, g: Tensor, training: bool,
               args: argparse.Namespace) -> list[Contender]:
    params, hyper = base.op_params(), base.hyper()
    own = [x, g, *params.values()]

    def eager() -> Outputs:
        out = reference_forward(x, g, params, hyper, training)
        return out.residual, out.spatial_map, out.temporal_gate

    found = [Contender("eager", eager, [x, g, *differentiable(params)], own)]
    if shape in args.compile_shapes:
        torch._dynamo.reset()  # one fresh, static-shape compile per case: no cross-shape reuse
        compiled = torch.compile(eager, mode=args.compile_mode, dynamic=False)

        def compiled_forward() -> Outputs:
            torch.compiler.cudagraph_mark_step_begin()  # lets cudagraph modes reuse memory
            return compiled()

        found.append(Contender("compile", compiled_forward, found[0].wrt, own))
    problem = dispatch.Problem.of(x, base.dims, training, use_bn=True)
    for backend in dispatch.registered_backends():
        reasons = backend.not_supported_reasons(problem)
        if reasons:
            progress(f"  {shape.label}: backend {backend.name!r} skipped: {'; '.join(reasons)}")
            continue
        module = make_module(shape, args.device, args.dtype, backend.name)
        module.load_state_dict(base.state_dict())
        module.train(training)

        def module_forward(module: dgsct_kernels.FusedDGSCT = module) -> Outputs:
            out = module(x, g)
            return out.residual, out.spatial_map, out.temporal_gate.reshape(-1)

        named = module.op_params()
        found.append(Contender(backend.name, module_forward, [x, g, *differentiable(named)],
                               [x, g, *named.values()]))
    return found


def check_outputs(name: str, shape: Shape, mode: str, got: Outputs, expected: Outputs) -> None:
    tolerance = TOLERANCE[expected[0].dtype]
    for output, a, b in zip(OUTPUT_NAMES, got, expected):
        scale = b.abs().max().double().clamp_min(1e-30)
        error = ((a.double() - b.double()).abs().max() / scale).item()
        if not error <= tolerance:  # also catches NaN
            raise RuntimeError(f"{name} on {shape.label} {mode}: {output} differs from eager by "
                               f"{error:.2e} (max-abs relative), above the tolerance "
                               f"{tolerance:.0e}; its timing would not count")


def make_step(contender: Contender, training: bool, grad_outputs: Outputs) -> Callable[[], None]:
    if not training:
        def step() -> None:
            with torch.no_grad():
                contender.forward()
        return step

    def step() -> None:
        torch.autograd.grad(contender.forward(), contender.wrt, grad_outputs)
    return step


def copy_bandwidth_gbps(device: torch.device, megabytes: int) -> float:
    """Measured read+write bandwidth of a plain device copy: the yardstick of the floor."""
    src = torch.empty(megabytes * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = time_ms(lambda: dst.copy_(src), warmup=2, repeats=10, device=device)
    return 2 * src.numel() / (float(np.median(times)) * 1e-3) / 1e9


def plan_bytes(backend_name: str, shape: Shape, frames: int, dtype: torch.dtype,
               training: bool) -> Optional[int]:
    """The forward's DRAM bytes from a backend's plan report, for backends that have one."""
    if backend_name not in dispatch.backend_names()[1:]:
        return None
    backend = dispatch.get_backend(backend_name)
    if not hasattr(backend, "plan"):
        return None
    return backend.plan(frames, shape.dims(), dtype, training, True, True, True).bytes_moved


def roofline_ms(backend_name: str, shape: Shape, frames: int, dtype: torch.dtype, device: torch.device,
                device_name: str) -> Optional[float]:
    """The eval forward's roofline floor (dgsct_kernels/roofline.py) on this GPU, for GPU
    backends with a cost model; None on CPUs and for the others."""
    if device.type != "cuda" or backend_name not in dispatch.backend_names()[1:]:
        return None
    problem = dispatch.Problem("cuda", dtype, shape.dims(), frames, False, True)
    works = dispatch.get_backend(backend_name).roofline_works(problem)
    return None if not works else total_seconds(works, peaks_for(device_name)) * 1e3


def gemm_gflops(products: list[Product], dtype: torch.dtype, device: torch.device,
                matmul: Callable[[Tensor, Tensor], Tensor] = torch.matmul) -> float:
    """The rate `matmul` reaches on `products` run back to back in `dtype`, GFLOP/s
    (median of GEMM_REPEATS runs after GEMM_WARMUP): the device's GEMM on these shapes."""
    like = {"device": device, "dtype": dtype}
    pairs = [(torch.randn(*([] if p.shared_left or p.batch == 1 else [p.batch]), p.m, p.k, **like),
              torch.randn(*([] if p.batch == 1 else [p.batch]), p.k, p.n, **like)) for p in products]

    def step() -> None:
        for a, b in pairs:
            matmul(a, b)

    times = time_ms(step, GEMM_WARMUP, GEMM_REPEATS, device)
    return sum(p.flops for p in products) / (float(np.median(times)) * 1e-3) / 1e9


def gemm_unsupported_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the run leaves `dtype` GEMMs unmeasured on `device`, or None."""
    if device.type == "cuda":
        return None if dtype != torch.bfloat16 or torch.cuda.is_bf16_supported() else \
            "this GPU has no bfloat16 matmul"
    if dtype == torch.float16 and not _cpu_flags() & {"avx512_fp16", "amx_fp16"}:
        return ("this CPU has no float16 arithmetic (avx512_fp16, amx_fp16): torch multiplies float16 "
                "in a slow fallback; measured only with --dtype float16")
    return None


def gemm_libraries(device: torch.device) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """The float32 matmuls the GEMM rate is the best of: torch.matmul, and on the CPU the
    cpu backend's provider where it is not the BLAS torch.matmul already uses."""
    libraries = {"torch.matmul": torch.matmul}
    from dgsct_kernels._extension import _C
    if device.type == "cpu" and _C is not None and hasattr(_C, "cpu_gemm_provider"):
        name, _ = _C.cpu_gemm_provider()
        if name != "blas":
            libraries[name] = _C.cpu_matmul
    return libraries


def measure_gemm_rates(args: argparse.Namespace, env: dict) -> None:
    """Once per run: the GEMM rate of every shape's guide-path products, in every order the
    contenders run, per dtype (env["gemm_gflops_by_products"]); env["gemm_gflops_<tag>"] is the
    best of a dtype's, the device's GEMM rate in that dtype."""
    needed = {args.dtype, accumulation_dtype(args.dtype)}
    env["gemm_unmeasured"] = {DTYPE_TAGS[d]: reason for d in (torch.bfloat16, torch.float16)
                              if d not in needed and (reason := gemm_unsupported_reason(args.device, d))}
    measured = [d for d in DTYPE_TAGS if (d in needed or d != torch.float64)
                and DTYPE_TAGS[d] not in env["gemm_unmeasured"]]
    libraries = gemm_libraries(args.device)
    env["gemm_libraries_fp32"] = list(libraries)

    def rate(products: list[Product], dtype: torch.dtype) -> float:
        # float32 on the CPU: the best of torch.matmul and the cpu backend's own provider
        # (oneDNN where it beats MKL), so that "of gemm" is against the machine, not one library
        chosen = libraries if dtype == torch.float32 else {"torch.matmul": torch.matmul}
        return max(gemm_gflops(products, dtype, args.device, fn) for fn in chosen.values())

    env["gemm_gflops_by_products"] = {
        DTYPE_TAGS[d]: {s.label: {order: rate(guide_products(s, args.frames, order), d)
                                  for order in dict.fromkeys(["as-written", planned_order(s, args.frames)])}
                        for s in args.shapes}
        for d in measured}
    for tag in DTYPE_TAGS.values():
        rates = env["gemm_gflops_by_products"].get(tag)
        env[f"gemm_gflops_{tag}"] = None if rates is None else max(
            rate for per_order in rates.values() for rate in per_order.values())


def gemm_summary(env: dict) -> str:
    rates = ", ".join(f"{tag} {env[f'gemm_gflops_{tag}']:.0f}" for tag in DTYPE_TAGS.values()
                      if env[f"gemm_gflops_{tag}"] is not None)
    skipped = "".join(f"; {tag} not measured: {reason}" for tag, reason in env["gemm_unmeasured"].items())
    fp32 = " or ".join(env.get("gemm_libraries_fp32") or ["torch.matmul"])
    return (f"GEMM rate, GFLOP/s (the guide-path products of the run's shapes, best set, "
            f"{_threads(env['torch_threads'])}; fp32 the best of {fp32}, other dtypes torch.matmul): "
            f"{rates}{skipped}")


def planned_order(shape: Shape, frames: int) -> str:
    return plan_guide_path(frames, shape.tokens, shape.guide_tokens, shape.guide_dim, shape.dim,
                           NUM_LATENTS).order


def guide_path_of(name: str, shape: Shape, frames: int, dtype: torch.dtype,
                  training: bool) -> tuple[Optional[str], torch.dtype, Optional[str]]:
    """(order, dtype its products run in, why it cannot be timed apart or None) of the guide
    path of contender `name` (GUIDE_PATHS)."""
    if name not in GUIDE_PATHS:
        return None, dtype, f"the runner does not know how backend {name!r} runs its guide path"
    order, upcast, reason = GUIDE_PATHS[name]
    order = planned_order(shape, frames) if order == "planned" else order
    if reason is None and name == "triton" and order == "rewritten":
        reason = "triton runs the rewritten order in its own kernels (backends/triton/guide_pass.py)"
    if reason is None and training and name != "eager":
        reason = ("its backward is its own (recomputed under torch.func.vjp, or analytic); only "
                  "eager's autograd backward is reproduced apart")
    return order, accumulation_dtype(dtype) if upcast else dtype, reason


def run_guide(g: Tensor, p: dict[str, Tensor], order: str) -> tuple[Tensor, Tensor]:
    return guide_as_written(g, p) if order == "as-written" else prompts_and_pooled_guide(g, p, order)


def run_cpu_guide(g: Tensor, p: dict[str, Tensor], order: str) -> tuple[Tensor, Tensor]:
    """The cpu backend's own guide path (csrc/cpu/guide_path.cpp, its products' library)."""
    from dgsct_kernels._extension import _C
    return tuple(_C.cpu_guide_forward(g, *(p[n].detach() for n in GUIDE_PARAM_NAMES), order))


def guide_step(order: str, dtype: torch.dtype, g: Tensor, params: dict[str, Tensor],
               training: bool, name: str = "eager") -> Callable[[], None]:
    """One call's guide path alone, in `dtype` (g's upcast inside the step, like the backends;
    the weights' outside), as contender `name` runs it. fwd+bwd: also the gradients w.r.t. g
    and the guide's parameters."""
    p = {n: params[n] if params[n].dtype == dtype else params[n].detach().to(dtype)
         for n in GUIDE_PARAM_NAMES}
    if not training:
        guide = run_cpu_guide if name == "cpu" and order != "as-written" else run_guide

        def step() -> None:
            with torch.no_grad():
                guide(g.to(dtype), p, order)
        return step
    outputs = run_guide(g, p, order)
    grads = tuple(torch.randn_like(t) for t in outputs)
    wrt = [g, *p.values()]

    def step() -> None:
        torch.autograd.grad(run_guide(g, p, order), wrt, grads)
    return step


def guide_columns(name: str, shape: Shape, g: Tensor, params: dict[str, Tensor], training: bool,
                  args: argparse.Namespace, env: dict) -> dict:
    """The guide_* columns of contender `name`'s row (COLUMNS), timing its guide path apart."""
    order, dtype, reason = guide_path_of(name, shape, args.frames, args.dtype, training)
    flops = None if order is None else guide_flops(shape, args.frames, order) * (
        TRAIN_FLOPS_OVER_FORWARD if training else 1)
    columns = {"guide_order": order, "guide_dtype": dtype_name(dtype), "guide_flops": flops,
               "guide_ms": None, "guide_gflops": None, "guide_gemm_gflops": None,
               "guide_fraction_of_gemm": None, "guide_unmeasured_reason": reason}
    if reason is not None:
        return columns
    times = time_ms(guide_step(order, dtype, g, params, training, name), args.warmup, args.repeats,
                    args.device)
    median = float(np.median(times))
    achieved = flops / (median * 1e-3) / 1e9
    gemm = env["gemm_gflops_by_products"][DTYPE_TAGS[dtype]][shape.label][order]
    return {**columns, "guide_ms": median, "guide_gflops": achieved, "guide_gemm_gflops": gemm,
            "guide_fraction_of_gemm": achieved / gemm}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def supporting_backends(shape: Shape, training: bool, args: argparse.Namespace) -> list[str]:
    problem = dispatch.Problem(args.device.type, args.dtype, shape.dims(), args.frames, training, True)
    return [b.name for b in dispatch.registered_backends() if b.supports(problem)]


def estimate_seconds(cases: list[tuple[Shape, str]], args: argparse.Namespace,
                     gflops: float) -> tuple[float, float]:
    """(all, torch.compile warm-ups) seconds the cases take on a quiet machine.

    Every contender's call is costed as eager's: the FLOPs of SPEC.md's order as written at
    EAGER_MATMUL_EFFICIENCY of the measured GEMM rate (backends are faster or slower than
    eager, and the errors roughly cancel); so is each guide path timed apart, in its own order.
    Compile warm-ups are COMPILE_WARMUP_S, cold cache.
    """
    autotune = AUTOTUNE_FACTOR if "autotune" in args.compile_mode else 1.0
    rate = gflops * 1e9 * EAGER_MATMUL_EFFICIENCY
    compile_s = timing_s = 0.0
    for shape, mode in cases:
        training = mode == "train-fwd+bwd"
        call_s = call_flops(shape, args.frames, "as-written", training) / rate
        calls = 1 + args.warmup + args.repeats + int(training)  # first, warm-up, timed, saved count
        compiled = shape in args.compile_shapes
        names = ["eager", *(["compile"] if compiled else []), *supporting_backends(shape, training, args)]
        guides = [guide_path_of(name, shape, args.frames, args.dtype, training) for name in names]
        guide_s = sum(guide_flops(shape, args.frames, order) for order, _, reason in guides
                      if reason is None) * (TRAIN_FLOPS_OVER_FORWARD if training else 1) / rate
        timing_s += len(names) * calls * call_s + (args.warmup + args.repeats) * guide_s + CASE_OVERHEAD_S
        if compiled:
            compile_s += COMPILE_WARMUP_S[(args.device.type, training)] * autotune
    return compile_s + timing_s, compile_s


def describe_plan(cases: list[tuple[Shape, str]], args: argparse.Namespace, env: dict,
                  estimate: tuple[float, float]) -> str:
    """What the run will do and about how long it will take, printed before it starts."""
    total_s, compile_s = estimate
    backends = list(dict.fromkeys(name for shape, mode in cases
                                  for name in supporting_backends(shape, mode != "eval-fwd", args)))
    shapes = [s.label for s in args.shapes]
    compiled = [s.label for s in args.compile_shapes]
    if not compiled:
        compile_line = "no torch.compile"
    elif compiled == shapes:
        compile_line = f"torch.compile ({args.compile_mode}) on every shape"
    else:
        compile_line = f"torch.compile ({args.compile_mode}) on {', '.join(compiled)} only"
    lines = [f"dgsct benchmark, {args.run_size} run: {env['device_name']} ({args.device}), "
             f"{_threads(env['torch_threads'])}, {env['dtype']}, F={args.frames}"]
    if args.run_size == "quick":
        lines.append("  (quick CPU defaults; --full runs s1,s2 with 10 timed calls and "
                     "torch.compile on every shape: about 4 min on 2 quiet cores)")
    lines += [f"  {len(cases)} cases: shapes {', '.join(shapes)} x modes {', '.join(args.modes)}",
              f"  contenders: eager, {compile_line}, backends {', '.join(backends) or 'none'}",
              f"  per contender and case: 1 first call, {args.warmup} warm-up "
              f"call{'' if args.warmup == 1 else 's'}, {args.repeats} timed "
              f"call{'' if args.repeats == 1 else 's'}",
              f"  estimate: about {_duration(total_s)} in all (torch.compile warm-ups "
              f"{_duration(compile_s)} of it with a cold inductor cache; from a "
              f"{run_gemm_gflops(env):.0f} GFLOP/s GEMM rate measured just now)",
              f"  writing to {args.out}"]
    if args.time_budget is not None:
        lines.append(f"  no case starts after {args.time_budget:.0f} s")
    return "\n".join(lines)


def run_gemm_gflops(env: dict) -> float:
    """The measured GEMM rate in the run's dtype."""
    return env[f"gemm_gflops_{DTYPE_TAGS[DTYPES[env['dtype']]]}"]


def _threads(count: int) -> str:
    return f"{count} torch thread{'' if count == 1 else 's'}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def time_ms(step: Callable[[], None], warmup: int, repeats: int,
            device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        step()
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def saved_for_backward(contender: Contender) -> tuple[int, int]:
    """(all bytes, activation bytes) that autograd keeps from one forward for the backward.

    Counted with saved_tensors_hooks, one count per storage (views and repeats of a tensor
    share it). torch.compile'd code saves through its autograd.Function's save_for_backward,
    which the hooks see; the few tensors AOTAutograd stores on the node directly
    (`_tensors_no_vc_check`) they miss, so those are added from the graph. Activations are
    the storages that are none of the inputs or parameters.
    """
    storages: dict[tuple[str, int], int] = {}

    def count(t: Tensor) -> None:
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()

    def pack(t: Tensor) -> Tensor:
        count(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = contender.forward()
    for t in _stored_outside_hooks(outputs):
        count(t)
    own = {(str(t.device), t.untyped_storage().data_ptr()) for t in contender.own}
    total = sum(storages.values())
    return total, total - sum(n for key, n in storages.items() if key in own)


def _stored_outside_hooks(outputs: Outputs) -> list[Tensor]:
    found, seen, stack = [], set(), [t.grad_fn for t in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found += getattr(node, "_tensors_no_vc_check", [])
        stack += [child for child, _ in node.next_functions]
    return found


def run_case(shape: Shape, mode: str, args: argparse.Namespace, env: dict,
             step_label: str) -> list[dict]:
    training = mode == "train-fwd+bwd"
    torch.manual_seed(0)
    base = make_module(shape, args.device, args.dtype)
    perturb(base)
    F = args.frames
    like = {"device": args.device, "dtype": args.dtype}
    x = torch.randn(F, shape.tokens, shape.dim, **like, requires_grad=training)
    g = torch.randn(F, shape.guide_tokens, shape.guide_dim, **like, requires_grad=training)
    grad_outputs = (torch.randn_like(x), torch.randn(F, shape.tokens, **like),
                    torch.randn(F, **like))
    x_bytes = x.numel() * x.element_size()
    rows, expected = [], None
    for contender in contenders(shape, base, x, g, training, args):
        begin = time.perf_counter()
        got = first_step(contender, training, grad_outputs)
        first_s = time.perf_counter() - begin
        if expected is None:
            expected = got  # eager comes first
        check_outputs(contender.name, shape, mode, got, expected)
        times = time_ms(make_step(contender, training, grad_outputs), args.warmup, args.repeats,
                        args.device)
        median, p10, p90 = np.percentile(times, [50, 10, 90]).tolist()
        saved, activations = saved_for_backward(contender) if training else (None, None)
        eager_ms = rows[0]["median_ms"] if rows else median
        floor = cost(shape, F, x.element_size()).floor_bytes
        planned = None if training else plan_bytes(contender.name, shape, F, args.dtype, training)
        floor_ms = None if training else roofline_ms(contender.name, shape, F, args.dtype, args.device,
                                                     env["device_name"])
        guide = guide_columns(contender.name, shape, g, base.op_params(), training, args, env)
        flops = None if guide["guide_order"] is None else call_flops(shape, F, guide["guide_order"], training)
        achieved = None if flops is None else flops / (median * 1e-3) / 1e9
        rows.append({
            **{k: env[k] for k in ("device", "device_name", "torch", "triton", "date")},
            "backend": contender.name, "shape": shape.label, "N": shape.tokens, "C": shape.dim,
            "M": shape.guide_tokens, "D": shape.guide_dim, "F": F, "dtype": env["dtype"],
            "mode": mode, "median_ms": median, "p10_ms": p10, "p90_ms": p90,
            "repeats": args.repeats, "speedup_vs_eager": eager_ms / median, "saved_bytes": saved,
            "saved_over_x": None if saved is None else saved / x_bytes,
            "saved_activation_bytes": activations,
            # eval forward only: time against the floor's bytes at the measured copy bandwidth
            "floor_bytes": floor, "plan_bytes": planned,
            "achieved_gbps": None if planned is None else planned / (median * 1e-3) / 1e9,
            "vs_bandwidth_floor": None if training else median / (floor / (env["copy_gbps"] * 1e9) * 1e3),
            "roofline_ms": floor_ms, "vs_roofline": None if floor_ms is None else median / floor_ms,
            **{k: env[k] for k in GEMM_COLUMNS},
            "call_flops": flops, "call_gflops": achieved,
            "call_fraction_of_gemm": None if achieved is None else achieved / run_gemm_gflops(env),
            **guide,
        })
        guide_note = "" if guide["guide_gflops"] is None else f"; guide {guide['guide_gflops']:.1f} GFLOP/s"
        progress(f"{step_label} {shape.label} {mode} {contender.name}: median {median:.2f} ms "
                 f"(p10 {p10:.2f}, p90 {p90:.2f}); first step {first_s:.1f} s{guide_note}")
    return rows


def first_step(contender: Contender, training: bool, grad_outputs: Outputs) -> Outputs:
    """One untimed step that also compiles (forward and, on its first call, the backward) in
    the timed grad mode; returns the forward's outputs for the check."""
    with torch.set_grad_enabled(training):
        outputs = contender.forward()
        if training:
            torch.autograd.grad(outputs, contender.wrt, grad_outputs)
    return tuple(t.detach() for t in outputs)


def format_table(rows: list[dict]) -> str:
    header = tuple(TABLE_LEGEND)
    body = [(r["shape"], r["mode"], r["backend"], f"{r['median_ms']:.2f}",
             f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}", f"{r['speedup_vs_eager']:.2f}x",
             _maybe(r["saved_bytes"], 1e-6, "{:.1f}"), _maybe(r["saved_over_x"], 1, "{:.2f}"),
             _maybe(r["saved_activation_bytes"], 1e-6, "{:.1f}"),
             _maybe(r["vs_bandwidth_floor"], 1, "{:.2f}"), _maybe(r["achieved_gbps"], 1, "{:.0f}"),
             _maybe(r["vs_roofline"], 1, "{:.2f}"), _maybe(r["call_gflops"], 1, "{:.1f}"),
             _maybe(r["call_fraction_of_gemm"], 100, "{:.0f}%"), _maybe(r["guide_gflops"], 1, "{:.1f}"),
             _maybe(r["guide_fraction_of_gemm"], 100, "{:.0f}%"))
            for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(v).rjust(w) if i >= 3 else str(v).ljust(w)
                       for i, (v, w) in enumerate(zip(line, widths))) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_legend() -> str:
    """One line per table column saying what it holds."""
    width = max(len(name) for name in TABLE_LEGEND)
    return "\n".join(["columns ('-': not measured for that row):"] +
                     [f"  {name.ljust(width)}  {meaning}" for name, meaning in TABLE_LEGEND.items()])


def _maybe(value: Optional[float], scale: float, fmt: str) -> str:
    return "-" if value is None else fmt.format(value * scale)


def measured_winners(rows: list[dict]) -> list[dict]:
    """The fastest GPU backend per (device, dtype, mode, shape), in the row format of
    dgsct_kernels/measured_winners.json (what `auto` reads to choose between them)."""
    candidates = {b.name for b in dispatch.registered_backends()
                  if "cuda" in b.devices and b.name != "reference"}
    timed: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["backend"] in candidates and str(r["device"]).startswith("cuda"):
            key = (r["device_name"], r["dtype"], r["mode"], r["N"], r["C"], r["M"], r["D"], r["F"])
            timed.setdefault(key, {})[r["backend"]] = r["median_ms"]
    return [{"device_name": key[0], "dtype": key[1], "mode": key[2], "N": key[3], "C": key[4],
             "M": key[5], "D": key[6], "winner": min(times, key=times.get), "F": key[7],
             "median_ms": times} for key, times in timed.items()]


def write_results(rows: list[dict], env: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    winners = measured_winners(rows)
    if winners:  # copy reviewed rows into dgsct_kernels/measured_winners.json for auto
        with open(out / "winners.json", "w") as f:
            json.dump(winners, f, indent=1)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    with open(out / "results.json", "w") as f:
        json.dump({"header": {**env, "columns": COLUMNS}, "rows": rows}, f, indent=1)
    plot(rows, env, out / "results.png")


def plot(rows: list[dict], env: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = draw_figure(rows, env)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


PLOT_DPI = 120
GEMM_LIMIT_LABEL = "its FLOPs at the GEMM rate"
LABEL_POINTS = 7  # font size of the value labels


def draw_figure(rows: list[dict], env: dict):
    """One log-scale bar chart per mode: median ms per shape and contender, p10-p90 error
    bars, each bar's median written vertically above its error bar (vertical labels need only
    a line's height of the bar's width, so close values and narrow bars do not collide).
    A black tick on a bar marks GEMM_LIMIT_LABEL: the time its call's FLOPs take at the GEMM
    rate measured in the run's dtype. A shape's bars sit side by side without gaps for
    contenders it lacks (a shape without torch.compile); colours and the legend keep each
    contender apart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    most_bars = max(sum(r["mode"] == m for r in rows) for m in modes)
    width_in = min(max(11.0, 3.0 + 0.3 * most_bars), 24.0)  # room for every bar's label
    fig, axes = plt.subplots(len(modes), 1, figsize=(width_in, 4.6 * len(modes)), squeeze=False,
                             layout="constrained")
    warning = env.get("busy_warning")
    if warning:
        fig.suptitle(warning, color="red", fontweight="bold", fontsize=11, wrap=True)
    all_backends = list(dict.fromkeys(r["backend"] for r in rows))  # one colour per backend
    plain_number = FuncFormatter(lambda value, _: f"{value:g}")
    for ax, mode in zip(axes[:, 0], modes):
        mine = [r for r in rows if r["mode"] == mode]
        shapes = list(dict.fromkeys(r["shape"] for r in mine))
        per_shape = {s: [r for r in mine if r["shape"] == s] for s in shapes}
        width = 0.8 / max(len(group) for group in per_shape.values())
        bar_px = width * ax.get_position().width * width_in * PLOT_DPI / len(shapes)
        label_bars = bar_px >= 1.5 * LABEL_POINTS * PLOT_DPI / 72  # a vertical label fits
        legend_done = set()
        for j, shape in enumerate(shapes):
            group = per_shape[shape]
            for i, row in enumerate(group):
                x = j + (i - (len(group) - 1) / 2) * width
                median = row["median_ms"]
                spread = [[median - row["p10_ms"]], [row["p90_ms"] - median]]
                backend = row["backend"]
                ax.bar(x, median, width, yerr=spread, capsize=2,
                       color=f"C{all_backends.index(backend) % 10}",
                       label=None if backend in legend_done else backend)
                legend_done.add(backend)
                if row.get("call_fraction_of_gemm"):
                    ax.plot([x - width / 2, x + width / 2], [median * row["call_fraction_of_gemm"]] * 2,
                            color="black", linewidth=1.5,
                            label=None if GEMM_LIMIT_LABEL in legend_done else GEMM_LIMIT_LABEL)
                    legend_done.add(GEMM_LIMIT_LABEL)
                if label_bars:
                    ax.annotate(value_label(median), (x, row["p90_ms"]), xytext=(0, 2),
                                textcoords="offset points", rotation=90, ha="center", va="bottom",
                                fontsize=LABEL_POINTS, gid="value-label")
        ax.set_yscale("log")
        low = min(min(r["p10_ms"], r["median_ms"] * (r.get("call_fraction_of_gemm") or 1))
                  for r in mine) / 1.5
        high = max(r["p90_ms"] for r in mine)
        # a quarter of the height above the tallest error bar holds its vertical label
        decades = max(np.log10(high / low), 0.5)
        ax.set_ylim(low, high * 10 ** (decades / 3))
        ax.yaxis.set_major_formatter(plain_number)
        if decades * 4 / 3 <= 2:  # beyond two decades the 2..9 ticks' labels would crowd
            ax.yaxis.set_minor_formatter(plain_number)
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_ylabel("median ms (log; bars p10-p90)")
        ax.set_title(f"{mode}: {env['device_name']} ({env['device']}), {env['dtype']}, "
                     f"F={env['frames']}" + ("" if label_bars else "; too many bars to label"))
        handles, names = ax.get_legend_handles_labels()  # in the first-seen order of all rows
        order = sorted(range(len(names)), key=lambda k: (all_backends + names).index(names[k]))
        ax.legend([handles[k] for k in order], [names[k] for k in order], fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
        if warning:  # a watermark no reader can miss, faint enough to read the bars through
            ax.text(0.5, 0.5, "BUSY MACHINE", transform=ax.transAxes, ha="center", va="center",
                    fontsize=44, color="red", alpha=0.15, rotation=12, zorder=5)
    return fig


def value_label(ms: float) -> str:
    """A median in three significant digits without exponents: 0.123, 12.3, 1234."""
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def warn_if_busy(cores: Optional[float], env: dict) -> bool:
    """Warn on stderr when a CPU run's sample is above the limit; True if it warned."""
    warning = busy_warning({**env, "busy_cores_before": cores, "busy_cores_between": [],
                            "busy_cores_after": None})
    if warning:
        progress(f"warning: {warning}")
    return warning is not None


def main(argv: Optional[Sequence[str]] = None, started: Optional[float] = None) -> list[dict]:
    """`started`: the perf_counter time the run's clock starts from (default: now)."""
    started = time.perf_counter() if started is None else started
    args = parse_args(argv)
    busy_before = busy_cores(0.5)
    default_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.device.type == "cpu":
        torch.set_num_threads(threads_beside(busy_before, default_threads))
    try:
        return run_all(args, started, busy_before, default_threads)
    finally:  # a caller in the same process (the tests) keeps its threads
        torch.set_num_threads(default_threads)


def run_all(args: argparse.Namespace, started: float, busy_before: Optional[float],
            default_threads: int) -> list[dict]:
    """Every case of the run, its output files, the table and the time it took."""
    env = environment(args)
    env["busy_cores_before"] = busy_before
    if torch.get_num_threads() < default_threads and args.threads is None:
        progress(f"other processes keep {busy_before:.1f} of {env['cpu_count']} cores busy: timing "
                 f"on {_threads(torch.get_num_threads())} instead of {default_threads} (a thread "
                 f"sharing a busy core stalls the others); --threads {default_threads} overrides")
    env["busy_cores_between"] = []
    env["copy_gbps"] = copy_bandwidth_gbps(args.device, 1024 if args.device.type == "cuda" else 256)
    measure_gemm_rates(args, env)
    cases = [(shape, mode) for shape in args.shapes for mode in args.modes]
    cases_s, compile_s = estimate_seconds(cases, args, run_gemm_gflops(env))
    estimate = (time.perf_counter() - started + cases_s, compile_s)  # start-up is behind us
    env["estimated_s"] = round(estimate[0], 1)
    progress(describe_plan(cases, args, env, estimate))
    progress(f"device copy bandwidth: {env['copy_gbps']:.1f} GB/s")
    progress(gemm_summary(env))
    warned = warn_if_busy(env["busy_cores_before"], env)  # once a run; the end repeats it
    begin = time.perf_counter()
    rows = []
    env["skipped_cases"] = []
    for i, (shape, mode) in enumerate(cases, 1):
        if i > 1 and args.time_budget is not None and time.perf_counter() - begin > args.time_budget:
            env["skipped_cases"] = [f"{s.label} {m}" for s, m in cases[i - 1:]]
            progress(f"time budget of {args.time_budget:.0f} s spent: skipped "
                     f"{', '.join(env['skipped_cases'])}")
            break
        rows += run_case(shape, mode, args, env, f"[{i}/{len(cases)}]")
        if i < len(cases):  # sampled while idle between cases; the run's own load is not counted
            env["busy_cores_between"].append(busy_cores())
            warned = warned or warn_if_busy(env["busy_cores_between"][-1], env)
        env["busy_warning"] = busy_warning(env)
        write_results(rows, env, args.out)  # a run cut off later still leaves these rows
    env["busy_cores_after"] = busy_cores()
    env["busy_warning"] = busy_warning(env)
    env["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_results(rows, env, args.out)
    print(format_table(rows))
    print(gemm_summary(env))
    print(format_legend())
    if env["busy_warning"]:
        print(env["busy_warning"])
    print(f"took {_duration(env['elapsed_s'])} (estimated {_duration(env['estimated_s'])}; "
          f"busy cores before/between/after: {_busy_summary(env)}); results in {args.out}",
          flush=True)
    return rows


def _busy_summary(env: dict) -> str:
    between = [c for c in env["busy_cores_between"] if c is not None]
    parts = (env["busy_cores_before"], max(between) if between else None, env["busy_cores_after"])
    return " / ".join("-" if c is None else f"{c:.1f}" for c in parts)


if __name__ == "__main__":
    main(started=STARTED)
