"""One encode task's work: claim rows, read their pixels, encode in batches, write back.

The path of a batch, with the database round trips it costs (O(1) per forward pass, not per
row):

1. :func:`latentstore.encoding.claim_batch` claims the named rows and, on PostgreSQL, fills the
   batch with other pending rows of the field — one transaction, staged bytes included.
2. A per-process thread pool decodes the uploads with Pillow (which releases the GIL); batches
   are planned from the rows' width/height before any pixel is decoded.
3. :func:`latentstore_workers.codec.iter_encode_stream` runs the batches (memory-bounded,
OOM-split, NaN re-run in float32) and hands back each batch's outcomes as soon as it is done.
4. The per-item loop (:meth:`EncodeRun.finish_item`) turns each outcome into a blob, a failure,
   or a retry; where the field's quality gate is on, one batched decode of the batch's blobs
   measures their round trip (:meth:`EncodeRun.measure`); one
   :func:`~latentstore.encoding.write_back_many` per batch stores the blobs, and the leases of
   the rows still waiting are renewed.

**Pipelining.** The model should never wait for the database or for Pillow. The rows of one
autoencoder run as one stream of batches (:meth:`EncodeRun.encode_stream`): the next batch is
launched behind the one on the device before the finished one is packed, and while the device
works a background thread (its own database connection) writes the previous batch back and — on
PostgreSQL — claims the next batch of pending rows of the same field, whose pictures the pixel
pool then decodes. So one task keeps draining the field's backlog for up to
``DRAIN_SECONDS``, back to back; the messages of the rows it took find them done and cost one
query each. Inside a transaction (a task run eagerly in a test or a request) everything runs
inline instead: another connection could not see the transaction's rows.

Rows that were tried before (``attempts > 1``) run one per forward pass, after the others: if
one of them is what killed the last worker, it cannot take its batch-mates down with it again.

**The first picture does not wait.** A claim takes what is pending now: an idle worker given
one row encodes it at once. Only when the claim shows rows arriving (it filled some, but fewer
than its first pass takes) does it wait ``FILL_WAIT_SECONDS``, once, and claim again. A message
whose rows another claim took (and with nothing to fill) costs its claim's queries and nothing
else: no model, no thread, no blob read. Each run times its host stages (claim, decode, stack,
forward, unpack, pack, write) in :attr:`BatchReport.seconds`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from django.db import DatabaseError, InterfaceError, close_old_connections, connection, connections

from latentstore import conf, encoding
from latentstore.encoding import Claim
from latentstore.latents import blob_digest
from latentstore_workers import cpu
from latentstore_workers.batching import NonFinite, Outcome, OutOfMemory
from latentstore_workers.codec import UnreadablePicture, iter_encode_stream
from latentstore_workers.leases import Heartbeat

__all__ = ["BatchReport", "EncodeRun", "encode_rows", "pixel_pool"]

logger = logging.getLogger("latentstore_workers.pipeline")

_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def pixel_pool() -> ThreadPoolExecutor:
    """This process's thread pool for Pillow decoding (a forked child makes its own)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            import torch

            setting = conf.get_settings()["PIXEL_THREADS"]
            threads = cpu.pixel_threads(setting, on_cpu=not torch.cuda.is_available())
            _pool = (os.getpid(), ThreadPoolExecutor(threads, thread_name_prefix="pixels"))
        return _pool[1]


@dataclass
class BatchReport:
    """What one encode task did; ``items`` maps each ``str(pk)`` it touched to its fate."""

    ready: int = 0
    stale: int = 0
    failed: int = 0
    retried: int = 0
    filled: int = 0  # rows claimed to fill batches, not named by the message
    items: dict[str, str] = field(default_factory=dict)
    # Seconds per host stage, summed over the run: claim, decode (Pillow, in the pixel threads),
    # stack, forward, unpack, pack, write (write-back and lease renewals, in the background).
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        return {
            "ready": self.ready,
            "stale": self.stale,
            "failed": self.failed,
            "retried": self.retried,
            "filled": self.filled,
        }


