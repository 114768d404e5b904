"""benchmarks/run.py writes its three result files with one row per (shape, mode, backend).

No timing assertions: only that the runner runs end to end and its outputs have the
promised structure.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgsct_kernels import dispatch
from dgsct_kernels.backends.reference import ReferenceBackend

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
COLUMNS = ["device", "device_name", "torch", "triton", "date", "backend", "shape", "N", "C", "M",
           "D", "F", "dtype", "mode", "median_ms", "p10_ms", "p90_ms", "repeats",
           "speedup_vs_eager", "saved_bytes", "saved_over_x", "saved_activation_bytes",
           "floor_bytes", "plan_bytes", "achieved_gbps", "vs_bandwidth_floor", "roofline_ms", "vs_roofline",
           "gemm_gflops_fp32", "gemm_gflops_bf16", "gemm_gflops_fp16", "gemm_gflops_fp64", "call_flops",
           "call_gflops", "call_fraction_of_gemm", "guide_order", "guide_dtype", "guide_flops", "guide_ms",
           "guide_gflops", "guide_gemm_gflops", "guide_fraction_of_gemm", "guide_unmeasured_reason"]
MODES = ["eval-fwd", "train-fwd+bwd"]


def run_benchmark(out: Path, *args: str) -> tuple[list[dict], dict]:
    command = [sys.executable, str(BENCHMARKS / "run.py"), "--device", "cpu", "--repeats", "1",
               "--warmup", "0", "--out", str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    with open(out / "results.json") as f:
        results = json.load(f)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert done.stdout.count("\n") >= len(rows) + 2  # the table: header, rule, one line a row
    return rows, results, done


def supporting_backends(shape_label: str, training: bool, monkeypatch) -> set[str]:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from shapes import SHAPES

    problem = dispatch.Problem("cpu", torch.float32, SHAPES[shape_label].dims(), 10, training, True)
    return {b.name for b in dispatch.registered_backends() if b.supports(problem)}


def test_tiny_run_writes_one_row_per_shape_mode_backend(tmp_path, monkeypatch):
    rows, results, printed = run_benchmark(tmp_path, "--shapes", "tiny", "--no-compile")

    keys = [(r["shape"], r["mode"], r["backend"]) for r in rows]
    expected = {(shape, mode, backend)
                for shape in ("tiny-visual", "tiny-audio") for mode in MODES
                for backend in {"eager"} | supporting_backends(shape, mode != "eval-fwd", monkeypatch)}
    assert len(keys) == len(set(keys)) and set(keys) == expected

    assert [{k: str(v) if v is not None else "" for k, v in r.items()} for r in results["rows"]] == rows
    header = results["header"]
    for key in ("device_name", "torch", "triton", "python", "cpu_count", "date", "command",
                "busy_cores_before", "busy_cores_between", "busy_cores_after", "busy_warning",
                "estimated_s", "elapsed_s", "run_size"):
        assert key in header
    assert header["compile_mode"] is None and header["compile_shapes"] == []
    assert len(header["busy_cores_between"]) == 3  # sampled between the 4 cases
    # what the run will do and how long it should take, first; how long it took, last
    assert "4 cases: shapes tiny-visual, tiny-audio" in printed.stderr
    assert "estimate: about" in printed.stderr
    assert printed.stdout.rstrip().splitlines()[-1].startswith("took ")
    # every column of the table has a line of the legend
    table_header = printed.stdout.splitlines()[0]
    legend = printed.stdout.split("columns ('-': not measured for that row):\n")[1].splitlines()
    for column in ("shape", "mode", "backend", "median ms", "p10-p90 ms", "vs eager", "saved MB",
                   "saved/x", "activ. MB", "x floor", "GB/s", "x roofline", "GFLOP/s", "of gemm",
                   "guide GFLOP/s", "guide of gemm"):
        assert column in table_header
        assert sum(line.strip().startswith(column + "  ") for line in legend) == 1, column
    for row in rows:
        assert float(row["median_ms"]) > 0 and row["F"] == "10" and row["dtype"] == "float32"
        measured = row["mode"] == "train-fwd+bwd"
        assert (row["saved_bytes"] != "") == measured and (row["saved_over_x"] != "") == measured
        if row["backend"] == "eager":
            assert float(row["speedup_vs_eager"]) == 1.0
            assert measured == (row["saved_activation_bytes"] not in ("", "0"))
    check_efficiency_columns(rows, header, printed.stdout)


def positive(value: str) -> bool:
    return value != "" and math.isfinite(float(value)) and float(value) > 0


def check_efficiency_columns(rows: list[dict], header: dict, stdout: str) -> None:
    """GEMM rates, the call's and the guide path's FLOPs and rates: positive and finite where
    defined, and where a guide path is not timed apart, a reason instead."""
    assert list(header["columns"]) == COLUMNS and all(header["columns"].values())
    assert positive(str(header["gemm_gflops_fp32"])) and positive(str(header["gemm_gflops_bf16"]))
    assert (header["gemm_gflops_fp16"] is None) == ("fp16" in header["gemm_unmeasured"])
    assert "GEMM rate, GFLOP/s" in stdout and f"fp32 {header['gemm_gflops_fp32']:.0f}" in stdout
    for row in rows:
        assert row["gemm_gflops_fp32"] == str(header["gemm_gflops_fp32"])
        for column in ("call_flops", "call_gflops", "call_fraction_of_gemm", "guide_flops"):
            assert positive(row[column]), (row["backend"], column)
        # triton runs tokens-first, the tiny shapes' order, through prompts_and_pooled_guide
        timed_apart = row["backend"] == "eager" or (row["backend"] in ("cpu", "reference", "triton")
                                                     and row["mode"] == "eval-fwd")
        for column in ("guide_ms", "guide_gflops", "guide_gemm_gflops", "guide_fraction_of_gemm"):
            assert positive(row[column]) == timed_apart, (row["backend"], row["mode"], column)
        assert (row["guide_unmeasured_reason"] == "") == timed_apart
        expected_order = "as-written" if row["backend"] in ("eager", "reference") else "tokens-first"
        assert row["guide_order"] == expected_order  # plan_guide_path's choice at the tiny shapes


def test_guide_and_call_flops_match_a_hand_count(monkeypatch):
    """tiny-visual, F=10: N=36, C=32, M=64, D=16, K=32, H=4, G=2, counted by hand from
    SPEC.md's cost model; every order also agrees with plan_guide_path at every shape."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from shapes import AVE_SHAPES, SHAPES, TINY_SHAPES, call_flops, guide_flops

    from dgsct_kernels.guide_path import ORDERS, plan_guide_path

    tiny = SHAPES["tiny-visual"]
    # 2FNMD + 2FNDC + 4FKNC
    assert guide_flops(tiny, 10, "as-written") == 737_280 + 368_640 + 1_474_560
    # 2FK(2MN + 2MD + DC)
    assert guide_flops(tiny, 10, "rewritten") == 640 * (4608 + 2048 + 512)
    # steps 3-9: 4FNKC + 2FNC^2 + 2FNC(C/2) + 2FN(C/2) + 4FNH(C/G)
    target = 1_474_560 + 737_280 + 368_640 + 11_520 + 92_160
    assert call_flops(tiny, 10, "as-written", training=False) == 2_580_480 + target
    assert call_flops(tiny, 10, "rewritten", training=True) == 3 * (4_587_520 + target)
    for shape in AVE_SHAPES + TINY_SHAPES:
        flops = plan_guide_path(80, shape.tokens, shape.guide_tokens, shape.guide_dim, shape.dim, 32).flops
        assert {order: guide_flops(shape, 80, order) for order in ORDERS} == flops, shape.label


