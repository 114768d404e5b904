"""Compile every GPU kernel ahead of time, with no GPU, and report what the compiler decided.

  python python/compile_report.py                  # the full report (all AVE shapes, dtypes, modes)
  python python/compile_report.py --subset ci      # the part CI runs (a few minutes on 2 cores)
  python python/compile_report.py --help

Triton: the backend's own launchers run on `meta` tensors while a stand-in for Triton's
driver reports the target GPU (sm_80, sm_89, sm_90) and turns every launch into a compile.
So each kernel is compiled at exactly the tiles, warps and flags its launcher chooses for
that shape, dtype, mode and layer options, forward and backward. Triton's bundled ptxas
does the compile; its log gives registers, spills and stack, the compiled kernel its
shared memory, and its SASS (cuobjdump) the tensor-core instructions.

CUDA: csrc/cuda/kernels.cu compiled by nvcc with `-Xptxas -v` for the same architectures.

Writes report.csv and report.json (one row per distinct compiled kernel variant) and
prints a table. Exits 1 on any compile error, any spill or stack frame, shared memory over
the architecture's per-block limit, or a kernel with matrix products (tl.dot; every CUDA
kernel) that has no tensor-core instruction. A full run (no --subset, every shape, dtype,
mode and option set) also writes dgsct_kernels/compile_status.json: per backend, the
architectures where all its kernels are clean, which `auto` reads on GPUs that have no
measured winner yet (dgsct_kernels/measured.py).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from shapes import AVE_SHAPES, SHAPES  # noqa: E402

from dgsct_kernels import FusedDGSCT  # noqa: E402
from dgsct_kernels.backends.triton import TritonBackend  # noqa: E402
from dgsct_kernels.backends.triton.tiling import ARCHS, SHARED_LIMIT  # noqa: E402
from dgsct_kernels.config import OP_PARAM_NAMES  # noqa: E402
from dgsct_kernels.measured import STATUS_PATH  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPTION_SETS = {  # FusedDGSCT keyword arguments
    "full": {},
    "bare": {"use_bn": False, "use_gate": False, "ln_before": False, "ln_post": False},
}
FRAMES = 80  # the paper's training batch (B = 8 clips of T = 10 segments)
TENSOR_CORE_SASS = re.compile(r"\b(HMMA|HGMMA|IMMA|IGMMA)\b")
SUBSETS = {  # what CI runs: the largest-token and largest-channel shapes, training (the superset)
    "ci": dict(shapes=["s1-visual", "s4-visual"], dtypes=["bfloat16", "float32"], modes=["train"],
               options=["full"], archs=[80, 90]),
}


@dataclass
class Row:
    """One distinct compiled kernel variant (kernel x constexprs x arch)."""

    compiler: str  # triton or nvcc
    arch: int
    kernel: str
    variant: str  # the constexpr / template arguments
    dtype: str
    configs: list[str] = field(default_factory=list)  # shape/mode/options/direction that use it
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    shared: int = -1  # bytes per block (static + dynamic)
    shared_limit: int = 0
    num_warps: int = 0
    num_stages: int = 0
    has_products: bool = False
    tensor_core_ops: int = 0  # HMMA / HGMMA instructions in the SASS
    compile_s: float = 0.0
    error: str = ""

    @property
    def problems(self) -> list[str]:
        found = []
        if self.error:
            found.append("compile error")
            return found
        if self.spill_stores or self.spill_loads:
            found.append(f"spills {self.spill_stores}/{self.spill_loads} B")
        if self.stack:
            found.append(f"stack {self.stack} B")
        if self.shared > self.shared_limit:
            found.append(f"shared {self.shared} B > {self.shared_limit} B")
        if self.has_products and self.tensor_core_ops == 0:
            found.append("products without tensor cores")
        return found


# ---------------------------------------------------------------- Triton, compile-only


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: reports `arch` as the current target, and the
    device id is the arch, so each arch keeps its own kernel cache."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def is_active(self):
        return True


@contextlib.contextmanager
def compile_only(arch: int, on_compile):
    """Within: every Triton launch compiles for `arch` and calls on_compile(fn, kernel,
    seconds, ptxas_log) instead of running. Triton's on-disk cache is a fresh folder
    meanwhile, so every variant really runs ptxas (whose log the report reads)."""
    from triton import knobs

    previous_run, previous_dump, previous_cache = JITFunction.run, knobs.nvidia.dump_ptxas_log, knobs.cache.dir
    cache = tempfile.TemporaryDirectory(prefix="dgsct-compile-report-")
    previous_driver = triton_driver._active  # None until a driver was needed; no GPU driver exists here

    def run(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):  # Triton prints ptxas's log when asked to
            kernel = previous_run(self, *args, grid=grid, warmup=True, **kwargs)
        on_compile(self, kernel, time.perf_counter() - start, log.getvalue())
        return kernel

    triton_driver.set_active(CompileOnlyDriver(arch))
    JITFunction.run, knobs.nvidia.dump_ptxas_log, knobs.cache.dir = run, True, cache.name
    try:
        yield
    finally:
        JITFunction.run, knobs.nvidia.dump_ptxas_log, knobs.cache.dir = previous_run, previous_dump, previous_cache
        cache.cleanup()
        triton_driver._active = previous_driver


def parse_ptxas(log: str) -> dict:
    """Registers, spills and stack of the one kernel in a ptxas -v log."""
    def grab(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else -1
    return {"registers": grab(r"Used (\d+) registers"), "stack": grab(r"(\d+) bytes stack frame"),
            "spill_stores": grab(r"(\d+) bytes spill stores"), "spill_loads": grab(r"(\d+) bytes spill loads")}


def count_tensor_core_ops(cubin: bytes, tools: "Tools") -> int:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        sass = subprocess.run([tools.cuobjdump, "-sass", handle.name], check=True, capture_output=True,
                              text=True).stdout
    return len(TENSOR_CORE_SASS.findall(sass))


@dataclass
class Tools:
    cuobjdump: str
    nvcc: str | None


def find_tools() -> Tools:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cuobjdump = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if not cuobjdump:
        raise SystemExit("compile_report: no cuobjdump (neither Triton's bundled one nor on PATH)")
    return Tools(cuobjdump=cuobjdump, nvcc=shutil.which("nvcc"))


def _variant_text(kernel) -> str:
    constants = getattr(kernel.src, "constants", {}) if hasattr(kernel, "src") else {}
    if not constants:
        return ""
    names = kernel.src.fn.arg_names
    parts = []
    for key, value in sorted(constants.items()):
        index = key[0] if isinstance(key, tuple) else key
        name = names[index] if isinstance(index, int) and index < len(names) else str(key)
        value = getattr(value, "value", value)
        if name.isupper():
            parts.append(f"{name}={value}")
    return " ".join(parts)


def meta_problem(shape, dtype, options: str, training: bool):
    """x, g, the op's parameter mapping and Hyper for one shape, all on the meta device."""
    module = FusedDGSCT(dim=shape.dim, guide_dim=shape.guide_dim, tokens=shape.tokens,
                        guide_tokens=shape.guide_tokens, num_latents=32, reduction=8, groups=2, segments=10,
                        **OPTION_SETS[options]).to("meta")
    named = module.op_params()
    params = {name: named.get(name) for name in OP_PARAM_NAMES}
    x = torch.empty(FRAMES, shape.tokens, shape.dim, device="meta", dtype=dtype)
    g = torch.empty(FRAMES, shape.guide_tokens, shape.guide_dim, device="meta", dtype=dtype)
    return x, g, params, module.hyper()


