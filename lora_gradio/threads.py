"""CPU threads that fit the cores actually free.

PyTorch's CPU kernels run on OpenMP threads, one per core, and every parallel region waits for all of them. When
another process holds a core, each region waits for a thread that is not running: on 2 cores beside two busy
processes, demo training went 41× slower and generation 167× slower, where a fair share costs 1.5× (docs/BENCHMARKS.md).
So each heavy job uses as many threads as there are cores free at that moment, measured again every few seconds,
within the cores this process may use (its CPU affinity and a container's CPU quota, which PyTorch does not read).
Threads that sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) were measured too: 3× slower on a quiet machine.

OpenMP also keeps a pool of worker threads for every thread that has run a parallel kernel, for as long as that thread
lives. Two pools alive at once, with as many workers as cores, throttle every pool's spinning: on 2 cores an image
took 1.39 s instead of 0.42 s. So model work asked for by a long-lived thread (a server's request threads) runs on a
thread of its own that ends with it (:func:`on_own_thread`).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from contextvars import copy_context
from pathlib import Path
from typing import TypeVar

KEEP_DEFAULTS = "LORA_GRADIO_DEFAULT_THREADS"  # set to 1: PyTorch's own thread settings, untouched
REFIT_SECONDS = 2.0  # how long a measurement of the other processes' load is trusted
_lock = threading.Lock()
_last: tuple[float, float, float] | None = None  # (time, CPU seconds of all processes, of this one)
_fitted_at = -math.inf
T = TypeVar("T")


def configure() -> None:
    """What must be set before the tokenizers start their own thread pool: none, since PyTorch's threads already
    take the free cores (a second pool of one thread per core would compete with them)."""
    if os.environ.get(KEEP_DEFAULTS) != "1":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup (container) CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_quota() -> float | None:
    """A container's CPU limit in cores (cgroup v2 ``cpu.max``, or v1's CFS quota); None when there is none."""
    for path in (Path("/sys/fs/cgroup/cpu.max"), Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")):
        try:
            text = path.read_text().split()
            quota, period = (text[0], text[1]) if len(text) == 2 else \
                (text[0], (path.parent / "cpu.cfs_period_us").read_text().strip())
        except (OSError, IndexError):
            continue
        if quota not in ("max", "-1") and float(period) > 0:
            return float(quota) / float(period)
    return None


def _sample() -> tuple[float, float, float]:
    """Now, the CPU seconds every process has used, and this process's."""
    import psutil

    every = psutil.cpu_times()
    busy = sum(getattr(every, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))
    own = psutil.Process().cpu_times()
    return time.monotonic(), busy, own.user + own.system


def busy_elsewhere() -> float:
    """How many cores other processes kept busy since the last call (over 0.2 s on the first one); the caller
    holds ``_lock``."""
    global _last
    before = _last
    if before is None:
        before = _sample()
        time.sleep(0.2)
    _last = now = _sample()
    elapsed = now[0] - before[0]
    if elapsed <= 0:
        return 0.0
    return max(0.0, ((now[1] - before[1]) - (now[2] - before[2])) / elapsed)


def fit_threads(force: bool = False) -> int:
    """Set PyTorch's thread count to the cores free now (at least one); measured again after ``REFIT_SECONDS``.
    PyTorch's count is one for the whole process, so only the model cache's lease holder calls this (the cache on
    each lease, training at its steps), and the measurement and the change happen under one lock."""
    global _fitted_at
    import torch

    with _lock:
        if os.environ.get(KEEP_DEFAULTS) == "1" or (not force and time.monotonic() - _fitted_at < REFIT_SECONDS):
            return torch.get_num_threads()
        cores = usable_cores()
        free = max(1, min(cores, round(cores - busy_elsewhere())))
        if free != torch.get_num_threads():
            torch.set_num_threads(free)
        _fitted_at = time.monotonic()
        return free


def on_own_thread(work: Callable[[], T]) -> T:
    """``work``'s result (or its error), computed on a new thread that ends with it, so that no OpenMP pool outlives
    the work; the caller's context variables (a page's progress bar) go along."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed to the caller, who raises it as its own
            error.append(exc)

    context = copy_context()
    thread = threading.Thread(target=context.run, args=(run,), name="model-work", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
