"""python/train_ave.py on tiny synthetic data, and a two-process gloo DDP step of the tiny
model (CPU)."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dgsct_kernels import train
from dgsct_kernels.models import build_dgsct, get_task, load_trainable

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "python" / "train_ave.py"
AVE = get_task("ave")


def _load_script():
    spec = importlib.util.spec_from_file_location("train_ave", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_runs_on_tiny_synthetic_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    train_ave = _load_script()
    out = tmp_path / "run"
    summary = train_ave.main(["--synthetic-videos", "4,0,2", "--epochs", "1", "--max-steps", "1",
                              "--batch-size", "2", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    printed = captured.out
    assert "all-background baseline" in printed and "final test accuracy" in printed
    # how long it should take, at the start; how long it took, at the end
    assert "expected time: about" in captured.err and "took " in printed
    assert summary["expected_seconds"] > 0 and summary["seconds"] > 0
    assert [h["epoch"] for h in summary["history"]] == [1]
    assert summary["history"][0]["segments"] == 20  # the 2 test clips, 10 segments each
    assert 0 <= summary["final_acc"] <= 100 and 0 < summary["final_background_acc"] < 100
    model = build_dgsct("ave", "tiny", weights=out / "ave_tiny_best.safetensors")
    assert model.weights_report["dgsct"].loaded > 0
    load_trainable(model, out / "ave_tiny_last.safetensors")
    assert (tmp_path / "cache" / "dgsct_kernels").is_dir()
    # the saved file alone reproduces the evaluation (bn0 statistics included)
    again = train_ave.main(["--synthetic-videos", "4,0,2", "--eval-only", "--batch-size", "2",
                            "--dgsct-weights", str(out / "ave_tiny_best.safetensors"),
                            "--out", str(out), "--no-progress"])
    assert again["final_acc"] == summary["best_acc"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_main_trains_under_autocast(tmp_path, monkeypatch, dtype):
    """--autocast: one step in bf16 (fp16 with a GradScaler) on the CPU; weights stay float32."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    train_ave = _load_script()
    summary = train_ave.main(["--synthetic-videos", "4,0,2", "--epochs", "1", "--max-steps", "1",
                              "--batch-size", "2", "--out", str(tmp_path / "run"), "--no-progress",
                              "--autocast", dtype])
    assert math.isfinite(summary["history"][0]["train_loss"])
    assert 0 <= summary["final_acc"] <= 100


def test_parse_args_uses_preset_defaults():
    train_ave = _load_script()
    paper = train_ave.parse_args(["--preset", "paper"])
    assert (paper.batch_size, paper.accum_steps, paper.lr, paper.decay, paper.decay_epochs,
            paper.epochs, paper.early_stop, paper.seed) == (8, 2, 5e-4, 0.35, 3, 50, 20, 43)
    tiny = train_ave.parse_args(["--lr", "0.1"])
    assert tiny.preset == "tiny" and tiny.lr == 0.1
    with pytest.raises(SystemExit):
        train_ave.parse_args(["--batch-size", "0"])


def test_bad_arguments_are_named(capsys):
    train_ave = _load_script()
    for argv, named in ((["--synthetic-videos", "4,2"], "--synthetic-videos='4,2'"),
                        (["--synthetic-videos", "a,b,c"], "--synthetic-videos='a,b,c'"),
                        (["--synthetic-videos", "0,0,0"], "--synthetic-videos='0,0,0'"),
                        (["--max-steps", "-1"], "--max-steps=-1"), (["--epochs", "0"], "--epochs=0")):
        with pytest.raises(SystemExit):
            train_ave.parse_args(argv)
        assert named in capsys.readouterr().err