def triton_rows(arch: int, shapes, dtypes, modes, options_sets, tools: Tools, log) -> list[Row]:
    rows: dict[int, Row] = {}
    current: dict[str, str] = {}

    def on_compile(fn, kernel, seconds, ptxas_log):
        row = rows.get(id(kernel))
        if row is None:
            metadata = kernel.metadata
            row = Row(compiler="triton", arch=arch, kernel=fn.__name__, variant=_variant_text(kernel),
                      dtype=current["dtype"], shared=int(metadata.shared), shared_limit=SHARED_LIMIT[arch],
                      num_warps=metadata.num_warps, num_stages=metadata.num_stages,
                      has_products="tt.dot" in kernel.asm.get("ttir", ""), compile_s=round(seconds, 2))
            if ptxas_log.strip():
                for key, value in parse_ptxas(ptxas_log).items():
                    setattr(row, key, value)
            else:
                row.error = "no ptxas log (kernel came from a cache the report did not clear)"
            row.tensor_core_ops = count_tensor_core_ops(kernel.asm["cubin"], tools)
            rows[id(kernel)] = row
        row.configs.append(current["config"])

    backend = TritonBackend()
    with compile_only(arch, on_compile):
        for shape in shapes:
            for dtype_name in dtypes:
                for mode in modes:
                    for options in options_sets:
                        training = mode == "train"
                        x, g, params, hyper = meta_problem(shape, DTYPES[dtype_name], options, training)
                        for direction in ("forward", "backward"):
                            config = f"{shape.label}/{dtype_name}/{mode}/{options}/{direction}"
                            current.update(config=config, dtype=dtype_name)
                            start = time.perf_counter()
                            try:
                                if direction == "forward":
                                    backend.forward(x, g, params, hyper, training)
                                else:
                                    grads = (torch.empty_like(x), x.new_empty(x.shape[:2]), x.new_empty(x.shape[0]))
                                    wanted = ["x", "g"] + [n for n, v in params.items()
                                                           if v is not None and "running_" not in n]
                                    backend.backward(grads, x, g, params, hyper, training, wanted)
                            except Exception as error:  # a kernel that does not compile
                                detail = "".join(traceback.format_exception_only(type(error), error)).strip()
                                failed = Row(compiler="triton", arch=arch, kernel=f"({direction} call)",
                                             variant="", dtype=dtype_name, configs=[config],
                                             shared_limit=SHARED_LIMIT[arch], error=detail[-2000:])
                                rows[id(failed)] = failed
                            log(f"  sm_{arch} {config}: {time.perf_counter() - start:.1f} s")
    return list(rows.values())


