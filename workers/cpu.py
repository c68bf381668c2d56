"""On a CPU the batch plan comes from the device: measured pictures per second, not memory.

A GPU computes a batch of 16 pictures in little more time than one, so its plan is "as many as
memory allows" (``latentstore_workers.batching``). A CPU is already busy with one picture: on the
2-core development machine a batch of 11 SD-size 192² pictures encoded at 1.33 s per picture
against 0.87 s one at a time (the activations spill out of the caches and memory bandwidth
becomes the limit). Batching on a CPU can only amortise the fixed cost of a pass (Python, kernel
dispatch, waking threads), which matters for small pictures and small models, never for a pass
that computes for long.

So with ``CPU_BATCH_SIZE = "auto"`` (the default) a CPU worker measures, with its real work and
per (operation, input shape), the seconds per picture of each batch size it runs
(:func:`record`), and :func:`choose_batch` decides the next pass:

1. Run batch 1 until :data:`WARM_PASSES` passes are measured (the first pass at a new input
   shape also builds the kernels for it, so the best of two is the real cost).
2. A pass that took :data:`LONG_PASS_SECONDS` or more is all compute: keep that size.
3. Otherwise measure twice the size the same way; keep doubling while each doubling is at least
   :data:`MARGIN` faster per picture, and settle on the last size that was.

Nothing runs only to measure: the exploration costs at most a few short passes per shape per
process. An integer ``CPU_BATCH_SIZE`` fixes the size; ``None`` gives the memory plan, as on a
GPU. Either way the task's batch size and the memory budget bound it.

Threads: torch computes on every core this process may use (``CPU_THREADS`` overrides), so the
Pillow pool that decodes uploads gets only the cores torch leaves (at least one thread): more
threads than cores only preempt torch's, and a forward pass waits for its slowest thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import torch

from latentstore import conf

__all__ = [
    "LONG_PASS_SECONDS",
    "MARGIN",
    "WARM_PASSES",
    "apply_threads",
    "batch_size",
    "choose_batch",
    "cores",
    "pixel_threads",
    "record",
]

#: Passes measured at a batch size before it is compared (the first one at a shape is a warm-up).
WARM_PASSES = 2
#: A pass this long is compute, not overhead: a bigger batch cannot amortise anything.
LONG_PASS_SECONDS = 0.1
#: How much faster per picture a doubled batch must be to be taken (else latency wins).
MARGIN = 0.1

#: Per batch size: (passes measured, best seconds per picture).
Timings = Mapping[int, tuple[int, float]]


def choose_batch(timings: Timings, most: int) -> int:
    """The batch size of the next CPU pass, from the passes measured so far (see module doc).

    ``timings`` maps batch sizes to ``(passes measured, best seconds per picture)``; ``most`` is
    the largest size allowed (the task's batch size, the memory budget). Deterministic: the same
    measurements give the same answer, and a settled choice stays settled.
    """
    size = 1
    while True:
        passes, best = timings.get(size, (0, float("inf")))
        if passes < WARM_PASSES:
            return min(size, most)
        bigger = min(size * 2, most)
        if bigger <= size or best * size >= LONG_PASS_SECONDS:
            return min(size, most)
        more, best_bigger = timings.get(bigger, (0, float("inf")))
        if more < WARM_PASSES:
            return bigger
        if best_bigger > best * (1 - MARGIN):
            return size
        size = bigger


def batch_size(ae: Any, operation: str, shape: tuple[int, int], most: int) -> int:
    """The batch size for a CPU pass of ``shape`` under ``CPU_BATCH_SIZE``, at most ``most``."""
    setting = conf.get_settings()["CPU_BATCH_SIZE"]
    if setting is None:
        return most
    if setting != "auto":
        return max(1, min(most, int(setting)))
    return choose_batch(ae.pass_times.get((operation, shape), {}), most)


def record(ae: Any, operation: str, shape: tuple[int, int], pictures: int, seconds: float) -> None:
    """Note that a CPU pass of ``pictures`` items of ``shape`` took ``seconds``."""
    per_shape = ae.pass_times.setdefault((operation, shape), {})
    passes, best = per_shape.get(pictures, (0, float("inf")))
    per_shape[pictures] = (passes + 1, min(best, seconds / max(1, pictures)))


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


_threads_applied: tuple[int, Any] | None = None  # (pid, CPU_THREADS) last applied
_threads_lock = threading.Lock()


def apply_threads() -> None:
    """Set torch's intra-op threads to ``CPU_THREADS`` (None: leave torch's default, one per
    core), once per process and value."""
    global _threads_applied
    threads = conf.get_settings()["CPU_THREADS"]
    with _threads_lock:
        if _threads_applied == (os.getpid(), threads):
            return
        _threads_applied = (os.getpid(), threads)
        if threads:
            torch.set_num_threads(int(threads))


def pixel_threads(setting: int, on_cpu: bool) -> int:
    """Threads decoding uploads: ``PIXEL_THREADS`` beside a GPU; beside a CPU model, only the
    cores torch leaves free, and at least one."""
    setting = max(1, int(setting))
    if not on_cpu:
        return setting
    threads = conf.get_settings()["CPU_THREADS"] or torch.get_num_threads()
    return max(1, min(setting, cores() - int(threads)))
