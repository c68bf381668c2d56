"""Run many items through one model in as few forward passes as memory allows, losing none.

:func:`plan` groups items by input shape and cuts each group into batches bounded by the batch
size and the autoencoder's memory budget; :func:`stream` runs batches, handing back each batch's
outcomes as soon as it is done; :func:`run` is the two together. What can go wrong in a forward
pass is handled per item:

- **Out of memory**: the batch is split in halves and each half retried, down to one item; a
  single item that still does not fit is retried tiled; only then is that item reported. The
  size that fitted is remembered for the shape, so later batches start there.
- **NaN or infinity in an item's output** (float16 overflow; SDXL's VAE is known for it): that
  item is re-run in float32 by the autoencoder's float32 twin, and a warning is logged.
- **Any other exception** (a poison item): the batch is bisected the same way, so the other
  items still get their results and the culprit gets the exception as its outcome.

**The device never waits for Python.** Kernel launches are asynchronous, so :func:`stream` keeps
one batch queued behind the one computing: it launches batch N+1, then waits for batch N (whose
outputs were copied to pinned host memory behind an event, so that wait ends when N is done,
not N+1), hands N back — the caller packs and stores it while N+1 computes — and stacks N+2's
inputs. On a CPU a "launch" computes the whole pass before it returns, so there each batch is
handed back as soon as it is done, before the next is pulled: looking ahead would only delay
every result by one pass. A compiled model runs every batch at its planned size (a short batch
is padded with copies of its last input, the extra outputs dropped), so it keeps one graph per
shape instead of recompiling for each odd size.

**On a CPU the plan comes from the device**: batch sizes are chosen from the passes' measured
seconds per picture (``latentstore_workers.cpu``, ``CPU_BATCH_SIZE``), not from memory alone.
:func:`plan` is lazy for that reason: each batch's size is decided when the stream pulls it,
after the pass before it was measured.

What a "job" knows — how to stack inputs, call the model and unpack outputs — lives in
``latentstore_workers.codec``; this module knows only about batches.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from latentstore_workers import cpu
from latentstore_workers.autoencoders import LoadedAutoencoder
from latentstore_workers.memory import activation_bytes, is_out_of_memory, release

__all__ = [
    "Batch",
    "Job",
    "NonFinite",
    "OutOfMemory",
    "Outcome",
    "batch_size",
    "plan",
    "run",
    "stream",
]

logger = logging.getLogger("latentstore_workers.batching")


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


class Batch(NamedTuple):
    """Items of one input shape that share a forward pass."""

    shape: tuple[int, int]  # model-side (height, width)
    indices: list[int]
    size: int  # the planned batch size for this shape: a compiled model always runs at it


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

    def download(self, output: torch.Tensor) -> Any:
        """Start copying a batch's output to the host without waiting for it (pinned memory)."""

    def unpack(self, host: Any, rows: Sequence[int], indices: Sequence[int]) -> list[Any]:
        """Per-item values of ``rows`` of the downloaded output, one for each of ``indices``."""


def run(
    ae: LoadedAutoencoder, job: Job, count: int, *, max_batch: int
) -> Iterator[list[tuple[int, Outcome]]]:
    """Run items ``0..count-1`` of ``job``; yield ``[(index, outcome), ...]`` after each batch.

    Every index appears in exactly one yielded list. ``max_batch`` bounds the items per forward
    pass; the memory budget may bound it further for large pictures, and on a CPU the measured
    plan (``CPU_BATCH_SIZE``).
    """
    yield from stream(ae, job, plan(ae, job, range(count), max_batch=max_batch))