# ---------------------------------------------------------------- CUDA, nvcc -Xptxas -v

CUDA_SOURCE = ROOT / "csrc" / "cuda" / "kernels.cu"
CUDA_TYPES = {"IfE": "float32", "I13__nv_bfloat16E": "bfloat16", "I6__halfE": "float16"}


def cuda_dynamic_shared_cap() -> int:
    """The most dynamic shared memory the CUDA launcher asks for (kMaxSharedBytes)."""
    found = re.search(r"kMaxSharedBytes\s*=\s*(\d+)\s*\*\s*1024", CUDA_SOURCE.read_text())
    if not found:
        raise SystemExit(f"compile_report: cannot find kMaxSharedBytes in {CUDA_SOURCE}")
    return int(found.group(1)) * 1024


def kernel_name(mangled: str) -> str:
    """The `*_kernel` identifier inside an Itanium-mangled name (<length><identifier> parts)."""
    for match in re.finditer(r"\d+", mangled):
        candidate = mangled[match.end():match.end() + int(match.group())]
        if candidate.endswith("_kernel"):
            return candidate
    return mangled


def cuda_rows(arch: int, tools: Tools, log) -> list[Row]:
    with tempfile.TemporaryDirectory() as folder:
        obj = Path(folder) / f"kernels_sm{arch}.o"
        command = [tools.nvcc, "-std=c++17", "-O3", "-lineinfo", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
                   "-Xptxas", "-v", "-I", str(ROOT / "csrc"), "-c", str(CUDA_SOURCE), "-o", str(obj)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        log(f"  nvcc sm_{arch}: {seconds:.1f} s")
        if done.returncode != 0:
            return [Row(compiler="nvcc", arch=arch, kernel="kernels.cu", variant="", dtype="",
                        shared_limit=SHARED_LIMIT[arch], error=(done.stderr or done.stdout)[-2000:],
                        compile_s=round(seconds, 2))]
        sass = subprocess.run([tools.cuobjdump, "-sass", str(obj)], check=True, capture_output=True,
                              text=True).stdout
    tensor_ops: dict[str, int] = {}
    for section in re.split(r"\n\s*Function : ", sass)[1:]:
        name = section.split("\n", 1)[0].strip()
        tensor_ops[name] = len(TENSOR_CORE_SASS.findall(section))
    dynamic = cuda_dynamic_shared_cap()
    rows = []
    # ptxas -v: "Compiling entry function 'NAME' for 'sm_XX'" then its resource lines
    for name, body in re.findall(r"Compiling entry function '([^']+)' for 'sm_\d+a?'\n(.*?)(?=Compiling entry|\Z)",
                                 done.stderr, flags=re.S):
        dtype = next((label for code, label in CUDA_TYPES.items() if code in name), "any")
        usage = parse_ptxas(body)
        static = re.search(r"(\d+) bytes smem", body)
        rows.append(Row(compiler="nvcc", arch=arch, kernel=kernel_name(name),
                        variant=name, dtype=dtype, configs=["all shapes (BT chosen at run time)"],
                        shared=(int(static.group(1)) if static else 0) + dynamic, shared_limit=SHARED_LIMIT[arch],
                        num_warps=0, has_products=True, tensor_core_ops=tensor_ops.get(name, 0),
                        compile_s=round(seconds, 2), **usage))
    if not rows:
        rows.append(Row(compiler="nvcc", arch=arch, kernel="kernels.cu", variant="", dtype="",
                        shared_limit=SHARED_LIMIT[arch], error="ptxas reported no kernels"))
    return rows


# ---------------------------------------------------------------- output


def print_table(rows: list[Row], out=sys.stdout) -> None:
    header = (f"{'compiler':<7} {'arch':>5} {'kernel':<28} {'dtype':<9} {'regs':>4} {'spill':>9} {'stack':>5} "
              f"{'shared KB':>10} {'warps':>5} {'TC ops':>6} {'uses':>4} {'s':>5}  status")
    print(header, file=out)
    for r in sorted(rows, key=lambda r: (r.compiler, r.arch, r.kernel, r.dtype, r.variant)):
        status = "; ".join(r.problems) or "ok"
        if r.error:
            status += ": " + r.error.splitlines()[-1][:120]
        print(f"{r.compiler:<7} {'sm_' + str(r.arch):>5} {r.kernel[:28]:<28} {r.dtype:<9} {r.registers:>4} "
              f"{f'{r.spill_stores}/{r.spill_loads}':>9} {r.stack:>5} "
              f"{f'{r.shared / 1024:.1f}/{r.shared_limit // 1024}':>10} {r.num_warps:>5} "
              f"{r.tensor_core_ops if r.has_products else '-':>6} {len(r.configs):>4} {r.compile_s:>5.1f}  {status}",
              file=out)


def write_outputs(rows: list[Row], folder: Path, settings: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fields = [f for f in Row.__dataclass_fields__ if f != "configs"] + ["problems", "configs"]
    with open(folder / "report.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            record = asdict(r)
            record["problems"] = "; ".join(r.problems)
            record["configs"] = " ".join(r.configs)
            writer.writerow(record)
    payload = {"settings": settings, "rows": [dict(asdict(r), problems=r.problems) for r in rows]}
    (folder / "report.json").write_text(json.dumps(payload, indent=1))
    with open(folder / "report.txt", "w") as handle:
        print_table(rows, handle)


def rows_from_worker_processes(chosen: dict, args, log) -> list[Row]:
    """One child process per architecture (at most args.jobs at once); their rows merged."""
    pending, running, rows = list(chosen["archs"]), [], []
    with tempfile.TemporaryDirectory() as folder:
        while pending or running:
            while pending and len(running) < args.jobs:
                arch = pending.pop(0)
                command = [sys.executable, __file__, "--archs", str(arch), "--out", f"{folder}/sm_{arch}", "--quiet",
                           *(f"--{key}={','.join(map(str, chosen[key]))}" for key in ("shapes", "dtypes", "modes",
                                                                                      "options"))]
                command += ["--no-triton"] * args.no_triton + ["--no-cuda"] * args.no_cuda
                running.append((arch, subprocess.Popen(command, stdout=subprocess.DEVNULL)))
                log(f"sm_{arch}: compiling in process {running[-1][1].pid}")
            arch, process = running.pop(0)
            process.wait()
            record = Path(folder) / f"sm_{arch}" / "report.json"
            if not record.exists():
                rows.append(Row(compiler="report", arch=arch, kernel="(worker)", variant="", dtype="",
                                error=f"the worker for sm_{arch} exited {process.returncode} without a report"))
                continue
            fields = set(Row.__dataclass_fields__)
            rows += [Row(**{k: v for k, v in r.items() if k in fields}) for r in json.loads(record.read_text())["rows"]]
            log(f"sm_{arch}: done")
    return rows


def write_status(rows: list[Row], archs: list[int], settings: dict) -> None:
    """Per backend, the architectures where every one of its kernel variants is clean."""
    backend_of = {"triton": "triton", "nvcc": "cuda"}
    clean = {backend: [a for a in archs if not any(r.problems for r in rows if r.arch == a and r.compiler == compiler)]
             for compiler, backend in backend_of.items()}
    status = {"written_by": "python python/compile_report.py (full run)", "date": settings["date"],
              "triton": settings["triton"], "nvcc": settings["nvcc"], "clean": clean}
    STATUS_PATH.write_text(json.dumps(status, indent=1) + "\n")
    print(f"clean architectures per backend (for auto): {clean}; written to {STATUS_PATH}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=sorted(SUBSETS), help="a preset selection (ci: what CI runs)")
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)), help="e.g. 80,89,90")
    parser.add_argument("--shapes", default=",".join(s.label for s in AVE_SHAPES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--modes", default="train,eval")
    parser.add_argument("--options", default=",".join(OPTION_SETS), help="layer option sets: full, bare")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for report.csv/json/txt (default benchmarks/out/<date>-compile-report)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="architectures compiled in parallel processes (each uses one core)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # kernels defined under the interpreter never compile
        parser.error("TRITON_INTERPRET=1 is set; unset it, the report compiles real GPU code")

    chosen = dict(shapes=args.shapes.split(","), dtypes=args.dtypes.split(","), modes=args.modes.split(","),
                  options=args.options.split(","), archs=[int(a) for a in args.archs.split(",")])
    if args.subset:
        chosen.update(SUBSETS[args.subset])
    for key, allowed in (("shapes", SHAPES), ("dtypes", DTYPES), ("modes", ("train", "eval")),
                         ("options", OPTION_SETS), ("archs", SHARED_LIMIT)):
        unknown = [v for v in chosen[key] if v not in allowed]
        if unknown:
            parser.error(f"--{key}: unknown {unknown}; expected some of {sorted(allowed)}")
    log = (lambda *a: None) if args.quiet else (lambda text: print(text, flush=True))
    tools = find_tools()
    started = time.perf_counter()
    in_workers = args.jobs > 1 and len(chosen["archs"]) > 1
    rows: list[Row] = rows_from_worker_processes(chosen, args, log) if in_workers else []
    for arch in [] if in_workers else chosen["archs"]:
        if not args.no_triton:
            log(f"triton sm_{arch}:")
            rows += triton_rows(arch, [SHAPES[s] for s in chosen["shapes"]], chosen["dtypes"], chosen["modes"],
                                chosen["options"], tools, log)
        if not args.no_cuda:
            if tools.nvcc is None:
                rows.append(Row(compiler="nvcc", arch=arch, kernel="kernels.cu", variant="", dtype="",
                                shared_limit=SHARED_LIMIT[arch], error="nvcc not found on PATH"))
            else:
                rows += cuda_rows(arch, tools, log)
    elapsed = time.perf_counter() - started
    settings = dict(chosen, subset=args.subset, frames=FRAMES, seconds=round(elapsed, 1), date=str(date.today()),
                    triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
                    nvcc=subprocess.run([tools.nvcc, "--version"], capture_output=True, text=True).stdout.strip()
                    .splitlines()[-1] if tools.nvcc else None, cpu_count=os.cpu_count())
    out = args.out or ROOT / "benchmarks" / "out" / f"{date.today()}-compile-report"
    write_outputs(rows, out, settings)
    print_table(rows)
    bad = [r for r in rows if r.problems]
    full = not args.subset and all(getattr(args, key) == parser.get_default(key)
                                   for key in ("archs", "shapes", "dtypes", "modes", "options"))
    if full and not (args.no_triton or args.no_cuda):
        write_status(rows, chosen["archs"], settings)
    print(f"\n{len(rows)} kernel variants, {len(bad)} with problems; {elapsed:.0f} s; written to {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