def test_gemm_rate_is_measured_per_dtype(monkeypatch):
    run = import_runner(monkeypatch)
    from shapes import SHAPES, guide_products

    products = guide_products(SHAPES["tiny-audio"], 10, "rewritten")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if run.gemm_unsupported_reason(torch.device("cpu"), dtype) is None:
            rate = run.gemm_gflops(products, dtype, torch.device("cpu"))
            assert math.isfinite(rate) and rate > 0, dtype
    args = run.parse_args(["--device", "cpu", "--shapes", "tiny-audio", "--dtype", "bfloat16"])
    env = {}
    run.measure_gemm_rates(args, env)
    for tag in ("fp32", "bf16", "fp16"):
        rate = env[f"gemm_gflops_{tag}"]
        assert (rate is None) == (tag in env["gemm_unmeasured"])
        assert rate is None or (math.isfinite(rate) and rate > 0)
    assert env["gemm_gflops_fp64"] is None
    assert set(env["gemm_gflops_by_products"]["bf16"]["tiny-audio"]) == {"as-written", "tokens-first"}


def test_time_budget_stops_starting_cases_and_keeps_the_rows(tmp_path):
    """A spent budget skips the remaining cases, and the rows run so far are written."""
    rows, results, _ = run_benchmark(tmp_path, "--shapes", "tiny", "--no-compile", "--time-budget", "0")
    assert {(r["shape"], r["mode"]) for r in rows} == {("tiny-visual", "eval-fwd")}
    assert results["header"]["skipped_cases"] == ["tiny-visual train-fwd+bwd", "tiny-audio eval-fwd",
                                                  "tiny-audio train-fwd+bwd"]


