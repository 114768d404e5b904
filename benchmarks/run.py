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
from dgsct_kernels.config import OP_PARAM_NAMES
from dgsct_kernels.cpu_load import busy_cores, threads_beside
from dgsct_kernels.reference import reference_forward
from dgsct_kernels.roofline import peaks_for, total_seconds
from shapes import GROUPS, NUM_LATENTS, REDUCTION, SEGMENTS, Shape, cost, select_shapes

MODES = ("eval-fwd", "train-fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# max|contender - eager| / max|eager| allowed per output. This guard catches wrong results,
# not precision (the tests own that): both sides carry the dtype's error, and plain bf16
# eager alone is ~3e-2 off float64, so low precision gets 5x SPEC.md's tolerance.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}
OUTPUT_NAMES = ("residual", "spatial_map", "temporal_gate")
COLUMNS = ("device", "device_name", "torch", "triton", "date", "backend", "shape", "N", "C", "M",
           "D", "F", "dtype", "mode", "median_ms", "p10_ms", "p90_ms", "repeats",
           "speedup_vs_eager", "saved_bytes", "saved_over_x", "saved_activation_bytes",
           "floor_bytes", "plan_bytes", "achieved_gbps", "vs_bandwidth_floor", "roofline_ms", "vs_roofline")

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
# Eager runs the matrix products at about this fraction of a plain matmul's rate (2 CPU
# cores: 180-230 of 250 GFLOP/s); a training step costs about 3 forwards.
EAGER_MATMUL_EFFICIENCY = 0.7
TRAIN_OVER_EVAL = 3.0
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
        "dtype": str(args.dtype).replace("torch.", ""), "frames": args.frames,
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


def matmul_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured rate of one square matrix product: the yardstick of the time estimate."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    times = time_ms(lambda: torch.mm(a, b), warmup=1, repeats=5, device=device)
    return 2 * n ** 3 / (float(np.median(times)) * 1e-3) / 1e9


def supporting_backends(shape: Shape, training: bool, args: argparse.Namespace) -> list[str]:
    problem = dispatch.Problem(args.device.type, args.dtype, shape.dims(), args.frames, training, True)
    return [b.name for b in dispatch.registered_backends() if b.supports(problem)]


def estimate_seconds(cases: list[tuple[Shape, str]], args: argparse.Namespace,
                     gflops: float) -> tuple[float, float]:
    """(all, torch.compile warm-ups) seconds the cases take on a quiet machine.

    Every contender's call is costed as eager's: the FLOPs of SPEC.md's order as written at
    EAGER_MATMUL_EFFICIENCY of the measured matmul rate (backends are faster or slower than
    eager, and the errors roughly cancel). Compile warm-ups are COMPILE_WARMUP_S, cold cache.
    """
    autotune = AUTOTUNE_FACTOR if "autotune" in args.compile_mode else 1.0
    compile_s = timing_s = 0.0
    for shape, mode in cases:
        training = mode == "train-fwd+bwd"
        shape_cost = cost(shape, args.frames)
        flops = (shape_cost.guide_flops["as written"] + shape_cost.target_flops) * (
            TRAIN_OVER_EVAL if training else 1.0)
        call_s = flops / (gflops * 1e9 * EAGER_MATMUL_EFFICIENCY)
        calls = 1 + args.warmup + args.repeats + int(training)  # first, warm-up, timed, saved count
        compiled = shape in args.compile_shapes
        contenders = 1 + compiled + len(supporting_backends(shape, training, args))
        timing_s += contenders * calls * call_s + CASE_OVERHEAD_S
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
              f"{env['matmul_gflops']:.0f} GFLOP/s matmul measured just now)",
              f"  writing to {args.out}"]
    if args.time_budget is not None:
        lines.append(f"  no case starts after {args.time_budget:.0f} s")
    return "\n".join(lines)


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
        })
        progress(f"{step_label} {shape.label} {mode} {contender.name}: median {median:.2f} ms "
                 f"(p10 {p10:.2f}, p90 {p90:.2f}); first step {first_s:.1f} s")
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
             _maybe(r["vs_roofline"], 1, "{:.2f}"))
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
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    with open(out / "results.json", "w") as f:
        json.dump({"header": env, "rows": rows}, f, indent=1)
    plot(rows, env, out / "results.png")


def plot(rows: list[dict], env: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = draw_figure(rows, env)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


PLOT_DPI = 120
LABEL_POINTS = 7  # font size of the value labels


def draw_figure(rows: list[dict], env: dict):
    """One log-scale bar chart per mode: median ms per shape and contender, p10-p90 error
    bars, each bar's median written vertically above its error bar (vertical labels need only
    a line's height of the bar's width, so close values and narrow bars do not collide).
    A shape's bars sit side by side without gaps for contenders it lacks (a shape without
    torch.compile); colours and the legend keep each contender apart."""
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
                if label_bars:
                    ax.annotate(value_label(median), (x, row["p90_ms"]), xytext=(0, 2),
                                textcoords="offset points", rotation=90, ha="center", va="bottom",
                                fontsize=LABEL_POINTS, gid="value-label")
        ax.set_yscale("log")
        low = min(r["p10_ms"] for r in mine) / 1.5
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
        order = sorted(range(len(names)), key=lambda k: all_backends.index(names[k]))
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
    env["matmul_gflops"] = matmul_gflops(args.device, args.dtype)
    cases = [(shape, mode) for shape in args.shapes for mode in args.modes]
    cases_s, compile_s = estimate_seconds(cases, args, env["matmul_gflops"])
    estimate = (time.perf_counter() - started + cases_s, compile_s)  # start-up is behind us
    env["estimated_s"] = round(estimate[0], 1)
    progress(describe_plan(cases, args, env, estimate))
    progress(f"device copy bandwidth: {env['copy_gbps']:.1f} GB/s")
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
