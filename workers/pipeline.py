"""One encode task's work: claim rows, read their pixels, encode in batches, write back.

The path of a batch, with the database round trips it costs (O(1) per forward pass, not per
row):

1. :func:`latentstore.encoding.claim_batch` claims the named rows and, on PostgreSQL, fills the
   batch with other pending rows of the field — one transaction, staged bytes included.
2. A per-process thread pool decodes the uploads with Pillow (which releases the GIL) while the
   model runs; batches are planned from the rows' width/height before any pixel is decoded.
3. :func:`workers.codec.iter_encode` runs the batches (memory-bounded, OOM-split, NaN re-run in
   float32) and hands back each batch's outcomes as soon as it is done.
4. The per-item loop (:meth:`EncodeRun.finish_item`) turns each outcome into a blob, a failure,
   or a retry; one :func:`~latentstore.encoding.write_back_many` per batch stores the blobs, and
   the remaining rows' leases are renewed.

Rows that were tried before (``attempts > 1``) run one per forward pass, after the others: if
one of them is what killed the last worker, it cannot take its batch-mates down with it again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError, InterfaceError, close_old_connections

from latentstore import conf, encoding
from latentstore.encoding import Claim
from latentstore.latents import blob_digest, pack
from workers.batching import NonFinite, Outcome, OutOfMemory
from workers.codec import UnreadablePicture, iter_encode

__all__ = ["BatchReport", "EncodeRun", "encode_rows", "pixel_pool"]

logger = logging.getLogger("workers.pipeline")

_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def pixel_pool() -> ThreadPoolExecutor:
    """This process's thread pool for Pillow decoding (a forked child makes its own)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            threads = max(1, int(conf.get_settings()["PIXEL_THREADS"]))
            _pool = (os.getpid(), ThreadPoolExecutor(threads, thread_name_prefix="pixels"))
        return _pool[1]


@dataclass
class BatchReport:
    """What one encode task did; ``items`` maps each named ``str(pk)`` to its fate."""

    ready: int = 0
    stale: int = 0
    failed: int = 0
    retried: int = 0
    filled: int = 0  # rows claimed to fill the batch (counted in the other totals too)
    items: dict[str, str] = field(default_factory=dict)

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


