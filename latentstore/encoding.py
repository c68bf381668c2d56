"""The worker side of the encode protocol — claims, write-back, sweep: no torch here.

1. ``save()`` stages the upload in the row (fields.py) and, on commit, sends the task by name
   with ``(model label, pk, field, token)``; bulk paths (the sweeper, commands, saves inside
   ``batched_enqueue``) send batch messages of ``(model label, field, [(pk, token), ...])``.
   Messages are pointers only; sending lives in :mod:`latentstore.dispatch`, and this module
   is what the workers do with them.
2. A worker :func:`claim_batch`\\ es its rows: token must match, state ``pending`` (or
   ``encoding`` whose lease has expired); the claim sets ``encoding`` and the lease time
   (``<field>_changed``) and counts an attempt. On PostgreSQL a worker with room left in its
   batch also claims other pending rows of the field (``SELECT ... FOR UPDATE SKIP LOCKED``), so
   single messages still make full batches and two workers never take the same row.
3. It encodes and :func:`write_back_many`\\ s with an update conditioned on each token: a row
   re-uploaded meanwhile has a new token, so its stale result updates nothing and is dropped.
   A long batch :func:`renew`\\ s its leases as it goes.
4. :func:`fail` records a human-readable error and keeps the staged original; :func:`release`
   hands a row back (``pending``) for a retry after a transient error.
5. :func:`sweep` re-enqueues rows left pending, or encoding past their lease (the broker may have
   lost the message, or the worker died), and gives up after ``MAX_ATTEMPTS``.

At-least-once delivery plus the token-checked claim and write-back make the effect exactly-once:
a redelivered or duplicated message finds its rows ``encoding`` (leased) or ``ready`` and does
nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.apps import apps
from django.core.files.base import ContentFile
from django.db import connections, models, router, transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Cast
from django.utils import timezone

from latentstore import conf
from latentstore.columns import ENCODING, FAILED, PENDING, READY, by_column
from latentstore.dispatch import (  # noqa: F401  (re-exported: the encode protocol's entry points)
    batched_enqueue,
    enqueue_encode,
    enqueue_encode_batch,
    json_pk,
)
from latentstore.fields import LatentImageField
from latentstore.quality import MAX_PSNR, QualityPolicy
from latentstore.queries import all_latent_fields, get_field  # noqa: F401  (re-exported)
from latentstore.staging import original_name, originals_storage  # noqa: F401  (re-exported)

logger = logging.getLogger("latentstore.encoding")


# --- claiming ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One row a worker has taken for encoding."""

    label: str
    pk: Any
    field_name: str
    token: str
    staged: bytes
    attempts: int
    autoencoder: str
    width: int
    height: int
    latent_dtype: str
    quality: QualityPolicy  # the quality gate and whether the original is kept
    filled: bool = False  # taken to fill a batch, not named by the message

    @property
    def model(self) -> type[models.Model]:
        return apps.get_model(self.label)


def _columns(field: LatentImageField, **values: Any) -> dict[str, Any]:
    return by_column(field, values)


def _valid_items(items: Sequence[tuple[Any, Any]]) -> list[tuple[Any, str]]:
    valid = []
    for pk, token in items:
        try:
            valid.append((pk, str(uuid.UUID(str(token)))))
        except ValueError:
            logger.warning("Ignored an encode pointer with a malformed token %r (pk=%s)", token, pk)
    return valid


def _matching(field: LatentImageField, items: Sequence[tuple[Any, str]]) -> Q:
    """Rows named by ``(pk, token)`` pairs (a pk alone is not enough: rows get re-uploaded)."""
    match = Q(pk__in=[])
    for pk, token in items:
        match |= Q(pk=pk, **{field.companion_attname("token"): token})
    return match


def _claimable(field: LatentImageField, now: datetime) -> Q:
    """Pending rows, and rows whose encoding lease has run out (their worker is presumed dead)."""
    state, changed = field.companion_attname("state"), field.companion_attname("changed")
    cutoff = now - timedelta(seconds=conf.get_settings()["LEASE_SECONDS"])
    expired = Q(**{f"{changed}__lt": cutoff}) | Q(**{f"{changed}__isnull": True})
    return Q(**{state: PENDING}) | (Q(**{state: ENCODING}) & expired)


def can_fill(using: str | None = None) -> bool:
    """Whether workers may top batches up with other pending rows on this database."""
    connection = connections[using or "default"]
    return bool(connection.features.has_select_for_update_skip_locked)


