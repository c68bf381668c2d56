"""Run many items through one model in as few forward passes as memory allows, losing none.

:func:`run` groups items by input shape, cuts each group into batches bounded by the batch size
and the autoencoder's memory budget, and runs them, handing back each batch's outcomes as soon
as it is done (so a caller can write results while the next batch computes). What can go wrong
in a forward pass is handled per item:

- **Out of memory**: the batch is split in halves and each half retried, down to one item; a
  single item that still does not fit is retried tiled; only then is that item reported. The
  size that fitted is remembered for the shape, so later batches start there.
- **NaN or infinity in an item's output** (float16 overflow; SDXL's VAE is known for it): that
  item is re-run in float32 by the autoencoder's float32 twin, and a warning is logged.
- **Any other exception** (a poison item): the batch is bisected the same way, so the other
  items still get their results and the culprit gets the exception as its outcome.

What a "job" knows — how to stack inputs, call the model and unpack outputs — lives in
``workers.codec``; this module knows only about batches.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from workers.autoencoders import LoadedAutoencoder
from workers.memory import activation_bytes, is_out_of_memory, release

__all__ = ["Job", "NonFinite", "Outcome", "OutOfMemory", "run"]

logger = logging.getLogger("workers.batching")


@dataclass
class Outcome:
    """What became of one item: a value, or the error that stopped it."""

    value: Any = None
    error: BaseException | None = None
    float32_rerun: bool = False  # the reduced-precision output was not finite
    tiled: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


class OutOfMemory(MemoryError):
    """One item did not fit in memory even alone and tiled."""


class NonFinite(ValueError):
    """An item's output was NaN or infinite, in float32 too."""


class Job(Protocol):
    """One kind of forward pass (encode or decode) over a list of items."""

    operation: str  # "encode" or "decode": names the memory estimate and the log lines

    def shape(self, index: int) -> tuple[int, int]:
        """The item's model-side pixel size ``(height, width)``: items batch by it."""

    def stack(
        self, indices: Sequence[int], ae: LoadedAutoencoder
    ) -> tuple[torch.Tensor | None, dict[int, BaseException], dict[int, tuple[int, int]]]:
        """Inputs of ``indices`` as one batch on ``ae``'s device and dtype.

        Returns the batch (rows in the order of the indices that are neither failed nor moved),
        the items that failed to load, and those whose real shape differs from :meth:`shape`
        (they are re-run in a batch of their own).
        """

    def forward(self, ae: LoadedAutoencoder, x: torch.Tensor) -> torch.Tensor:
        """The model's output for a batch (on the device)."""

    def collect(self, output: torch.Tensor, indices: Sequence[int]) -> list[Any]:
        """Per-item values of the (finite) output rows, one for each of ``indices``."""


