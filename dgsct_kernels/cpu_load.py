"""How busy the other processes keep this machine's CPU cores, and torch threads to match.

On a shared CPU a torch thread that shares its core with another process stalls every
parallel region of the others: with one of 2 cores busy, 2-thread training steps of the
tiny AVE model took 12-29 s here against 0.45 s on 1 thread (benchmarks/NOTES.md,
issue 11). The benchmark and the training script use this to record the load next to
their timings and to run on the cores that are free. Linux only (/proc/stat); elsewhere
every function reports "unknown" (None) and nothing changes.
"""
from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple, Optional

import torch

log = logging.getLogger("dgsct_kernels")


class CpuSample(NamedTuple):
    busy_ticks: int  # all cores: user nice system irq softirq steal
    total_ticks: int
    own_cpu_s: float  # this process's CPU time
    wall_s: float


def cpu_sample() -> Optional[CpuSample]:
    try:
        with open("/proc/stat") as stat:  # cpu user nice system idle iowait irq softirq steal
            ticks = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return CpuSample(sum(ticks) - ticks[3] - ticks[4], sum(ticks), time.process_time(),
                     time.perf_counter())


def others_busy(before: CpuSample, after: CpuSample) -> float:
    """Cores kept busy between two samples by other processes (and the hypervisor's steal);
    this process's own CPU time, OpenMP threads spinning after a call included, is not
    counted."""
    cores = os.cpu_count() or 1
    all_busy = (after.busy_ticks - before.busy_ticks) / max(after.total_ticks - before.total_ticks, 1) * cores
    own = (after.own_cpu_s - before.own_cpu_s) / max(after.wall_s - before.wall_s, 1e-9)
    return max(all_busy - own, 0.0)


def busy_cores(interval_s: float = 0.25) -> Optional[float]:
    """Cores other processes keep busy while this one sleeps `interval_s`; None if unknown."""
    before = cpu_sample()
    time.sleep(interval_s)
    after = cpu_sample()
    if before is None or after is None:
        return None
    return round(others_busy(before, after), 2)


def threads_beside(busy: Optional[float], most: int) -> int:
    """Torch threads for the cores other processes leave free (at least 1, at most `most`)."""
    if busy is None:
        return most
    return max(1, min(most, int((os.cpu_count() or 1) - busy + 0.5)))


class FreeCoreThreads:
    """Keeps torch's CPU threads at the cores other processes leave free (1 to `most`).

    Call `update()` after each step: it measures the others' load over that step (no
    extra waiting), drops threads at once and adds them back after 3 quieter steps in a
    row, so a flapping load does not thrash.
    """

    def __init__(self, most: int):
        self.most = most
        self.quieter_steps = 0
        self.mark = cpu_sample()
        if self.mark is not None:
            time.sleep(0.25)  # a first measurement before any step
            self.update()

    def update(self) -> None:
        now = cpu_sample()
        if now is None or self.mark is None:
            return
        others = others_busy(self.mark, now)
        self.mark = now
        fit = threads_beside(others, self.most)
        current = torch.get_num_threads()
        self.quieter_steps = self.quieter_steps + 1 if fit > current else 0
        if fit < current or self.quieter_steps >= 3:
            log.info("other processes keep %.1f of %d cores busy: %d torch thread%s from now on "
                     "(--threads N fixes the number)", others, os.cpu_count() or 1, fit,
                     "" if fit == 1 else "s")
            torch.set_num_threads(fit)
            self.quieter_steps = 0