def claim_batch(
    label: str, field_name: str, items: Sequence[tuple[Any, Any]], *, fill: int = 0
) -> list[Claim]:
    """Claim the rows named by ``(pk, token)`` items, plus up to ``fill`` other pending rows.

    A named row is claimed when its token matches and it is ``pending`` or ``encoding`` with an
    expired lease; a row another worker holds (fresh lease), a re-uploaded row (new token) and a
    finished row are skipped. Filling happens only where the database can skip locked rows
    (PostgreSQL, MySQL 8, Oracle): oldest pending rows first, those of the named rows' size
    first. Each claim sets ``encoding``, renews the lease and counts an attempt, all in one
    transaction, with O(1) queries for the whole batch. Rows past ``MAX_ATTEMPTS`` are marked
    failed instead, as are rows whose staged original is missing.
    """
    model, field = get_field(label, field_name)
    items = _valid_items(items)
    step = _ClaimStep(model, field, timezone.now())
    named_pks = [pk for pk, _token in items]
    filled_pks: list[Any] = []
    with transaction.atomic(using=router.db_for_write(model)):
        rows = step.take_named(items)
        if fill > 0 and can_fill(router.db_for_write(model)):
            filled_pks = step.pick_fillers(rows, named_pks, fill)
            rows += step.take_fillers(filled_pks)
    order_of = {str(pk): n for n, pk in enumerate([*named_pks, *filled_pks])}
    rows.sort(key=lambda row: order_of.get(str(row.pk), len(order_of)))
    filled = {str(pk) for pk in filled_pks}
    return [
        claim
        for row in rows
        if (claim := _claim_or_fail(label, field, row, filled=str(row.pk) in filled)) is not None
    ]


@dataclass(frozen=True)
class _ClaimedRow:
    """The columns of one row this worker has just claimed."""

    pk: Any
    token: uuid.UUID
    staged: bytes | memoryview | None
    attempts: int
    autoencoder: str
    width: int
    height: int


class _ClaimStep:
    """The queries of one :func:`claim_batch`, run inside its transaction."""

    def __init__(self, model: type[models.Model], field: LatentImageField, now: datetime) -> None:
        self.field = field
        self.now = now
        self.base = model._base_manager.all()
        col = field.companion_attname
        self.values = {
            **_columns(field, state=ENCODING, changed=now),
            col("attempts"): F(col("attempts")) + 1,
        }

    def _claimed(self, pks: Sequence[Any]) -> list[_ClaimedRow]:
        # The claim time identifies this worker's claims: a row another worker claimed has
        # another (or no fresh) lease time.
        col = self.field.companion_attname
        names = [col(name) for name in ("token", "staged", "attempts", "autoencoder")]
        rows = (
            self.base.filter(pk__in=pks, **{col("state"): ENCODING, col("changed"): self.now})
            .values_list("pk", *names, col("width"), col("height"))
            .order_by()
        )
        return [_ClaimedRow(*row) for row in rows]

    def take_named(self, items: Sequence[tuple[Any, str]]) -> list[_ClaimedRow]:
        """Claim the rows the message names, where their token matches and they are free."""
        if not items:
            return []
        matching = self.base.filter(_matching(self.field, items))
        if not matching.filter(_claimable(self.field, self.now)).update(**self.values):
            return []  # all taken by another claim, finished or re-uploaded: nothing to read
        return self._claimed([pk for pk, _token in items])

    def pick_fillers(
        self, rows: Sequence[_ClaimedRow], named_pks: Sequence[Any], fill: int
    ) -> list[Any]:
        """Lock up to ``fill`` other pending rows: the named rows' commonest size first, then
        the oldest; rows locked by another worker are skipped."""
        col = self.field.companion_attname
        candidates = self.base.filter(
            Q(**{f"{col('changed')}__lte": self.now}) | Q(**{f"{col('changed')}__isnull": True}),
            **{col("state"): PENDING},
        ).exclude(pk__in=named_pks)
        order: list[Any] = []
        sizes: dict[tuple[int, int], int] = {}
        for row in rows:
            sizes[(row.width, row.height)] = sizes.get((row.width, row.height), 0) + 1
        if sizes:
            width, height = max(sizes, key=sizes.get)
            same = When(**{col("width"): width, col("height"): height}, then=Value(0))
            order.append(Case(same, default=Value(1)))
        order += [F(col("changed")).asc(nulls_first=True), "pk"]
        locked = candidates.order_by(*order).select_for_update(skip_locked=True)
        return list(locked.values_list("pk", flat=True)[:fill])

    def take_fillers(self, pks: Sequence[Any]) -> list[_ClaimedRow]:
        """Claim the locked filler rows."""
        if not pks:
            return []
        state = self.field.companion_attname("state")
        self.base.filter(pk__in=pks, **{state: PENDING}).update(**self.values)
        return self._claimed(pks)


