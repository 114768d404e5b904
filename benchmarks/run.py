"""Time DG-SCT: the eager reference, its torch.compile, and every backend that can run the call.

    python benchmarks/run.py                       # this machine's defaults
    python benchmarks/run.py --shapes tiny --repeats 1 --warmup 0 --no-compile

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
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

import dgsct_kernels
from dgsct_kernels import dispatch
from dgsct_kernels.config import OP_PARAM_NAMES
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
    parser.add_argument("--shapes", help="comma-separated labels or sets: all, tiny, s1..s4 "
                        "(default: s1,s2 on cpu, all on cuda)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated from {list(MODES)}")
    parser.add_argument("--repeats", type=int, help="timed calls (default: 10 on cpu, 50 on cuda)")
    parser.add_argument("--warmup", type=int,
                        help="untimed calls after the first (default: 2 on cpu, 10 on cuda)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: benchmarks/out/<date>-<device>)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds (the first always runs); "
                             "rows are written after every case, so a cut-off run leaves results")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile baseline")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's, one per core); 1 keeps "
                        "timings stable when other processes share the cores")
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
    args.dtype = DTYPES[args.dtype]
    args.frames = args.frames if args.frames is not None else (80 if on_cuda else 10)
    if args.frames < 1 or args.frames % SEGMENTS:
        parser.error(f"--frames={args.frames}: expected a positive multiple of segments={SEGMENTS}")
    try:
        args.shapes = select_shapes(args.shapes or ("all" if on_cuda else "s1,s2"))
    except ValueError as error:
        parser.error(str(error))
    args.modes = [m.strip() for m in args.modes.split(",")]
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"--modes: unknown mode {mode!r}; expected some of {list(MODES)}")
    args.repeats = args.repeats if args.repeats is not None else (50 if on_cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: expected at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup}: expected 0 or more")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads={args.threads}: expected at least 1")
    args.date = datetime.datetime.now().astimezone()
    if args.out is None:
        stamp = args.date.strftime("%Y%m%d-%H%M%S")
        args.out = Path(__file__).resolve().parent / "out" / f"{stamp}-{args.device.type}"
    return args


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
    }


def busy_cores(interval_s: float = 0.25) -> Optional[float]:
    """How many cores other processes (or the hypervisor: steal) keep busy while we sleep.

    On a shared CPU every OpenMP parallel region waits for its slowest thread, so one busy
    core made 2-thread steps up to 100x slower here; the header records this before and
    after the run. None where /proc/stat is missing.
    """
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:  # cpu user nice system idle iowait irq softirq steal
            ticks = [int(v) for v in stat.readline().split()[1:9]]
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)

    try:
        busy_before, total_before = sample()
        time.sleep(interval_s)
        busy_after, total_after = sample()
    except (OSError, ValueError):
        return None
    return (busy_after - busy_before) / max(total_after - total_before, 1) * (os.cpu_count() or 1)


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
    if not args.no_compile:
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
    header = ("shape", "mode", "backend", "median ms", "p10-p90 ms", "vs eager", "saved MB",
              "saved/x", "activ. MB", "x floor", "GB/s", "x roofline")
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(len(modes), 1, figsize=(11, 4.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        mine = [r for r in rows if r["mode"] == mode]
        shapes = list(dict.fromkeys(r["shape"] for r in mine))
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            by_shape = {r["shape"]: r for r in mine if r["backend"] == backend}
            offset = (i - (len(backends) - 1) / 2) * width
            xs = [j + offset for j, s in enumerate(shapes) if s in by_shape]
            picked = [by_shape[s] for s in shapes if s in by_shape]
            medians = np.array([r["median_ms"] for r in picked])
            spread = np.array([[r["median_ms"] - r["p10_ms"] for r in picked],
                               [r["p90_ms"] - r["median_ms"] for r in picked]])
            bars = ax.bar(xs, medians, width, yerr=spread, capsize=2, label=backend)
            ax.bar_label(bars, labels=[f"{m:.3g}" for m in medians], fontsize=7, padding=2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_ylabel("median ms (log; bars p10-p90)")
        ax.set_title(f"{mode}: {env['device_name']} ({env['device']}), {env['dtype']}, "
                     f"F={env['frames']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def warn_if_busy(cores: Optional[float], device: torch.device) -> None:
    if device.type == "cpu" and cores is not None and cores >= 0.25:
        progress(f"warning: other processes kept {cores:.1f} of {os.cpu_count()} cores busy; "
                 "CPU timings are unreliable (use a quiet machine, or --threads 1)")


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(args)
    env["busy_cores_before"] = busy_cores()
    env["copy_gbps"] = copy_bandwidth_gbps(args.device, 1024 if args.device.type == "cuda" else 256)
    progress(f"device copy bandwidth: {env['copy_gbps']:.1f} GB/s")
    progress(f"dgsct benchmark: {env['device_name']} ({args.device}), {env['dtype']}, "
             f"F={args.frames}, warmup {args.warmup}, repeats {args.repeats}, compile "
             f"{'off' if args.no_compile else args.compile_mode}; writing to {args.out}")
    warn_if_busy(env["busy_cores_before"], args.device)
    begin = time.perf_counter()
    cases = [(shape, mode) for shape in args.shapes for mode in args.modes]
    rows = []
    env["skipped_cases"] = []
    for i, (shape, mode) in enumerate(cases, 1):
        if i > 1 and args.time_budget is not None and time.perf_counter() - begin > args.time_budget:
            env["skipped_cases"] = [f"{s.label} {m}" for s, m in cases[i - 1:]]
            progress(f"time budget of {args.time_budget:.0f} s spent: skipped "
                     f"{', '.join(env['skipped_cases'])}")
            break
        rows += run_case(shape, mode, args, env, f"[{i}/{len(cases)}]")
        write_results(rows, env, args.out)  # a run cut off later still leaves these rows
    env["busy_cores_after"] = busy_cores()
    warn_if_busy(env["busy_cores_after"], args.device)
    write_results(rows, env, args.out)
    print(format_table(rows))
    progress(f"done in {time.perf_counter() - begin:.0f} s; results in {args.out}")
    return rows


if __name__ == "__main__":
    main()
