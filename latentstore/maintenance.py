"""Re-encoding and retrying rows: what the admin actions and the management commands share.

A re-encode stages a row's original again exactly like a new upload (fresh token, state
``pending``, latents cleared) and enqueues the encode once the update has committed; the
worker encodes with the autoencoder named in the row's ``<field>_autoencoder`` column, which a
re-encode may change. Each row is one conditional update on the token the row had when it was
read, so an upload that happens meanwhile wins and nothing is overwritten.

The original comes from the row itself while it is still staged (pending or failed rows), else
from the kept original (``KEEP_ORIGINAL``). Re-encoding from decoded pixels is a lossy round
trip and happens only when asked (``from_decoded=True``).
"""

from __future__ import annotations

import io
import math
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from django.db import models, transaction
from django.db.models import BinaryField, F
from django.db.models.functions import Substr
from django.utils import timezone

from latentstore.columns import by_column, pending_upload
from latentstore.encoding import enqueue_encode_batch, originals_storage
from latentstore.fields import (
    EMPTY,
    ENCODING,
    FAILED,
    PENDING,
    READY,
    LatentImage,
    LatentImageField,
)
from latentstore.latents import LatentFormatError, LatentHeader, read_header
from latentstore.quality import QualityPolicy
from latentstore.queries import without_blobs

IN_FLIGHT = "already pending or encoding"
NO_ORIGINAL = "no original kept"
NOT_FAILED = "not failed"
CHANGED = "changed meanwhile"
EMPTY_ROW = "no image"


@dataclass
class Outcome:
    """What happened to one row."""

    pk: Any
    action: str  # "staged" | "would stage" | "skipped" | "error"
    reason: str = ""
    token: uuid.UUID | None = None
    source: str = ""  # "staged" | "original" | "decoded"
    decoded: bytes | None = None  # the decoded picture a from-decoded re-encode started from


@dataclass
class Report:
    """Counts over many rows (for the admin's messages and the commands' summaries)."""

    staged: int = 0
    skipped: Counter = dc_field(default_factory=Counter)
    errors: dict[Any, str] = dc_field(default_factory=dict)
    sources: Counter = dc_field(default_factory=Counter)

    def add(self, outcome: Outcome) -> None:
        if outcome.action in ("staged", "would stage"):
            self.staged += 1
            self.sources[outcome.source] += 1
        elif outcome.action == "skipped":
            self.skipped[outcome.reason] += 1
        else:
            self.errors[outcome.pk] = outcome.reason


class EncodeBatch:
    """Collects staged ``(pk, token)`` pairs and enqueues them in batches.

    A batch is sent at ``size`` rows or once its first row has waited ``max_wait`` seconds
    (slow sources such as decoding must not keep the workers idle). Use it as a context manager:
    what is left is sent on exit. A batch lost with a crash costs only the sweeper's lease: the
    rows are pending in the database.
    """

    def __init__(self, label: str, field_name: str, size: int = 100, max_wait: float = 1.0) -> None:
        self.label, self.field_name, self.size, self.max_wait = label, field_name, size, max_wait
        self.items: list[tuple[Any, uuid.UUID]] = []
        self.sent = 0
        self._first = 0.0

    def add(self, pk: Any, token: uuid.UUID) -> None:
        if not self.items:
            self._first = time.monotonic()
        self.items.append((pk, token))
        if len(self.items) >= self.size or time.monotonic() - self._first >= self.max_wait:
            self.flush()

    def flush(self) -> None:
        if self.items:
            items, self.items = self.items, []
            self.sent += enqueue_encode_batch(self.label, self.field_name, items)

    def __enter__(self) -> EncodeBatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush()


def small_rows(model: type[models.Model]) -> models.QuerySet:
    """Rows of ``model`` with the blob and the staged original deferred, in primary key order."""
    return without_blobs(model._base_manager.all()).order_by("pk")


def _keeps_originals(field: LatentImageField) -> bool:
    return bool(QualityPolicy.for_field(field).keep_original)  # "low_fidelity" keeps some