def _claim_or_fail(
    label: str, field: LatentImageField, row: _ClaimedRow, *, filled: bool
) -> Claim | None:
    """The :class:`Claim` of a claimed row, or None after failing a row that cannot be encoded
    (past ``MAX_ATTEMPTS``, or its staged original gone)."""
    settings = conf.get_settings()
    if row.attempts > settings["MAX_ATTEMPTS"]:
        message = f"Gave up after {row.attempts - 1} attempts to encode (the worker kept failing)."
        fail_row(label, row.pk, field.name, str(row.token), message)
        return None
    if row.staged is None:
        missing = "The staged original is missing; re-upload it."
        fail_row(label, row.pk, field.name, str(row.token), missing)
        return None
    return Claim(
        label=label,
        pk=json_pk(row.pk),
        field_name=field.name,
        token=str(row.token),
        staged=bytes(row.staged),
        attempts=row.attempts,
        autoencoder=row.autoencoder or field.autoencoder,
        width=row.width,
        height=row.height,
        latent_dtype=field.latent_dtype or settings["LATENT_DTYPE"],
        quality=QualityPolicy.for_field(field),
        filled=filled,
    )


def claim(label: str, pk: Any, field_name: str, token: str) -> Claim | None:
    """Claim one row (see :func:`claim_batch`); None when stale, finished or held by a worker.

    A message redelivered after its worker died finds the row ``encoding`` under a lease that
    has not run out yet and leaves it; once the lease expires the sweeper (or any message
    naming the row) claims it again, counting another attempt. Past ``MAX_ATTEMPTS`` the row
    is marked failed.
    """
    claims = claim_batch(label, field_name, [(pk, token)])
    return claims[0] if claims else None


def renew(claims: Sequence[Claim], now: datetime | None = None) -> int:
    """Extend the lease of claimed rows still ``encoding`` (a long batch, between its passes)."""
    if not claims:
        return 0
    model, field = get_field(claims[0].label, claims[0].field_name)
    return (
        model._base_manager.filter(_matching(field, [(c.pk, c.token) for c in claims]))
        .filter(**{field.companion_attname("state"): ENCODING})
        .update(**{field.companion_attname("changed"): now or timezone.now()})
    )


def release(claims: Sequence[Claim], message: str, *, retry_after: float = 0) -> int:
    """Hand claimed rows back (``pending``) after a transient failure, noting why in ``error``.

    The attempt stays counted; whoever claims the row next (the retry message, a worker filling
    its batch, or the sweeper) counts another, and past ``MAX_ATTEMPTS`` the row fails. For
    ``retry_after`` seconds the row's lease time lies in the future: workers filling batches
    leave it alone until then (the back-off), while a message naming it may take it.
    """
    if not claims:
        return 0
    model, field = get_field(claims[0].label, claims[0].field_name)
    not_before = timezone.now() + timedelta(seconds=retry_after)
    return (
        model._base_manager.filter(_matching(field, [(c.pk, c.token) for c in claims]))
        .filter(**{field.companion_attname("state"): ENCODING})
        .update(**_columns(field, state=PENDING, error=message[:2000], changed=not_before))
    )


# --- writing back -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Result:
    """One encode result on its way into the row."""

    claim: Claim
    pk: Any  # the model's own pk type (the claim carries its JSON form)
    blob: bytes
    digest: str
    original: str  # the kept original's storage name, or ''
    psnr: float | None