@dataclass
class _Done:
    claim: Claim
    blob: bytes
    digest: str
    psnr: float | None = None  # the quality gate's round-trip measurement, when it ran


@dataclass
class _Unit:
    """Claims of one autoencoder, their pictures (futures) and the batch size to run them at."""

    alias: str
    claims: list[Claim]
    pictures: list[Future]
    max_batch: int


class _Lookahead:
    """An iterator of units that can be peeked at: a stream takes only its own autoencoder's."""

    def __init__(self, source: Iterator[_Unit]) -> None:
        self.source = source
        self.held: list[_Unit] = []

    def next(self) -> _Unit | None:
        return self.held.pop() if self.held else next(self.source, None)

    def next_if(self, accept: Callable[[_Unit], bool]) -> _Unit | None:
        unit = self.next()
        if unit is not None and not accept(unit):
            self.held.append(unit)
            return None
        return unit


class _Background:
    """Database work off the model's thread: one thread, one connection, in submission order.

    Inline (``threaded=False``) it runs each job at once in the caller's thread.
    """

    def __init__(self, threaded: bool) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="latentstore-db") if threaded else None
        self.jobs: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self.pool is not None:
            future = self.pool.submit(fn, *args)
        else:
            future = Future()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)
        self.jobs.append(future)
        return future

    def check(self) -> None:
        """Raise the error of a job that has already failed (stop early, not after the drain)."""
        for job in self.jobs:
            if job.done() and job.exception() is not None:
                raise job.exception()

    def finish(self) -> None:
        """Wait for every job and raise the first error; close the thread and its connection."""
        jobs, self.jobs = self.jobs, []
        try:
            for job in jobs:
                job.result()
        finally:
            if self.pool is not None:
                pool, self.pool = self.pool, None
                pool.submit(connections.close_all).result()
                pool.shutdown()


