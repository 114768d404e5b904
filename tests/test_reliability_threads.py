"""Reliability: one module called from two threads at once gives one thread's results.

Inference servers share a module between request threads. In eval mode the module's
state does not change, so two threads calling it at the same time, each with its own
inputs, must get bit for bit what one thread gets (outputs, and with grad enabled the
gradients of x, g and the parameters taken with `torch.autograd.grad`, which writes no
shared .grad). The calls are timed to overlap (a barrier per round) and repeated, with
the threads' inputs differing so that any shared scratch memory would mix them up.
What is shared and checked here: the cpu backend's workspaces (per calling thread,
csrc/cpu/fused.cpp `workspace`), the intra-op thread pool, the op registry, and
dispatch's log-once set and thread-local `use_backend` scope.

The triton backend runs under the Triton interpreter here, which patches
`triton.language` globals while a kernel runs; the backend serialises interpreted calls
with a lock (two threads failed with "InterpreterError: Did you forget to add
@triton.jit ?" before it), and is checked with fewer rounds because the interpreter is slow.
"""
import logging
import threading
import time

import pytest
import torch

from dgsct_kernels import dispatch, use_backend
from _support import Case, make_inputs, make_module, runnable_backends

CASE = Case(frames=4, tokens=48, dim=24, guide_tokens=10, guide_dim=8, num_latents=4, reduction=3, segments=2)
THREADS, ROUNDS = 2, 25
INTERPRETED_ROUNDS = 3
BACKENDS = runnable_backends()


def _inputs(count, dtype=torch.float32):
    return [make_inputs(CASE, seed=10 * i, dtype=dtype) for i in range(count)]


def _forward(module, x, g):
    with torch.no_grad():
        return tuple(t.clone() for t in module(x, g))


def _forward_backward(module, x, g):
    x, g = x.clone().requires_grad_(), g.clone().requires_grad_()
    out = module(x, g)
    loss = (out.residual.pow(2).sum() + (out.spatial_map * torch.arange(CASE.tokens)).sum()
            + out.temporal_gate.sum())
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, g, *params], allow_unused=True)
    return tuple(t.detach() for t in out) + tuple(gr for gr in grads if gr is not None)


def _run_concurrently(work, per_thread, rounds=ROUNDS):
    """Each thread runs `work(i)` for its own items round after round; returns
    results[thread][round] and re-raises the first error of any thread."""
    barrier = threading.Barrier(len(per_thread))
    results = [[] for _ in per_thread]
    errors = []

    def body(t):
        try:
            for r in range(rounds):
                barrier.wait()  # start every round together so the calls overlap
                results[t].append(work(per_thread[t][r % len(per_thread[t])]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(t,)) for t in range(len(per_thread))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


def _check(call, backend, dtype=torch.float32):
    module = make_module(CASE, dtype=dtype, gamma=0.2, backend=backend).eval()
    inputs = _inputs(2 * THREADS, dtype)
    expected = [call(module, x, g) for x, g in inputs]  # one thread
    # thread t cycles over its own two inputs, so neighbours always differ
    per_thread = [[2 * t, 2 * t + 1] for t in range(THREADS)]
    rounds_wanted = INTERPRETED_ROUNDS if backend == "triton" else ROUNDS
    results = _run_concurrently(lambda i: (i, call(module, *inputs[i])), per_thread, rounds_wanted)
    for t, rounds in enumerate(results):
        assert len(rounds) == rounds_wanted
        for r, (i, got) in enumerate(rounds):
            for k, (a, b) in enumerate(zip(got, expected[i])):
                if not torch.equal(a, b):
                    raise AssertionError(
                        f"{backend}: thread {t} round {r} result {k} differs from the one-thread "
                        f"result (max |diff| {(a.double() - b.double()).abs().max().item():.3g})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_eval_no_grad(backend):
    _check(_forward, backend)


# the interpreted triton backward takes ~40 s here; its lock is the forward's, checked above
COMPILED_BACKENDS = [b for b in BACKENDS if b != "triton"]


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_two_threads_eval_with_gradients(backend):
    _check(_forward_backward, backend)


@pytest.mark.parametrize("backend", [b for b in COMPILED_BACKENDS if b != "reference"])
def test_two_threads_eval_bfloat16(backend):
    """bf16 takes the cpu backend's conversion buffers and float32 accumulation path."""
    _check(_forward_backward, backend, torch.bfloat16)


def test_backend_scope_is_per_thread():
    """A `use_backend` scope in one thread does not redirect another thread's calls."""
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def scoped():
        with use_backend("reference"):
            seen["scoped"] = dispatch.requested_backend()[0]
            inside.set()
            release.wait(10)

    def plain():
        inside.wait(10)
        seen["plain"] = dispatch.requested_backend("cpu")[0]
        release.set()

    threads = [threading.Thread(target=scoped), threading.Thread(target=plain)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert seen == {"scoped": "reference", "plain": "cpu"}


def test_announce_logs_once_under_concurrent_first_calls(monkeypatch):
    """`announce` logs each kind of call once even when several threads make the first
    call at the same moment. The membership test is slowed down to widen the window in
    which a check-then-add without dispatch's lock lets every thread log (it logs 4 times
    with `_announced_lock` replaced by a no-op)."""

    class SlowSet(set):
        def __contains__(self, key):
            found = super().__contains__(key)
            time.sleep(0.01)  # between the check and the add, the other threads check too
            return found

    monkeypatch.setattr(dispatch, "_announced", SlowSet())
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    dispatch.logger.addHandler(handler)
    old_level = dispatch.logger.level
    dispatch.logger.setLevel(logging.INFO)
    try:
        barrier = threading.Barrier(4)

        def first_call():
            barrier.wait()
            dispatch.announce("reference", "cpu", torch.float64, False)

        threads = [threading.Thread(target=first_call) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        dispatch.logger.removeHandler(handler)
        dispatch.logger.setLevel(old_level)
    assert len(records) == 1, records