def write_back_many(
    results: Sequence[tuple[Claim, bytes, str]],
    psnrs: Sequence[float | None] | None = None,
) -> list[bool]:
    """Store each ``(claim, blob, digest)`` if its row still carries the claim's token.

    One transaction and two queries for the whole list: the eligible rows are locked
    (``SELECT ... FOR UPDATE``; a row being re-uploaded is waited for, then found with another
    token), then one ``UPDATE`` writes every blob. Returns, per item, whether it was stored;
    False means stale (dropped, logged). Kept originals are saved to storage first and deleted
    again for the dropped items. All claims must be of one model and field.

    ``psnrs`` (one per item, None where the gate is off) are the round-trip PSNRs the quality
    gate measured: stored in ``<field>_psnr`` and, with ``keep_original="low_fidelity"``,
    deciding whether the original is kept.
    """
    if not results:
        return []
    first = results[0][0]
    model, field = get_field(first.label, first.field_name)
    if psnrs is None:
        psnrs = [None] * len(results)
    to_pk = model._meta.pk.to_python
    items = [
        _Result(
            claim=claim,
            pk=to_pk(claim.pk),
            blob=blob,
            digest=digest,
            original=_keep_original(claim, capped),
            psnr=capped,
        )
        for (claim, blob, digest), psnr in zip(results, psnrs, strict=True)
        for capped in [None if psnr is None else min(float(psnr), MAX_PSNR)]
    ]
    with transaction.atomic(using=router.db_for_write(model)):
        stored_pks = _store(model, field, items)
    stored = []
    for item in items:
        ok = str(item.pk) in stored_pks
        stored.append(ok)
        if not ok:
            if item.original:
                originals_storage().delete(item.original)
            claim = item.claim
            # Not a problem: the row was re-uploaded or finished by another claim meanwhile.
            logger.info(
                "Dropped a stale encode of %s pk=%s (%s)", claim.label, claim.pk, claim.field_name
            )
    return stored


def _keep_original(claim: Claim, psnr: float | None) -> str:
    """Save the claim's original to the originals storage if its policy keeps it; its name."""
    if not claim.quality.keeps_original(psnr):
        return ""
    name = original_name(claim.label, claim.field_name, claim.pk, claim.token)
    return originals_storage().save(name, ContentFile(claim.staged))


def _store(
    model: type[models.Model], field: LatentImageField, items: Sequence[_Result]
) -> set[str]:
    """Lock the rows that still carry their claim's token and write their results; the pks
    (as strings) of the rows written."""
    col = field.companion_attname
    base = model._base_manager
    match = _matching(field, [(i.claim.pk, i.claim.token) for i in items])
    rows = base.filter(match).exclude(**{col("state"): READY})
    eligible = {str(pk) for pk in rows.select_for_update().values_list("pk", flat=True)}
    chosen = [item for item in items if str(item.pk) in eligible]
    if not chosen:
        return eligible

    def per_row(value: Any, output: models.Field) -> Case:
        whens = [When(pk=item.pk, then=Value(value(item))) for item in chosen]
        return Case(*whens, output_field=output)

    measured = any(item.psnr is not None for item in chosen)
    updated = (
        base.filter(_matching(field, [(i.claim.pk, i.claim.token) for i in chosen]))
        .exclude(**{col("state"): READY})
        .update(
            **{
                field.attname: per_row(lambda i: i.blob, models.BinaryField()),
                col("digest"): per_row(lambda i: i.digest, models.CharField()),
                col("original"): per_row(lambda i: i.original, models.CharField()),
                col("autoencoder"): per_row(lambda i: i.claim.autoencoder, models.CharField()),
                # Gate off (the default): nothing measured, one plain NULL rather than a CASE
                # of NULLs. Cast: a CASE whose branches are all NULL is text on PostgreSQL,
                # which a double precision column refuses.
                col("psnr"): (
                    Cast(per_row(lambda i: i.psnr, models.FloatField()), models.FloatField())
                    if measured
                    else None
                ),
            },
            **_columns(field, state=READY, error="", staged=None, changed=timezone.now()),
        )
    )
    if updated != len(chosen):  # only where rows could not be locked (SQLite: never)
        written = base.filter(
            **{col("state"): READY, f"{col('digest')}__in": [i.digest for i in chosen]}
        ).values_list("pk", flat=True)
        eligible = {str(pk) for pk in written}
    return eligible


def write_back(claim: Claim, blob: bytes, digest: str, psnr: float | None = None) -> bool:
    """Store the latents if the row still carries the claim's token; False means stale (dropped).

    ``psnr``: the quality gate's round-trip measurement, if any (see :func:`write_back_many`).
    """
    return write_back_many([(claim, blob, digest)], psnrs=[psnr])[0]