def test_default_run_is_sized_for_a_few_minutes_on_two_cores():
    """`python python/train_ave.py` without arguments: the tiny preset on 32 synthetic train
    clips for 10 epochs (enough to beat the all-background baseline clearly, 71% against 39%
    when measured), which the per-clip costs measured on 2 cores put under 3 minutes."""
    train_ave = _load_script()
    args = train_ave.parse_args([])
    assert (args.preset, args.synthetic_videos, args.epochs, args.batch_size) == ("tiny", "32,8,16", 10, 4)
    expected = train.expected_seconds(args, AVE, torch.device("cpu"), 32, 16, world=1)
    assert 30 < expected <= 180
    # --max-steps and more processes shrink each process's share; no figure for other presets
    smoke = train_ave.parse_args(["--max-steps", "1", "--batch-size", "2", "--epochs", "1"])
    assert train.clips_per_epoch(32, smoke, world=2) == 2
    assert train.expected_seconds(smoke, AVE, torch.device("cpu"), 32, 16, world=2) < expected / 2
    paper = train_ave.parse_args(["--preset", "paper"])
    assert train.expected_seconds(paper, AVE, torch.device("cpu"), 32, 16, world=1) is None


def test_threads_follow_the_cores_other_processes_leave_free(monkeypatch):
    """Fewer threads at once when other processes take cores, more again after 3 quieter
    steps; the measurement leaves out this process's own CPU time (dgsct_kernels.cpu_load,
    which the script uses)."""
    from dgsct_kernels import cpu_load
    monkeypatch.setattr(cpu_load.os, "cpu_count", lambda: 2)
    totals = [0, 0, 0.0, 0.0]  # busy ticks, all ticks, own CPU s, wall s (100 ticks a core-second)
    steps = iter([(1.0, 1.0)] + [(0.0, 1.0)] * 3 + [(1.5, 0.5), (0.4, 1.6)])  # (others, own) cores

    def one_second_later():
        others, own = next(steps)
        totals[0] += round(100 * (others + own))
        totals[1] += 200
        totals[2] += own
        totals[3] += 1.0
        return cpu_load.CpuSample(*totals)

    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(cpu_load, "cpu_sample", lambda: cpu_load.CpuSample(*totals))
        threads = cpu_load.FreeCoreThreads(most=2)  # marks the start
        monkeypatch.setattr(cpu_load, "cpu_sample", one_second_later)
        seen = []
        for _ in range(6):
            threads.update()
            seen.append(torch.get_num_threads())
        assert seen == [1, 1, 1, 2, 1, 1]
    finally:
        torch.set_num_threads(original)


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        model = build_dgsct("ave", "tiny", backend="reference")
        with torch.no_grad():  # open the gates so every module's parameters get gradients
            for m in model.encoder.adapter_modules():
                m.gate.fill_(0.5)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-3)
        g = torch.Generator().manual_seed(100 + rank)  # different data per process
        frames = torch.randn(1, 10, 3, 64, 64, generator=g)
        audio = 0.1 * torch.randn(1, 10, 32000, generator=g)
        out = ddp(frames=frames, audio=audio)
        (out["is_event"].square().mean() + out["event"].logsumexp(-1).mean()).backward()
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                           for p in params])
        optimizer.step()
        weights = torch.cat([p.detach().flatten() for p in params])
        first = model.encoder.vis_adapter_blocks_p1[0].conv_adapter.weight.grad
        torch.save({"grads": grads, "weights": weights, "first": first.abs().sum()},
                   f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_ddp_step(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "rendezvous"), str(tmp_path / "result")),
             nprocs=world, join=True)
    results = [torch.load(tmp_path / f"result.{r}") for r in range(world)]
    # DDP averaged the gradients, so both processes took the same step
    torch.testing.assert_close(results[0]["grads"], results[1]["grads"], rtol=0, atol=0)
    torch.testing.assert_close(results[0]["weights"], results[1]["weights"], rtol=0, atol=0)
    assert results[0]["grads"].abs().sum() > 0 and results[0]["first"] > 0


def test_train_ave_under_torchrun(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(SCRIPT), "--synthetic-videos", "4,0,2", "--epochs", "1",
           "--max-steps", "1", "--batch-size", "1", "--accum-steps", "2", "--no-progress",
           "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 processes" in done.stderr + done.stdout
    assert "all-background baseline" in done.stdout
    assert (tmp_path / "run" / "ave_tiny_last.safetensors").is_file()