def run(
    ae: LoadedAutoencoder, job: Job, count: int, *, max_batch: int
) -> Iterator[list[tuple[int, Outcome]]]:
    """Run items ``0..count-1`` of ``job``; yield ``[(index, outcome), ...]`` after each batch.

    Every index appears in exactly one yielded list. ``max_batch`` bounds the items per forward
    pass; the memory budget may bound it further for large pictures.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, not {max_batch}")
    groups: dict[tuple[int, int], list[int]] = {}
    for index in range(count):
        groups.setdefault(job.shape(index), []).append(index)
    work: deque[tuple[tuple[int, int], list[int]]] = deque()
    for shape, indices in groups.items():
        step = _batch_size(ae, job.operation, shape, max_batch)
        work.extend((shape, indices[i : i + step]) for i in range(0, len(indices), step))
    # The next batch's inputs are stacked (Pillow/numpy work, the copy to the device) while the
    # current batch runs on the device, between launching its forward pass and waiting for it.
    prefetched: dict[int, tuple[Any, BaseException | None]] = {}

    def prefetch() -> None:
        if not work:
            return
        _next_shape, upcoming = work[0]
        if id(upcoming) in prefetched:
            return
        try:
            prefetched[id(upcoming)] = (job.stack(upcoming, ae), None)
        except Exception as exc:  # reported when that batch's turn comes, as without prefetch
            prefetched[id(upcoming)] = (None, exc)

    while work:
        shape, indices = work.popleft()
        results: dict[int, Outcome] = {}
        stacked = prefetched.pop(id(indices), None)
        _run_batch(ae, job, shape, indices, results, work, stacked=stacked, prefetch=prefetch)
        yield sorted(results.items())


def _batch_size(ae: LoadedAutoencoder, operation: str, shape: tuple[int, int], most: int) -> int:
    height, width = shape
    pixels = height * width
    if ae.should_tile(width, height):
        pixels = min(pixels, ae.tile_size**2)  # tiles run one after another
    per_item = activation_bytes(ae.block_width, ae.dtype, pixels, operation)
    by_memory = max(1, ae.memory_budget // max(1, per_item))
    learned = ae.batch_caps.get((operation, shape), most)
    return max(1, min(most, by_memory, learned))


def _run_batch(
    ae: LoadedAutoencoder,
    job: Job,
    shape: tuple[int, int],
    indices: list[int],
    results: dict[int, Outcome],
    work: deque,
    *,
    stacked: tuple[Any, BaseException | None] | None = None,
    prefetch: Any = None,
) -> None:
    try:
        if stacked is None:
            x, failed, moved = job.stack(indices, ae)
        elif stacked[1] is not None:
            raise stacked[1]
        else:
            x, failed, moved = stacked[0]
    except Exception as exc:
        if len(indices) == 1:
            results[indices[0]] = Outcome(error=exc)
            return
        half = len(indices) // 2
        _run_batch(ae, job, shape, indices[:half], results, work)
        _run_batch(ae, job, shape, indices[half:], results, work)
        return
    for index, exc in failed.items():
        results[index] = Outcome(error=exc)
    for index, real in moved.items():
        work.append((real, [index]))
    live = [i for i in indices if i not in failed and i not in moved]
    if live and x is not None:
        tiled = ae.should_tile(shape[1], shape[0])
        _forward(ae, job, shape, live, x, tiled, results, prefetch=prefetch)
    elif prefetch is not None:
        prefetch()


def _forward(
    ae: LoadedAutoencoder,
    job: Job,
    shape: tuple[int, int],
    indices: list[int],
    x: torch.Tensor,
    tiled: bool,
    results: dict[int, Outcome],
    *,
    prefetch: Any = None,
) -> None:
    error: BaseException | None = None
    try:
        with ae.tiling(tiled), torch.inference_mode():
            output = job.forward(ae, x)
            flags = torch.isfinite(output).flatten(1).all(dim=1)
        # The device is busy with this batch: stack the next one now. Outside inference mode,
        # so its inputs are ordinary tensors like the first batch's (a compiled model would
        # otherwise compile a second graph for inference-mode inputs).
        if prefetch is not None:
            prefetch()
        finite = flags.tolist()
    except Exception as exc:
        error = exc
        if is_out_of_memory(exc):
            # The traceback's frames hold the failed pass's activations: drop them before the
            # retry needs the memory.
            error.__traceback__ = None
    if error is not None:
        # Outside the except block, so the interpreter no longer holds the failed pass either.
        _recover(ae, job, shape, indices, x, tiled, results, error)
        return
    good = [(row, i) for row, (i, ok) in enumerate(zip(indices, finite, strict=True)) if ok]
    if good:
        rows = [row for row, _ in good]
        kept = output if len(rows) == len(indices) else output[rows]
        values = job.collect(kept, [i for _, i in good])
        for (_, index), value in zip(good, values, strict=True):
            results[index] = Outcome(value=value, tiled=tiled)
    bad = [i for i, ok in zip(indices, finite, strict=True) if not ok]
    del output
    if bad:
        _rerun_in_float32(ae, job, shape, bad, tiled, results)


def _recover(
    ae: LoadedAutoencoder,
    job: Job,
    shape: tuple[int, int],
    indices: list[int],
    x: torch.Tensor,
    tiled: bool,
    results: dict[int, Outcome],
    exc: BaseException,
) -> None:
    oom = is_out_of_memory(exc)
    if oom:
        release(ae.device)
    if len(indices) > 1:
        half = len(indices) // 2
        if oom:
            key = (job.operation, shape)
            ae.batch_caps[key] = min(ae.batch_caps.get(key, len(indices)), half)
            logger.warning(
                "%s of %d %dx%d items ran out of memory on %s; retrying in halves",
                job.operation,
                len(indices),
                shape[1],
                shape[0],
                ae.device,
            )
        else:
            logger.warning(
                "%s of %d items failed (%s: %s); bisecting to find the culprit",
                job.operation,
                len(indices),
                type(exc).__name__,
                exc,
            )
        _forward(ae, job, shape, indices[:half], x[:half], tiled, results)
        _forward(ae, job, shape, indices[half:], x[half:], tiled, results)
        return
    (index,) = indices
    height, width = shape
    if oom and not tiled and max(height, width) > ae.tile_size:
        logger.warning(
            "%s of one %dx%d item ran out of memory on %s; retrying it tiled",
            job.operation,
            width,
            height,
            ae.device,
        )
        _forward(ae, job, shape, indices, x, True, results)
        return
    if oom:
        error: BaseException = OutOfMemory(
            f"{job.operation} of a {width}x{height} picture does not fit in memory on "
            f"{ae.device} even alone and tiled ({type(exc).__name__}: {exc})"
        )
        error.__cause__ = exc
        results[index] = Outcome(error=error, tiled=tiled)
        return
    results[index] = Outcome(error=exc, tiled=tiled)


def _rerun_in_float32(
    ae: LoadedAutoencoder,
    job: Job,
    shape: tuple[int, int],
    indices: list[int],
    tiled: bool,
    results: dict[int, Outcome],
) -> None:
    def non_finite() -> NonFinite:
        return NonFinite(
            f"The autoencoder's {job.operation} output is NaN or infinite"
            + ("" if ae.dtype == torch.float32 else " in float32 too")
        )

    if ae.dtype == torch.float32:
        for index in indices:
            results[index] = Outcome(error=non_finite(), tiled=tiled)
        return
    logger.warning(
        "Autoencoder %r: %s in %s gave NaN/Inf for %d item(s) (overflow); re-running them in "
        "float32",
        ae.alias,
        job.operation,
        str(ae.dtype).removeprefix("torch."),
        len(indices),
    )
    try:
        twin = ae.float32()
    except Exception as exc:
        for index in indices:
            results[index] = Outcome(error=exc, float32_rerun=True)
        return
    rerun: dict[int, Outcome] = {}
    for index in indices:  # rare: one at a time keeps the float32 pass's memory small
        work: deque = deque([(shape, [index])])
        while work:
            real, batch = work.popleft()
            _run_batch(twin, job, real, batch, rerun, work)
    for index in indices:
        outcome = rerun.get(index) or Outcome(error=non_finite())
        if isinstance(outcome.error, NonFinite):
            outcome.error = non_finite()
        outcome.float32_rerun = True
        outcome.tiled = outcome.tiled or tiled
        results[index] = outcome