def plan(
    ae: LoadedAutoencoder, job: Job, indices: Iterable[int], *, max_batch: int
) -> Iterator[Batch]:
    """Batches for ``indices``: grouped by shape, cut by ``max_batch`` and the memory budget
    (on a CPU, by the measured plan too).

    Lazy: the items are grouped now, but each batch's size is decided when it is pulled, so a
    CPU pass's measurement plans the pass after it.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, not {max_batch}")
    groups: dict[tuple[int, int], list[int]] = {}
    for index in indices:
        groups.setdefault(job.shape(index), []).append(index)
    return _cut(ae, job, groups, max_batch)


def _cut(
    ae: LoadedAutoencoder, job: Job, groups: dict[tuple[int, int], list[int]], max_batch: int
) -> Iterator[Batch]:
    for shape, members in groups.items():
        start = 0
        while start < len(members):
            step = batch_size(ae, job.operation, shape, max_batch)
            yield Batch(shape, members[start : start + step], step)
            start += step


def stream(
    ae: LoadedAutoencoder, job: Job, batches: Iterable[Batch], *, lookahead: bool | None = None
) -> Iterator[list[tuple[int, Outcome]]]:
    """Run ``batches`` and yield each one's outcomes in order.

    ``batches`` may be a generator that produces work as it goes (the encode worker claims the
    next rows while the device computes). With ``lookahead`` (default: on an asynchronous
    device, not on a CPU) the next batch is pulled and launched before the current one is
    handed back; without it each batch is handed back as soon as it is done.
    """
    if lookahead is None:
        lookahead = ae.device.type != "cpu"
    if ae.device.type == "cpu":
        cpu.apply_threads()
    source = iter(batches)
    moved: deque[Batch] = deque()  # items whose real shape differed: a batch of their own

    def pull() -> Batch | None:
        return moved.popleft() if moved else next(source, None)

    def stack(batch: Batch) -> tuple[Any, BaseException | None]:
        # Outside inference mode, so inputs are ordinary tensors in every pass (a compiled
        # model would otherwise compile a second graph for inference-mode inputs).
        try:
            return job.stack(batch.indices, ae), None
        except Exception as exc:  # reported when the batch runs
            return None, exc

    in_flight: _Pass | None = None
    while True:
        if in_flight is not None and not lookahead:
            yield in_flight.finish()
            in_flight = None
        if (batch := pull()) is None:
            break
        current = _launch(ae, job, batch, stack(batch), moved)
        if in_flight is not None:
            yield in_flight.finish()  # waits for the previous batch only
            in_flight = None
        if isinstance(current, _Pass):
            in_flight = current
        else:  # nothing went to the device: settle it now, in its turn
            yield current()
    if in_flight is not None:
        yield in_flight.finish()


def batch_size(ae: LoadedAutoencoder, operation: str, shape: tuple[int, int], most: int) -> int:
    """Pictures in the next pass of ``shape`` (model-side ``(height, width)``), at most ``most``:
    bounded by the memory budget and the sizes that fitted; on a CPU, chosen by speed."""
    height, width = shape
    pixels = height * width
    if ae.should_tile(width, height):
        pixels = min(pixels, ae.tile_size**2)  # tiles run one after another
    per_item = activation_bytes(ae.block_width, ae.dtype, pixels, operation)
    by_memory = max(1, ae.memory_budget // max(1, per_item))
    learned = ae.batch_caps.get((operation, shape), most)
    size = max(1, min(most, by_memory, learned))
    if ae.device.type == "cpu":  # memory bounds a CPU batch too, but speed decides it
        size = cpu.batch_size(ae, operation, shape, size)
    return size


@dataclass
class _Pass:
    """A forward pass launched on the device, its output on its way to the host."""

    ae: LoadedAutoencoder
    job: Job
    shape: tuple[int, int]
    indices: list[int]
    x: torch.Tensor  # kept for a bisection if the device reports an error late
    tiled: bool
    host: Any
    flags: torch.Tensor  # per row: all outputs finite (on the host once ``event`` is done)
    event: Any  # torch.cuda.Event after the copies, or None where copies are synchronous
    results: dict[int, Outcome]  # the batch's outcomes so far (items that failed to load)

    def finish(self) -> list[tuple[int, Outcome]]:
        """Wait for this pass, then unpack its rows (non-finite ones re-run in float32)."""
        error: BaseException | None = None
        try:
            if self.event is not None:
                self.event.synchronize()
            finite = self.flags.tolist()
        except Exception as exc:  # an asynchronous device error, raised at the wait
            error = exc
        if error is not None:
            _recover(
                self.ae, self.job, self.shape, self.indices, self.x, self.tiled, self.results, error
            )
        else:
            _settle(self, finite)
        return sorted(self.results.items())


def _start(
    ae: LoadedAutoencoder,
    job: Job,
    shape: tuple[int, int],
    indices: list[int],
    x: torch.Tensor,
    tiled: bool,
    results: dict[int, Outcome],
    pad_to: int = 0,
) -> _Pass | BaseException:
    """Launch one forward pass and the copies of its output; or what the launch raised (for
    :func:`_recover`)."""
    live = x.shape[0]
    started = time.perf_counter()
    try:
        with ae.tiling(tiled), torch.inference_mode():
            x_in = _padded(x, pad_to) if pad_to > live else x
            output = job.forward(ae, x_in)
            if output.shape[0] != live:
                output = output[:live]
            flags = torch.isfinite(output).flatten(1).all(dim=1)
            host = job.download(output)
            flags = flags.to("cpu", non_blocking=flags.is_cuda)
            event = None
            if output.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
    except Exception as exc:
        if is_out_of_memory(exc):
            # The traceback's frames hold the failed pass's activations: drop them before the
            # retry needs the memory.
            exc.__traceback__ = None
        return exc
    if ae.device.type == "cpu" and not tiled and pad_to <= live:
        # Synchronous on a CPU: the pass is done, and its time plans the next (cpu.py).
        cpu.record(ae, job.operation, shape, live, time.perf_counter() - started)
    return _Pass(ae, job, shape, indices, x, tiled, host, flags, event, results)


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with copies of its last row appended up to ``rows``, in ``x``'s memory layout."""
    channels_last = (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    out = out.contiguous(memory_format=layout)
    out[: x.shape[0]] = x
    out[x.shape[0] :] = x[-1:]
    return out


def _launch(
    ae: LoadedAutoencoder,
    job: Job,
    batch: Batch,
    stacked: tuple[Any, BaseException | None],
    moved: deque[Batch],
) -> _Pass | Callable[[], list[tuple[int, Outcome]]]:
    """Launch ``batch``; or, when it cannot go to the device as a whole, how to settle it."""
    shape, indices, size = batch
    results: dict[int, Outcome] = {}

    def settled() -> list[tuple[int, Outcome]]:
        return sorted(results.items())

    stack_error = stacked[1]
    if stack_error is not None:

        def bisect() -> list[tuple[int, Outcome]]:
            _bisect_stack(ae, job, shape, indices, results, moved, stack_error)
            return settled()

        return bisect

    x, failed, wrong = stacked[0]
    live = _triage(indices, failed, wrong, results, moved)
    if not live or x is None:
        return settled
    tiled = ae.should_tile(shape[1], shape[0])
    launched = _start(ae, job, shape, live, x, tiled, results, size if ae.compiled else 0)
    if isinstance(launched, _Pass):
        return launched
    error = launched

    def recover() -> list[tuple[int, Outcome]]:
        _recover(ae, job, shape, live, x, tiled, results, error)
        return settled()

    return recover


def _triage(
    indices: list[int],
    failed: dict[int, BaseException],
    wrong: dict[int, tuple[int, int]],
    results: dict[int, Outcome],
    moved: deque[Batch],
) -> list[int]:
    """Record the items that failed to load, send those of another real shape to a batch of
    their own, and return the rest (the rows of the stacked batch)."""
    for index, exc in failed.items():
        results[index] = Outcome(error=exc)
    for index, real in wrong.items():
        moved.append(Batch(real, [index], 1))
    return [i for i in indices if i not in failed and i not in wrong]


def _bisect_stack(
    ae: LoadedAutoencoder,
    job: Job,
    shape: tuple[int, int],
    indices: list[int],
    results: dict[int, Outcome],
    moved: deque[Batch],
    exc: BaseException | None,
) -> None:
    """Stacking the batch raised: run each half on its own, down to the item that raises."""
    if len(indices) == 1:
        results[indices[0]] = Outcome(error=exc)
        return
    half = len(indices) // 2
    _run_batch(ae, job, shape, indices[:half], results, moved)
    _run_batch(ae, job, shape, indices[half:], results, moved)


def _run_batch(
    ae: LoadedAutoencoder,
    job: Job,
    shape: tuple[int, int],
    indices: list[int],
    results: dict[int, Outcome],
    moved: deque[Batch],
) -> None:
    """Stack and run one batch synchronously (bisections and float32 re-runs)."""
    try:
        x, failed, wrong = job.stack(indices, ae)
    except Exception as exc:
        _bisect_stack(ae, job, shape, indices, results, moved, exc)
        return
    live = _triage(indices, failed, wrong, results, moved)
    if live and x is not None:
        _forward(ae, job, shape, live, x, ae.should_tile(shape[1], shape[0]), results)


def _forward(
    ae: LoadedAutoencoder,
    job: Job,
    shape: tuple[int, int],
    indices: list[int],
    x: torch.Tensor,
    tiled: bool,
    results: dict[int, Outcome],
) -> None:
    """One forward pass, waited for (the recovery paths run one pass at a time)."""
    launched = _start(ae, job, shape, indices, x, tiled, results)
    if isinstance(launched, _Pass):
        launched.finish()
    else:
        _recover(ae, job, shape, indices, x, tiled, results, launched)


def _settle(launched: _Pass, finite: list[bool]) -> None:
    """Unpack the finite rows of a finished pass; re-run the others in float32."""
    ae, job, indices, results = launched.ae, launched.job, launched.indices, launched.results
    good = [(row, i) for row, (i, ok) in enumerate(zip(indices, finite, strict=True)) if ok]
    if good:
        values = job.unpack(launched.host, [row for row, _ in good], [i for _, i in good])
        for (_, index), value in zip(good, values, strict=True):
            results[index] = Outcome(value=value, tiled=launched.tiled)
    bad = [i for i, ok in zip(indices, finite, strict=True) if not ok]
    launched.host = None
    if bad:
        _rerun_in_float32(ae, job, launched.shape, bad, launched.tiled, results)


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
        work: deque[Batch] = deque([Batch(shape, [index], 1)])
        while work:
            real, batch, _size = work.popleft()
            _run_batch(twin, job, real, batch, rerun, work)
    for index in indices:
        outcome = rerun.get(index) or Outcome(error=non_finite())
        if isinstance(outcome.error, NonFinite):
            outcome.error = non_finite()
        outcome.float32_rerun = True
        outcome.tiled = outcome.tiled or tiled
        results[index] = outcome