def fail_row(label: str, pk: Any, field_name: str, token: str, message: str) -> bool:
    """Mark the row failed with ``message`` if the token matches; the staged original stays."""
    model, field = get_field(label, field_name)
    updated = (
        model._base_manager.filter(pk=pk, **{field.companion_attname("token"): token})
        .exclude(**{field.companion_attname("state"): READY})
        .update(**_columns(field, state=FAILED, error=message[:2000], changed=timezone.now()))
    )
    if updated:
        logger.warning("Encode failed for %s pk=%s (%s): %s", label, pk, field_name, message)
    return bool(updated)


def fail(claim: Claim, message: str) -> bool:
    """Mark a claimed row failed (see :func:`fail_row`)."""
    return fail_row(claim.label, claim.pk, claim.field_name, claim.token, message)


# --- sweeping ------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    requeued: int = 0
    failed: int = 0
    not_sent: int = 0


def stuck_rows(model: type[models.Model], field: LatentImageField, cutoff: Any) -> models.QuerySet:
    """Rows whose ``field`` is pending/encoding and was last touched before ``cutoff``."""
    state_col, changed_col = field.companion_attname("state"), field.companion_attname("changed")
    return model._base_manager.filter(
        Q(**{f"{changed_col}__lt": cutoff}) | Q(**{f"{changed_col}__isnull": True}),
        **{f"{state_col}__in": [PENDING, ENCODING]},
    )


def sweep(
    now: Any = None,
    lease: float | None = None,
    fields: Sequence[tuple[type[models.Model], LatentImageField]] | None = None,
) -> SweepResult:
    """Re-enqueue rows stuck pending/encoding past their lease; fail those past the attempt cap.

    The database is the record of truth: a queue lost with the broker (Redis without
    persistence) costs only the lease's delay. Rows go out in batch messages
    (:func:`enqueue_encode_batch`), oldest first. Each requeue sets the row ``pending`` with a
    new lease, so an ``encoding`` row whose worker died becomes claimable, and a row is not
    enqueued again until another lease passes. ``fields`` limits the sweep to some
    ``(model, field)`` pairs (default: every LatentImageField).
    """
    settings = conf.get_settings()
    now = now or timezone.now()
    lease = settings["LEASE_SECONDS"] if lease is None else lease
    cutoff = now - timedelta(seconds=lease)
    size = max(1, int(settings["ENCODE_BATCH_SIZE"]))
    result = SweepResult()
    for model, field in all_latent_fields() if fields is None else fields:
        col = field.companion_attname
        label = model._meta.label
        stuck = stuck_rows(model, field, cutoff)
        # A pending row without a token (written by hand, or by a bulk update that skipped the
        # field) could never be claimed: give it one, so it is encoded rather than stuck forever.
        for pk in stuck.filter(**{f"{col('token')}__isnull": True}).values_list("pk", flat=True):
            stuck.filter(pk=pk, **{f"{col('token')}__isnull": True}).update(
                **{col("token"): uuid.uuid4()}
            )
        capped = stuck.filter(**{f"{col('attempts')}__gte": settings["MAX_ATTEMPTS"]})
        for pk, token, attempts in capped.values_list("pk", col("token"), col("attempts")):
            message = f"Gave up after {attempts} attempts to encode (lease expired)."
            if fail_row(label, pk, field.name, str(token), message):
                result.failed += 1
        rows = (
            stuck.filter(**{f"{col('attempts')}__lt": settings["MAX_ATTEMPTS"]})
            .order_by(F(col("changed")).asc(nulls_first=True), "pk")
            .values_list("pk", col("token"))
        )
        chunk: list[tuple[Any, str]] = []
        for pk, token in rows.iterator(chunk_size=size):
            chunk.append((pk, str(token)))
            if len(chunk) == size:
                _requeue(model, field, chunk, stuck, now, result)
                chunk = []
        if chunk:
            _requeue(model, field, chunk, stuck, now, result)
    return result


def _requeue(
    model: type[models.Model],
    field: LatentImageField,
    chunk: list[tuple[Any, str]],
    stuck: models.QuerySet,
    now: datetime,
    result: SweepResult,
) -> None:
    renewed = stuck.filter(_matching(field, chunk)).update(
        **_columns(field, state=PENDING, changed=now)
    )
    if not renewed:
        return
    result.requeued += renewed
    sent = enqueue_encode_batch(model._meta.label, field.name, chunk)
    result.not_sent += len(chunk) - sent