def stage_again(
    instance: models.Model,
    field: LatentImageField,
    data: bytes | None,
    autoencoder: str,
    batch: EncodeBatch | None = None,
) -> uuid.UUID | None:
    """Put ``instance``'s row back to ``pending`` with ``data`` staged; the new token or None.

    ``data`` None keeps the staged original the row already holds (a retry). The update is
    conditioned on the token read with ``instance``; on commit the encode is enqueued (into
    ``batch`` when given), and a kept original that the worker will store again is deleted.
    """
    token_col = field.companion_attname("token")
    old_token = getattr(instance, token_col)
    old_original = getattr(instance, field.companion_attname("original"))
    token = uuid.uuid4()
    values = {**pending_upload(token, autoencoder, timezone.now()), "latents": None}
    if data is not None:
        values["staged"] = data
    values = by_column(field, values)
    model = type(instance)
    rows = model._base_manager.filter(pk=instance.pk)
    rows = rows.filter(**{token_col: old_token} if old_token else {f"{token_col}__isnull": True})
    with transaction.atomic(using=rows.db):
        if not rows.update(**values):
            return None
        label, pk, name = model._meta.label, instance.pk, field.name
        if batch is not None:
            transaction.on_commit(lambda: batch.add(pk, token), using=rows.db)
        else:
            transaction.on_commit(
                lambda: enqueue_encode_batch(label, name, [(pk, token)]), using=rows.db
            )
        if old_original and data is not None and _keeps_originals(field):
            # The row holds the bytes now and the worker stores a new copy; the old file would
            # only be an orphan. Without KEEP_ORIGINAL any more, the old file is left alone.
            transaction.on_commit(lambda: _delete_quietly(old_original), using=rows.db)
    return token


def _delete_quietly(name: str) -> None:
    try:
        originals_storage().delete(name)
    except Exception:  # a missing file is fine; a storage error must not undo the re-encode
        pass


def source_of(
    image: LatentImage, *, from_decoded: bool, decoder: str | None, probe: bool = False
) -> tuple[bytes, str]:
    """The bytes to encode again and where they came from; LookupError when there are none.

    With ``probe`` a decode is not run (``b""`` stands for its result): for dry runs.
    """
    field = image.field
    staged_col = field.companion_attname("staged")
    staged = image.instance.__dict__.get(staged_col)
    if staged is None:
        manager = type(image.instance)._base_manager
        staged = manager.filter(pk=image.instance.pk).values_list(staged_col, flat=True).first()
    if staged is not None:
        return bytes(staged), "staged"
    name = image.original_name
    if name:
        with originals_storage().open(name, "rb") as fh:
            return fh.read(), "original"
    if from_decoded and image.state == READY:
        if probe:
            return b"", "decoded"
        return image.decoded_bytes(decoder=decoder, format="PNG"), "decoded"
    raise LookupError(NO_ORIGINAL)


def reencode_row(
    instance: models.Model,
    field: LatentImageField,
    *,
    autoencoder: str | None = None,
    from_decoded: bool = False,
    decoder: str | None = None,
    dry_run: bool = False,
    batch: EncodeBatch | None = None,
) -> Outcome:
    """Stage one row for encoding again (see the module docstring)."""
    image = getattr(instance, field.name)
    pk = instance.pk
    state = image.state
    if state == EMPTY:
        return Outcome(pk, "skipped", EMPTY_ROW)
    if state in (PENDING, ENCODING):
        return Outcome(pk, "skipped", IN_FLIGHT)
    target = autoencoder or image.autoencoder or field.autoencoder
    try:
        data, source = source_of(image, from_decoded=from_decoded, decoder=decoder, probe=dry_run)
    except LookupError as exc:
        return Outcome(pk, "skipped", str(exc.args[0]))
    except Exception as exc:  # an unreadable blob, a decoder that refuses, a missing file
        return Outcome(pk, "error", f"{type(exc).__name__}: {exc}")
    if dry_run:
        return Outcome(pk, "would stage", source=source)
    decoded = data if source == "decoded" else None
    token = stage_again(instance, field, None if source == "staged" else data, target, batch)
    if token is None:
        return Outcome(pk, "skipped", CHANGED)
    return Outcome(pk, "staged", token=token, source=source, decoded=decoded)