class EncodeRun:
    """Encode the claimed rows of one model field (see the module docstring)."""

    def __init__(self, label: str, field_name: str) -> None:
        self.label = label
        self.field_name = field_name
        self.settings = conf.get_settings()
        self.report = BatchReport()

    # --- the run --------------------------------------------------------------------------------

    def run(self, items: Sequence[tuple[Any, str]], *, fill: bool) -> BatchReport:
        size = max(1, int(self.settings["ENCODE_BATCH_SIZE"]))
        room = size - len(items) if fill and self.settings["FILL_BATCHES"] else 0
        claims = encoding.claim_batch(self.label, self.field_name, items, fill=max(0, room))
        claimed = {str(c.pk) for c in claims}
        for pk, _token in items:
            if str(pk) not in claimed:
                self.report.stale += 1
                self.report.items.setdefault(str(pk), "stale")
        self.report.filled = sum(c.filled for c in claims)
        by_alias: dict[str, list[Claim]] = {}
        for c in claims:
            by_alias.setdefault(c.autoencoder, []).append(c)
        try:
            for alias, group in by_alias.items():
                self.encode_group(alias, group)
        except BaseException as exc:
            # Whatever stopped the run (a lost database, a bug, a time limit), the rows it had
            # not finished go back to pending for the retry rather than wait out their lease.
            unfinished = [c for c in claims if str(c.pk) not in self.report.items]
            try:
                encoding.release(unfinished, f"Interrupted: {type(exc).__name__}: {exc}")
            except Exception:
                logger.exception("Could not release %d claimed rows", len(unfinished))
            raise
        return self.report

    def encode_group(self, alias: str, claims: list[Claim]) -> None:
        from workers.autoencoders import load_autoencoder

        try:
            ae = load_autoencoder(alias)
        except KeyError as exc:  # no such alias: a configuration error, not the image's fault
            for c in claims:
                self.fail(c, str(exc.args[0]) if exc.args else str(exc))
            return
        except Exception as exc:
            logger.exception("Loading autoencoder %r failed", alias)
            for c in claims:
                self.transient(c, f"Loading autoencoder {alias!r} failed: {exc}")
            return
        fresh = [c for c in claims if c.attempts <= 1]
        tried = [c for c in claims if c.attempts > 1]
        size = max(1, int(self.settings["ENCODE_BATCH_SIZE"]))
        for subset, max_batch in ((fresh, size), (tried, 1)):
            if subset:
                self.encode_subset(ae, subset, max_batch)

    def encode_subset(self, ae: Any, claims: list[Claim], max_batch: int) -> None:
        from latentstore.images import open_rgb

        background = self.settings["ALPHA_BACKGROUND"]
        pool = pixel_pool()
        pictures = [pool.submit(open_rgb, c.staged, background=background) for c in claims]
        sizes = [(c.width, c.height) for c in claims]
        remaining = {id(c): c for c in claims}
        try:
            for done in iter_encode(ae, pictures, sizes=sizes, max_batch=max_batch):
                ready: list[_Done] = []
                for index, outcome in done:  # the per-item result loop
                    claim = claims[index]
                    remaining.pop(id(claim), None)
                    item = self.finish_item(ae, claim, outcome)
                    if item is not None:
                        ready.append(item)
                self.store(ready)
                if remaining:
                    encoding.renew(list(remaining.values()))
        finally:
            for future in pictures:  # a failed run must not leave decodes queued
                future.cancel()

    # --- per item -------------------------------------------------------------------------------

    def finish_item(self, ae: Any, claim: Claim, outcome: Outcome) -> _Done | None:
        """One item's outcome: a blob to write back, or a failure/retry recorded now.

        A post-encode step for each item (a quality gate, say) belongs here, between the
        latents and the blob.
        """
        error = outcome.error
        if error is None:
            picture_size = (claim.width, claim.height)
            blob = pack(
                outcome.value,
                autoencoder=ae.alias,
                family=ae.family,
                fingerprint=ae.fingerprint,
                scaling_factor=ae.scaling_factor,
                shift_factor=ae.shift_factor,
                width=picture_size[0],
                height=picture_size[1],
                downsample=ae.downsample,
                dtype=claim.latent_dtype,
            )
            return _Done(claim, blob, blob_digest(blob))
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

    def fail(self, claim: Claim, message: str) -> None:
        encoding.fail(claim, message)
        self.report.failed += 1
        self.report.items[str(claim.pk)] = "failed"

    def transient(self, claim: Claim, message: str) -> None:
        """Retry the row later (a new message after a back-off), or fail it past the cap."""
        if claim.attempts >= self.settings["MAX_ATTEMPTS"]:
            self.fail(claim, f"Gave up after {claim.attempts} attempts to encode: {message}")
            return
        encoding.release([claim], f"Attempt {claim.attempts} failed: {message}")
        delays = self.settings["RETRY_DELAYS"]
        delay = delays[min(claim.attempts - 1, len(delays) - 1)]
        encoding.enqueue_encode_batch(
            claim.label, claim.field_name, [(claim.pk, claim.token)], countdown=delay
        )
        self.report.retried += 1
        self.report.items[str(claim.pk)] = "retry"

    def store(self, ready: list[_Done]) -> None:
        """Write a batch's blobs back: one transaction, retried briefly on a lost connection."""
        if not ready:
            return
        results = [(d.claim, d.blob, d.digest) for d in ready]
        for attempt, pause in enumerate((0.5, 2.0, None)):
            try:
                stored = encoding.write_back_many(results)
                break
            except (DatabaseError, InterfaceError):
                if pause is None:
                    raise
                logger.warning("Write-back failed (try %d); reconnecting", attempt + 1)
                close_old_connections()
                time.sleep(pause)
        for done, ok in zip(ready, stored, strict=True):
            if ok:
                self.report.ready += 1
            else:
                self.report.stale += 1
            self.report.items[str(done.claim.pk)] = "ready" if ok else "stale"


def encode_rows(
    label: str, field_name: str, items: Sequence[tuple[Any, str]], *, fill: bool = True
) -> BatchReport:
    """Claim and encode the rows named by ``(pk, token)`` items (and fill the batch on PG)."""
    return EncodeRun(label, field_name).run(items, fill=fill)