class EncodeRun:
    """Encode the claimed rows of one model field (see the module docstring)."""

    def __init__(self, label: str, field_name: str) -> None:
        self.label = label
        self.field_name = field_name
        self.settings = conf.get_settings()
        self.size = max(1, int(self.settings["ENCODE_BATCH_SIZE"]))
        self.report = BatchReport()
        self.lock = threading.Lock()  # the report is written from two threads
        self.claimed: list[Claim] = []

    # --- the run --------------------------------------------------------------------------------

    def run(self, items: Sequence[tuple[Any, str]], *, fill: bool) -> BatchReport:
        fill = fill and bool(self.settings["FILL_BATCHES"])
        claims = self.timed(
            "claim",
            encoding.claim_batch,
            self.label,
            self.field_name,
            items,
            fill=max(0, self.size - len(items)) if fill else 0,
        )
        claimed = {str(c.pk) for c in claims}
        for pk, _token in items:
            if str(pk) not in claimed:
                self.report.stale += 1
                self.report.items.setdefault(str(pk), "stale")
        if not claims:  # taken by another claim, finished or re-uploaded: nothing more to do
            return self.report
        if fill and not connection.in_atomic_block:
            claims += self.top_up(claims)
        drain = fill and encoding.can_fill() and not connection.in_atomic_block
        deadline = time.monotonic() + float(self.settings.get("DRAIN_SECONDS") or 0)
        # On a CPU the model already takes every core: a write-back thread would only compete
        # with it, and open a database connection of its own for every task.
        background = _Background(
            threaded=not connection.in_atomic_block and torch.cuda.is_available()
        )
        try:
            # The heartbeat keeps the leases of the rows in work fresh from its own thread, so a
            # long pass is never taken over while a dead worker's rows come back within a
            # short lease. Not inside a transaction: its writes would wait for the commit.
            with _heartbeat(self.in_work, enabled=not connection.in_atomic_block):
                units = _Lookahead(self.units(claims, drain, deadline, background))
                while (unit := units.next()) is not None:
                    self.encode_stream(unit, units, background)
                background.finish()
        except BaseException as exc:
            try:
                background.finish()
            except BaseException:
                logger.exception("Background database work failed too")
            # Whatever stopped the run (a lost database, a bug, a time limit), the rows it had
            # not finished go back to pending for the retry rather than wait out their lease.
            unfinished = [c for c in self.claimed if str(c.pk) not in self.report.items]
            try:
                encoding.release(unfinished, f"Interrupted: {type(exc).__name__}: {exc}")
            except Exception:
                logger.exception("Could not release %d claimed rows", len(unfinished))
            raise
        logger.debug(
            "Encoded %s.%s: %s, seconds %s",
            self.label,
            self.field_name,
            self.report.as_dict(),
            self.report.seconds,
        )
        return self.report

    def in_work(self) -> list[Claim]:
        """The claims taken and not finished yet (for the heartbeat's thread)."""
        with self.lock:
            done = set(self.report.items)
        return [c for c in list(self.claimed) if str(c.pk) not in done]

    def timed(self, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, its seconds added to the report's ``stage`` (any thread)."""
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.add_time(stage, time.perf_counter() - start)

    def add_time(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.report.seconds[stage] = self.report.seconds.get(stage, 0.0) + seconds

    def top_up(self, claims: list[Claim]) -> list[Claim]:
        """Rows arriving: the claim filled some, yet the first pass takes more. Wait
        ``FILL_WAIT_SECONDS`` once and claim what came meanwhile (nothing pending: no wait)."""
        wait = float(self.settings["FILL_WAIT_SECONDS"] or 0)
        if wait <= 0 or not any(c.filled for c in claims) or not encoding.can_fill():
            return []
        room = self.first_pass(claims[0]) - len(claims)
        if room <= 0:
            return []
        time.sleep(wait)
        return self.timed("claim", encoding.claim_batch, self.label, self.field_name, [], fill=room)

    def first_pass(self, claim: Claim) -> int:
        """How many pictures of ``claim``'s size and autoencoder the first pass would take."""
        from latentstore_workers import batching
        from latentstore_workers.autoencoders import load_autoencoder
        from latentstore_workers.images import padding_for

        try:
            ae = load_autoencoder(claim.autoencoder)
        except Exception:  # reported by the stream, which loads it again
            return 0
        right, bottom = padding_for(claim.width, claim.height, ae.downsample)
        shape = (claim.height + bottom, claim.width + right)
        return batching.batch_size(ae, "encode", shape, self.size)

    def units(
        self, claims: list[Claim], drain: bool, deadline: float, background: _Background
    ) -> Iterator[_Unit]:
        """The claimed rows as units, then (draining) the backlog's, claimed one batch ahead."""
        units = self.prepare(claims)
        while units:
            following: Future | None = None
            if drain and len(claims) >= self.size and time.monotonic() < deadline:
                following = background.submit(self.claim_more)
            yield from units
            if following is None:
                return
            claims, units = following.result()

    def claim_more(self) -> tuple[list[Claim], list[_Unit]]:
        """The next batch of the field's backlog, its pictures already decoding."""
        claims = self.timed(
            "claim", encoding.claim_batch, self.label, self.field_name, [], fill=self.size
        )
        return claims, self.prepare(claims)

    def prepare(self, claims: list[Claim]) -> list[_Unit]:
        """Group claims by autoencoder and start decoding their pictures."""
        from latentstore.images import open_rgb

        with self.lock:
            self.claimed += claims
            self.report.filled += sum(c.filled for c in claims)
        matte = self.settings["ALPHA_BACKGROUND"]
        pool = pixel_pool()
        by_alias: dict[str, list[Claim]] = {}
        for c in claims:
            by_alias.setdefault(c.autoencoder, []).append(c)
        units = []
        for alias, group in by_alias.items():
            fresh = [c for c in group if c.attempts <= 1]
            tried = [c for c in group if c.attempts > 1]
            for subset, max_batch in ((fresh, self.size), (tried, 1)):
                if subset:
                    pictures = [
                        pool.submit(self.timed, "decode", open_rgb, c.staged, background=matte)
                        for c in subset
                    ]
                    units.append(_Unit(alias, subset, pictures, max_batch))
        return units

    def encode_stream(self, first: _Unit, units: _Lookahead, background: _Background) -> None:
        """Encode ``first`` and the units after it that use the same autoencoder, as one stream.

        The next unit is pulled (its rows claimed, its pictures decoding) while the device runs
        the batch before it, so the device goes from one batch to the next without waiting.
        """
        from latentstore_workers.autoencoders import load_autoencoder

        try:
            ae = load_autoencoder(first.alias)
        except KeyError as exc:  # no such alias: a configuration error, not the image's fault
            for c in first.claims:
                self.fail(c, str(exc.args[0]) if exc.args else str(exc))
            return
        except Exception as exc:
            logger.exception("Loading autoencoder %r failed", first.alias)
            for c in first.claims:
                self.transient(c, f"Loading autoencoder {first.alias!r} failed: {exc}")
            return
        claims: list[Claim] = []
        pictures: list[Future | None] = []
        waiting: dict[int, Claim] = {}

        def chunks() -> Iterator[tuple[list[Future], list[tuple[int, int]], int]]:
            unit: _Unit | None = first
            while unit is not None:
                claims.extend(unit.claims)
                pictures.extend(unit.pictures)
                waiting.update((id(c), c) for c in unit.claims)
                yield unit.pictures, [(c.width, c.height) for c in unit.claims], unit.max_batch
                unit = units.next_if(lambda u: u.alias == first.alias)

        try:
            for done in iter_encode_stream(ae, chunks(), timer=self.add_time):
                ready: list[_Done] = []
                gated: list[tuple[_Done, Future]] = []
                for index, outcome in done:  # the per-item result loop
                    claim = claims[index]
                    waiting.pop(id(claim), None)
                    item = self.finish_item(ae, claim, outcome)
                    if item is not None:
                        ready.append(item)
                        if claim.quality.check:
                            gated.append((item, pictures[index]))
                if gated:
                    self.measure(ae, gated)
                for index, _outcome in done:
                    pictures[index] = None  # finished: let its pixels go
                background.submit(self.timed, "write", self.store, ready, list(waiting.values()))
                background.check()
        finally:
            for future in pictures:  # a failed run must not leave decodes queued
                if future is not None:
                    future.cancel()

    # --- per item -------------------------------------------------------------------------------

    def finish_item(self, ae: Any, claim: Claim, outcome: Outcome) -> _Done | None:
        """One item's outcome: a blob to write back, or a failure/retry recorded now."""
        error = outcome.error
        if error is None:
            start = time.perf_counter()
            blob = ae.pack(outcome.value, claim.width, claim.height, claim.latent_dtype)
            digest = blob_digest(blob)
            self.add_time("pack", time.perf_counter() - start)
            return _Done(claim, blob, digest)
        if isinstance(error, UnreadablePicture):
            self.fail(claim, f"The image could not be read: {error}")
        elif isinstance(error, NonFinite):
            self.fail(claim, "The autoencoder produced non-finite latents (NaN/Inf), float32 too.")
        elif isinstance(error, OutOfMemory):
            self.transient(claim, str(error))
        else:
            logger.error(
                "Encoding %s pk=%s failed: %s: %s",
                claim.label,
                claim.pk,
                type(error).__name__,
                error,
                exc_info=error,
            )
            self.transient(claim, f"{type(error).__name__}: {error}")
        return None

    def measure(self, ae: Any, items: list[tuple[_Done, Future]]) -> None:
        """The quality gate for a batch's fresh blobs: one batched decode, PSNR on each item.

        An item whose measurement fails keeps ``psnr = None`` (logged) and is stored anyway:
        the latents are fine, only their score is unknown. With ``keep_original="low_fidelity"``
        such a row keeps its original, since nobody could show it is faithful.
        """
        from latentstore_workers.quality import round_trip_psnrs

        def unmeasured(done: _Done, exc: BaseException) -> None:
            logger.warning(
                "Quality gate for %s pk=%s could not measure the round trip: %s: %s",
                done.claim.label,
                done.claim.pk,
                type(exc).__name__,
                exc,
            )

        measurable, pictures = [], []
        for done, picture in items:
            try:
                pictures.append(picture.result())
                measurable.append(done)
            except Exception as exc:
                unmeasured(done, exc)
        try:
            results = round_trip_psnrs(ae, pictures, [d.blob for d in measurable])
        except Exception as exc:  # the decoder itself failed: no measurement for any of them
            results = [exc] * len(measurable)
        for done, picture, result in zip(measurable, pictures, results, strict=True):
            if isinstance(result, BaseException):
                unmeasured(done, result)
                continue
            done.psnr = result
            policy = done.claim.quality
            if policy.is_low_fidelity(result):
                logger.info(
                    "Low-fidelity encode of %s pk=%s: %.2f dB round-trip PSNR, below %.2f dB "
                    "(%dx%d, %s)",
                    done.claim.label,
                    done.claim.pk,
                    result,
                    policy.min_psnr,
                    picture.width,
                    picture.height,
                    ae.alias,
                )

    def record(self, claim: Claim, fate: str) -> None:
        with self.lock:
            setattr(self.report, fate, getattr(self.report, fate) + 1)
            self.report.items[str(claim.pk)] = "retry" if fate == "retried" else fate

    def fail(self, claim: Claim, message: str) -> None:
        encoding.fail(claim, message)
        self.record(claim, "failed")

    def transient(self, claim: Claim, message: str) -> None:
        """Retry the row later (a new message after a back-off), or fail it past the cap."""
        if claim.attempts >= self.settings["MAX_ATTEMPTS"]:
            self.fail(claim, f"Gave up after {claim.attempts} attempts to encode: {message}")
            return
        delays = self.settings["RETRY_DELAYS"]
        delay = delays[min(claim.attempts - 1, len(delays) - 1)]
        # Not before the back-off: workers filling batches leave it alone until then.
        encoding.release([claim], f"Attempt {claim.attempts} failed: {message}", retry_after=delay)
        encoding.enqueue_encode_batch(
            claim.label, claim.field_name, [(claim.pk, claim.token)], countdown=delay
        )
        self.record(claim, "retried")

    def store(self, ready: list[_Done], waiting: list[Claim]) -> None:
        """Write a batch's blobs back (one transaction, retried briefly on a lost connection)
        and renew the leases of the rows still waiting for their pass."""
        if ready:
            results = [(d.claim, d.blob, d.digest) for d in ready]
            psnrs = [d.psnr for d in ready]
            for attempt, pause in enumerate((0.5, 2.0, None)):
                try:
                    stored = encoding.write_back_many(results, psnrs=psnrs)
                    break
                except (DatabaseError, InterfaceError):
                    if pause is None:
                        raise
                    logger.warning("Write-back failed (try %d); reconnecting", attempt + 1)
                    close_old_connections()
                    time.sleep(pause)
            for done, ok in zip(ready, stored, strict=True):
                self.record(done.claim, "ready" if ok else "stale")
        if waiting:
            encoding.renew(waiting)


def _heartbeat(source: Callable[[], list[Claim]], *, enabled: bool) -> Any:
    """A running :class:`~latentstore_workers.leases.Heartbeat` over ``source``, or a no-op."""
    return Heartbeat(source) if enabled else contextlib.nullcontext()


def encode_rows(
    label: str, field_name: str, items: Sequence[tuple[Any, str]], *, fill: bool = True
) -> BatchReport:
    """Claim and encode the rows named by ``(pk, token)`` items (and fill/drain on PG)."""
    return EncodeRun(label, field_name).run(items, fill=fill)