@pytest.mark.slow
def test_compile_baseline_is_timed_and_its_saved_tensors_counted(tmp_path):
    rows, results, _ = run_benchmark(tmp_path, "--shapes", "tiny-visual", "--modes", "train-fwd+bwd")

    assert results["header"]["compile_mode"] == "default"
    compiled = [r for r in rows if r["backend"] == "compile"]
    assert len(compiled) == 1
    # the compiled graph keeps activations, and the hooks must have seen them
    assert int(compiled[0]["saved_activation_bytes"]) > 0


class CopiedBackend(ReferenceBackend):
    name = "test-copy"


class WrongBackend(ReferenceBackend):
    name = "test-wrong"

    def forward(self, x, g, params, hyper, training):
        out = super().forward(x, g, params, hyper, training)
        return out._replace(residual=out.residual * 1.01)


def import_runner(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run

    return run


def test_backends_are_found_at_run_time_and_checked_against_eager(tmp_path, monkeypatch):
    run = import_runner(monkeypatch)
    argv = ["--device", "cpu", "--shapes", "tiny-visual", "--modes", "eval-fwd", "--no-compile",
            "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    monkeypatch.setitem(dispatch._REGISTRY, CopiedBackend.name, CopiedBackend())
    assert CopiedBackend.name in {r["backend"] for r in run.main(argv)}

    monkeypatch.setitem(dispatch._REGISTRY, WrongBackend.name, WrongBackend())
    with pytest.raises(RuntimeError, match="test-wrong on tiny-visual eval-fwd: residual differs"):
        run.main(argv)


def test_bad_arguments_are_named(monkeypatch, capsys):
    run = import_runner(monkeypatch)

    for argv, named in ((["--frames", "15"], "--frames=15"), (["--shapes", "s9"], "--shapes='s9'"),
                        (["--modes", "train"], "--modes"), (["--repeats", "0"], "--repeats=0"),
                        (["--compile-shapes", "s9"], "--compile-shapes='s9'"),
                        (["--compile-shapes", "s1-visual"], "--compile-shapes='s1-visual'"),
                        (["--compile-shapes", "all", "--no-compile"], "--compile-shapes='all'")):
        with pytest.raises(SystemExit):
            run.parse_args(["--device", "cpu", *argv])
        assert named in capsys.readouterr().err


def labels(shapes) -> list[str]:
    return [s.label for s in shapes]


def test_cpu_default_is_quick_and_full_is_behind_a_flag(monkeypatch):
    """A first CPU run takes minutes, not a quarter of an hour: the stage-2 pair, few calls,
    and torch.compile (15-50 s of warm-up a case) on one shape; --full and explicit flags
    bring back the rest. GPU defaults stay full."""
    run = import_runner(monkeypatch)
    quick = run.parse_args(["--device", "cpu"])
    assert quick.run_size == "quick"
    assert labels(quick.shapes) == ["s2-visual", "s2-audio"] and labels(quick.compile_shapes) == ["s2-visual"]
    assert (quick.repeats, quick.warmup) == (5, 1)

    full = run.parse_args(["--device", "cpu", "--full"])
    assert full.run_size == "full" and labels(full.shapes) == ["s1-visual", "s1-audio", "s2-visual", "s2-audio"]
    assert full.compile_shapes == full.shapes and (full.repeats, full.warmup) == (10, 2)

    explicit = run.parse_args(["--device", "cpu", "--full", "--shapes", "s3", "--repeats", "3",
                               "--compile-shapes", "s3-audio"])
    assert labels(explicit.shapes) == ["s3-visual", "s3-audio"] and explicit.repeats == 3
    assert labels(explicit.compile_shapes) == ["s3-audio"] and explicit.warmup == 2
    assert run.parse_args(["--device", "cpu", "--compile-shapes", "all"]).compile_shapes == quick.shapes
    assert run.parse_args(["--device", "cpu", "--no-compile"]).compile_shapes == []

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = run.parse_args(["--device", "cuda"])
    assert gpu.run_size == "full" and labels(gpu.shapes) == labels(run.select_shapes("all"))
    assert gpu.compile_shapes == gpu.shapes and (gpu.repeats, gpu.warmup, gpu.frames) == (50, 10, 80)


def test_quick_cpu_default_fits_three_minutes_by_its_own_estimate(monkeypatch):
    """The estimate printed at the start, for the default on a 2-core CPU's matmul rate
    (250 GFLOP/s), plus 15 s of start-up, stays within 3 minutes; --full does not."""
    run = import_runner(monkeypatch)

    def estimate(*argv):
        args = run.parse_args(["--device", "cpu", *argv])
        cases = [(shape, mode) for shape in args.shapes for mode in args.modes]
        return run.estimate_seconds(cases, args, gflops=250.0)

    total, compile_s = estimate()
    assert 0 < compile_s < total and total + 15 <= 180
    assert estimate("--full")[0] > 2 * total
    assert estimate("--no-compile")[1] == 0


def fake_rows(shapes: int, backends: int, mode: str = "eval-fwd") -> list[dict]:
    """Rows with close medians (labels that would collide horizontally) and wide spreads."""
    return [{"mode": mode, "shape": f"shape-{i}", "backend": f"backend-{j}",
             "median_ms": 1234.5 + j, "p10_ms": 1000.0 + j, "p90_ms": 1500.0 + 7 * j}
            for i in range(shapes) for j in range(backends)]


ENV = {"device": "cpu", "device_name": "Test CPU", "dtype": "float32", "frames": 10, "cpu_count": 2}


@pytest.mark.parametrize("shapes, backends", [(2, 4), (8, 7)])
def test_plot_value_labels_do_not_overlap(monkeypatch, shapes, backends):
    run = import_runner(monkeypatch)
    import matplotlib.pyplot as plt

    rows = fake_rows(shapes, backends) + fake_rows(shapes, backends, "train-fwd+bwd")
    # like the quick CPU run: the second contender timed on the first shape only
    rows = [r for r in rows if r["backend"] != "backend-1" or r["shape"] == "shape-0"]
    fig = run.draw_figure(rows, ENV)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(lambda a: a.get_gid() == "value-label")]
    assert len(texts) == len(rows) and {t.get_text() for t in texts} == {
        run.value_label(r["median_ms"]) for r in rows}
    boxes = [t.get_window_extent(renderer) for t in texts]
    figure_box = fig.bbox
    for i, box in enumerate(boxes):
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1
        assert figure_box.y0 <= box.y0 and box.y1 <= figure_box.y1, texts[i].get_text()
        assert not any(box.overlaps(other) for other in boxes[i + 1:]), texts[i].get_text()
    legends = [ax.get_legend() for ax in fig.axes]
    assert all([t.get_text() for t in legend.get_texts()] == [f"backend-{j}" for j in range(backends)]
               for legend in legends)
    legend_boxes = [legend.get_window_extent(renderer) for legend in legends]
    assert not any(box.overlaps(legend) for box in boxes for legend in legend_boxes)
    plt.close(fig)


def test_busy_machine_is_marked_in_output_json_and_plot(tmp_path, monkeypatch, capsys):
    run = import_runner(monkeypatch)
    assert run.busy_warning({**ENV, "busy_cores_before": 0.1, "busy_cores_between": [0.4],
                             "busy_cores_after": None}) is None
    assert run.busy_warning({**ENV, "device": "cuda:0", "busy_cores_before": 3.0}) is None
    quiet = run.busy_cores(0.05)
    assert quiet is None or quiet >= 0

    samples = iter([0.0, 1.2, 0.1])  # before, between the two cases, after
    monkeypatch.setattr(run, "busy_cores", lambda interval_s=0.25: next(samples))
    argv = ["--device", "cpu", "--shapes", "tiny", "--modes", "eval-fwd", "--no-compile",
            "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    run.main(argv)
    printed = capsys.readouterr()
    header = json.loads((tmp_path / "results.json").read_text())["header"]
    assert (header["busy_cores_before"], header["busy_cores_between"], header["busy_cores_after"]) == (
        0.0, [1.2], 0.1)
    assert "BUSY MACHINE" in header["busy_warning"] and "1.2 of 2 cores" in header["busy_warning"]
    assert header["busy_warning"] in printed.out and "1.2 of 2 cores busy" in printed.err

    import matplotlib.pyplot as plt
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    fig = run.draw_figure(rows, header)
    assert "BUSY MACHINE" in fig.get_suptitle()
    assert all(any(t.get_text() == "BUSY MACHINE" for t in ax.texts) for ax in fig.axes)
    plt.close(fig)
    quiet_fig = run.draw_figure(rows, {**header, "busy_warning": None})
    assert quiet_fig.get_suptitle() == ""
    assert not any(t.get_text() == "BUSY MACHINE" for ax in quiet_fig.axes for t in ax.texts)
    plt.close(quiet_fig)


def test_gpu_winners_feed_auto(tmp_path, monkeypatch):
    """The runner's winners rows are the table `auto` reads to choose between GPU backends."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run
    from dgsct_kernels import measured
    from dgsct_kernels.config import Dims

    def row(backend, ms, mode="train-fwd+bwd"):
        return {"device": "cuda", "device_name": "GPU X", "dtype": "bfloat16", "mode": mode,
                "N": 36, "C": 1536, "M": 64, "D": 768, "F": 80, "backend": backend, "median_ms": ms}

    rows = [row("eager", 9.0), row("triton", 2.0), row("cuda", 3.0), row("cuda", 1.0, "eval-fwd"),
            row("triton", 4.0, "eval-fwd"), {**row("triton", 0.5), "device": "cpu"}]
    winners = run.measured_winners(rows)
    assert sorted((w["mode"], w["winner"]) for w in winners) == [("eval-fwd", "cuda"),
                                                                ("train-fwd+bwd", "triton")]
    table = tmp_path / "winners.json"
    table.write_text(json.dumps(winners))
    read = measured.load_table.__wrapped__
    monkeypatch.setattr(measured, "load_table", lambda: read(table))
    monkeypatch.setattr(measured, "current_cuda_device_name", lambda: "GPU X")
    dims = Dims(tokens=36, dim=1536, guide_tokens=64, guide_dim=768, num_latents=32, hidden=192, groups=2)

    def reasons(backend, dtype, training, d=dims):
        return measured.gpu_auto_reasons(backend, dispatch.Problem("cuda", dtype, d, 80, training, True))

    monkeypatch.setattr(measured, "current_cuda_arch", lambda: 90)
    monkeypatch.setattr(measured, "load_compile_status", lambda: {})  # no estimate possible
    assert reasons("triton", torch.bfloat16, True) == []
    assert "slower than 'triton'" in reasons("cuda", torch.bfloat16, True)[0]
    assert reasons("cuda", torch.bfloat16, False) == []
    assert "not yet measured on GPU X" in reasons("cuda", torch.float16, False)[0]
    other = Dims(tokens=37, dim=1536, guide_tokens=64, guide_dim=768, num_latents=32, hidden=192, groups=2)
    assert "not yet measured" in reasons("triton", torch.bfloat16, True, other)[0]


def test_unmeasured_gpu_calls_go_to_the_lower_roofline_among_compile_clean_backends(monkeypatch, caplog):
    from dgsct_kernels import measured
    from dgsct_kernels.config import Dims

    monkeypatch.setattr(measured, "load_table", lambda: {})
    monkeypatch.setattr(measured, "current_cuda_device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(measured, "current_cuda_arch", lambda: 90)
    # both backends must be runnable for the estimate to compare them (a build without CUDA kernels
    # leaves cuda out, which this test also covers through the clean-list cases)
    for backend in (dispatch.get_backend("triton"), dispatch.get_backend("cuda")):
        monkeypatch.setattr(backend, "not_supported_reasons", lambda problem: [])
    dims = Dims(tokens=2304, dim=192, guide_tokens=4096, guide_dim=96, num_latents=32, hidden=24, groups=2)
    problem = dispatch.Problem("cuda", torch.bfloat16, dims, 80, True, True)

    def choose(status):
        monkeypatch.setattr(measured, "load_compile_status", lambda: status)
        measured.estimated_winner.cache_clear()
        return {name: measured.gpu_auto_reasons(name, problem) for name in ("triton", "cuda")}

    nothing_clean = choose({})
    assert all("no GPU backend passed the compile report for sm_90" in r[0] for r in nothing_clean.values())
    only_cuda = choose({"cuda": frozenset({90})})
    assert only_cuda["cuda"] == [] and "not in the compile report's clean list" in only_cuda["triton"][0]
    wrong_arch = choose({"cuda": frozenset({80}), "triton": frozenset({80})})
    assert all(r for r in wrong_arch.values())
    with caplog.at_level(logging.INFO, logger="dgsct_kernels"):
        both = choose({"cuda": frozenset({90}), "triton": frozenset({90})})
    winner, floors = measured.estimated_winner(problem, 90, "NVIDIA H100 80GB HBM3")
    assert set(floors) == {"triton", "cuda"} and floors[winner] == min(floors.values())
    assert both[winner] == [] and "roofline estimate" in both[next(n for n in floors if n != winner)][0]
    assert "is a roofline estimate of the forward" in caplog.text
    # sm_89 devices are covered by the sm_89 report, sm_86 too (same shared-memory limit)
    assert measured.checked_arch(86) == 89 and measured.checked_arch(75) is None


def test_committed_winners_table_is_well_formed():
    from dgsct_kernels import measured
    measured.load_table.cache_clear()
    for key, winner in measured.load_table().items():
        assert winner in dispatch.backend_names(), (key, winner)