def retry_row(
    instance: models.Model,
    field: LatentImageField,
    *,
    dry_run: bool = False,
    batch: EncodeBatch | None = None,
) -> Outcome:
    """Queue a failed row again (a fresh token and attempt count); other rows are skipped."""
    image = getattr(instance, field.name)
    pk = instance.pk
    if image.state != FAILED:
        return Outcome(pk, "skipped", NOT_FAILED)
    try:
        data, source = source_of(image, from_decoded=False, decoder=None)
    except LookupError:
        return Outcome(pk, "skipped", "no staged or kept original to encode from; re-upload it")
    except Exception as exc:
        return Outcome(pk, "error", f"{type(exc).__name__}: {exc}")
    if dry_run:
        return Outcome(pk, "would stage", source=source)
    target = image.autoencoder or field.autoencoder
    token = stage_again(instance, field, None if source == "staged" else data, target, batch)
    if token is None:
        return Outcome(pk, "skipped", CHANGED)
    return Outcome(pk, "staged", token=token, source=source)


def reencode(
    model: type[models.Model],
    field: LatentImageField,
    pks: Sequence[Any],
    *,
    autoencoder: str | None = None,
) -> Report:
    """Re-encode the rows ``pks`` from their originals (the admin action)."""
    return _each_row(
        model,
        field,
        pks,
        lambda row, batch: reencode_row(row, field, autoencoder=autoencoder, batch=batch),
    )


def retry(model: type[models.Model], field: LatentImageField, pks: Sequence[Any]) -> Report:
    """Queue the failed rows among ``pks`` again (the admin action)."""
    return _each_row(model, field, pks, lambda row, batch: retry_row(row, field, batch=batch))


def _each_row(
    model: type[models.Model], field: LatentImageField, pks: Sequence[Any], act: Any
) -> Report:
    report = Report()
    rows = small_rows(model).filter(pk__in=pks)
    with EncodeBatch(model._meta.label, field.name) as batch:
        for instance in rows.iterator(chunk_size=200):
            report.add(act(instance, batch))
    return report


# --- origins ----------------------------------------------------------------------------------

_HEADER_PREFIX_BYTES = 4096


def stamped_headers(
    model: type[models.Model], field: LatentImageField, pks: Iterable[Any]
) -> dict[Any, LatentHeader | str]:
    """The header of each row's latents (or why it cannot be read), reading only a prefix.

    The header sits at the start of the blob, so ``SUBSTRING(blob, 1, 4096)`` is enough for
    almost every row; a longer header is read whole.
    """
    prefix = Substr(F(field.attname), 1, _HEADER_PREFIX_BYTES, output_field=BinaryField())
    rows = model._base_manager.filter(pk__in=list(pks)).annotate(_latent_head=prefix)
    found: dict[Any, LatentHeader | str] = {}
    for pk, head in rows.values_list("pk", "_latent_head"):
        if head is None:
            found[pk] = "no latents"
            continue
        try:
            found[pk] = read_header(bytes(head))
        except LatentFormatError as exc:
            if "truncated" in str(exc) and len(head) >= _HEADER_PREFIX_BYTES:
                blob = model._base_manager.filter(pk=pk).values_list(field.attname, flat=True)
                try:
                    found[pk] = read_header(bytes(blob.get()))
                except LatentFormatError as again:
                    found[pk] = str(again)
            else:
                found[pk] = str(exc)
    return found


def current_fingerprint(alias: str) -> str:
    """The weights fingerprint that autoencoder ``alias`` stamps now (loads it: worker extra)."""
    from django.utils.module_loading import import_string

    load = import_string("latentstore_workers.autoencoders.load_autoencoder")
    return load(alias).fingerprint


# --- quality ----------------------------------------------------------------------------------


def psnr(a: bytes, b: bytes) -> float:
    """Peak signal-to-noise ratio in dB between two encoded RGB pictures of the same size."""
    import numpy as np
    from PIL import Image

    from latentstore import quality

    with Image.open(io.BytesIO(a)) as first, Image.open(io.BytesIO(b)) as second:
        x = np.asarray(first.convert("RGB"))
        y = np.asarray(second.convert("RGB"))
    # inf, not quality.psnr's capped MAX_PSNR: latents_reencode tells identical round trips
    # apart with math.isfinite ("N identical", "all ... decode identically"), and a large
    # picture that differs by a few levels also measures the 100 dB cap.
    if x.shape == y.shape and np.array_equal(x, y):
        return math.inf
    return quality.psnr(x, y)
