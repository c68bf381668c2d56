"""The encode protocol between the web tier and the workers: no torch here.

1. ``save()`` stages the upload in the row (fields.py) and, on commit, :func:`enqueue_encode`
   sends the task by name with ``(model label, pk, field, token)``; bulk paths (the sweeper,
   commands, saves inside :func:`batched_enqueue`) send :func:`enqueue_encode_batch` messages
   of ``(model label, field, [(pk, token), ...])``. Messages are pointers only.
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

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.apps import apps
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.db import connections, models, router, transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Cast
from django.utils import timezone

from latentstore import conf
from latentstore.fields import ENCODING, FAILED, PENDING, READY, LatentImageField
from latentstore.quality import MAX_PSNR, QualityPolicy

logger = logging.getLogger("latentstore.encoding")


def get_field(label: str, field_name: str) -> tuple[type[models.Model], LatentImageField]:
    """Resolve ``("app_label.Model", "image")`` to the model class and its LatentImageField."""
    model = apps.get_model(label)
    field = model._meta.get_field(field_name)
    if not isinstance(field, LatentImageField):
        raise TypeError(f"{label}.{field_name} is not a LatentImageField")
    return model, field


def _json_pk(pk: Any) -> Any:
    # A message carries JSON: a UUID (or other) primary key travels as its string.
    return pk if isinstance(pk, (int, str)) else str(pk)


# --- sending -------------------------------------------------------------------------------------

_collecting = threading.local()


@contextlib.contextmanager
def batched_enqueue() -> Iterator[None]:
    """Send the encodes of the saves committed inside as batch messages, on exit.

    Each save normally sends its own message when its transaction commits. Around a bulk import
    the per-row messages can be folded into a few batch messages::

        with batched_enqueue():
            with transaction.atomic():
                for upload in uploads:
                    Photo.objects.create(image=upload)

    Only encodes sent while the block runs are collected (put the block around the
    transaction, not inside it). Collected encodes are sent even if the block raises: their
    rows are committed.
    """
    stack = getattr(_collecting, "stack", None)
    if stack is None:
        stack = _collecting.stack = []
    collected: list[tuple[str, str, Any, str]] = []
    stack.append(collected)
    try:
        yield
    finally:
        stack.pop()
        target = stack[-1] if stack else None
        if target is not None:  # nested: the outermost block sends
            target.extend(collected)
        else:
            groups: dict[tuple[str, str], list[tuple[Any, str]]] = {}
            for label, field_name, pk, token in collected:
                groups.setdefault((label, field_name), []).append((pk, token))
            for (label, field_name), items in groups.items():
                enqueue_encode_batch(label, field_name, items)


def enqueue_encode(label: str, pk: Any, field_name: str, token: uuid.UUID | str) -> bool:
    """Send the encode task by name. Returns False (and logs) when the broker is unreachable.

    A failed send loses nothing: the row is pending in the database and the sweeper enqueues
    it once its lease has passed. Inside :func:`batched_enqueue` the row is collected instead.
    """
    stack = getattr(_collecting, "stack", None)
    if stack:
        stack[-1].append((label, field_name, pk, str(token)))
        return True
    from celery import current_app

    settings = conf.get_settings()
    try:
        current_app.send_task(
            settings["ENCODE_TASK"],
            args=[label, _json_pk(pk), field_name, str(token)],
            queue=settings["ENCODE_QUEUE"],
        )
    except Exception as exc:  # kombu raises several unrelated types for an unreachable broker
        logger.warning(
            "Could not enqueue the encode of %s pk=%s (%s, token %s); the sweeper will retry: %s",
            label,
            pk,
            field_name,
            token,
            exc,
        )
        return False
    return True


def enqueue_encode_batch(
    label: str,
    field_name: str,
    items: Sequence[tuple[Any, uuid.UUID | str]],
    *,
    countdown: float | None = None,
) -> int:
    """Enqueue the encode of many ``(pk, token)`` rows of one field; returns how many were sent.

    The bulk entry point for commands, the sweeper and bulk saves: one
    ``latentstore.encode_batch`` message per ``ENCODE_BATCH_SIZE`` rows, each carrying
    ``(label, field, [[pk, token], ...])``. ``countdown`` delays delivery (retries). Rows whose
    message cannot be sent stay pending in the database and are picked up by the sweeper.
    """
    settings = conf.get_settings()
    size = max(1, int(settings["ENCODE_BATCH_SIZE"]))
    pointers = [[_json_pk(pk), str(token)] for pk, token in items]
    sent = 0
    from celery import current_app

    for start in range(0, len(pointers), size):
        chunk = pointers[start : start + size]
        options: dict[str, Any] = {"queue": settings["ENCODE_QUEUE"]}
        if countdown:
            options["countdown"] = countdown
        try:
            current_app.send_task(
                settings["ENCODE_BATCH_TASK"], args=[label, field_name, chunk], **options
            )
        except Exception as exc:  # see enqueue_encode
            logger.warning(
                "Could not enqueue the encode of %d rows of %s (%s, pks %s); the sweeper will "
                "retry: %s",
                len(chunk),
                label,
                field_name,
                ", ".join(str(pk) for pk, _token in chunk),
                exc,
            )
            continue
        sent += len(chunk)
    return sent


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
    return {
        field.companion_attname(k) if k != "latents" else field.attname: v
        for k, v in values.items()
    }


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
    settings = conf.get_settings()
    items = _valid_items(items)
    col = field.companion_attname
    now = timezone.now()
    base = model._base_manager.all()
    db = router.db_for_write(model)
    claim_values = {
        **_columns(field, state=ENCODING, changed=now),
        col("attempts"): F(col("attempts")) + 1,
    }
    named_pks = [pk for pk, _token in items]
    filled_pks: list[Any] = []
    wanted = ("pk", "token", "staged", "attempts", "autoencoder", "width", "height")
    with transaction.atomic(using=db):
        if items:
            base.filter(_matching(field, items)).filter(_claimable(field, now)).update(
                **claim_values
            )
        rows = []
        if named_pks:
            # The claim time identifies this worker's claims: a row another worker claimed has
            # another (or no fresh) lease time.
            rows = list(
                base.filter(pk__in=named_pks, **{col("state"): ENCODING, col("changed"): now})
                .values_list(*[w if w == "pk" else col(w) for w in wanted])
                .order_by()
            )
        if fill > 0 and can_fill(db):
            sizes: dict[tuple[int, int], int] = {}
            for row in rows:
                sizes[(row[5], row[6])] = sizes.get((row[5], row[6]), 0) + 1
            candidates = base.filter(
                Q(**{f"{col('changed')}__lte": now}) | Q(**{f"{col('changed')}__isnull": True}),
                **{col("state"): PENDING},
            ).exclude(pk__in=named_pks)
            order: list[Any] = []
            if sizes:
                width, height = max(sizes, key=sizes.get)
                same = When(**{col("width"): width, col("height"): height}, then=Value(0))
                order.append(Case(same, default=Value(1)))
            order += [F(col("changed")).asc(nulls_first=True), "pk"]
            filled_pks = list(
                candidates.order_by(*order)
                .select_for_update(skip_locked=True)
                .values_list("pk", flat=True)[:fill]
            )
            if filled_pks:
                base.filter(pk__in=filled_pks, **{col("state"): PENDING}).update(**claim_values)
                rows += list(
                    base.filter(pk__in=filled_pks, **{col("state"): ENCODING, col("changed"): now})
                    .values_list(*[w if w == "pk" else col(w) for w in wanted])
                    .order_by()
                )
    quality = QualityPolicy.for_field(field)
    order_of = {str(pk): n for n, pk in enumerate([*named_pks, *filled_pks])}
    rows.sort(key=lambda row: order_of.get(str(row[0]), len(order_of)))
    filled = {str(pk) for pk in filled_pks}
    claims = []
    for pk, token, staged, attempts, autoencoder, width, height in rows:
        if attempts > settings["MAX_ATTEMPTS"]:
            fail_row(
                label,
                pk,
                field_name,
                str(token),
                f"Gave up after {attempts - 1} attempts to encode (the worker kept failing).",
            )
            continue
        if staged is None:
            missing = "The staged original is missing; re-upload it."
            fail_row(label, pk, field_name, str(token), missing)
            continue
        claims.append(
            Claim(
                label=label,
                pk=_json_pk(pk),
                field_name=field_name,
                token=str(token),
                staged=bytes(staged),
                attempts=attempts,
                autoencoder=autoencoder or field.autoencoder,
                width=width,
                height=height,
                latent_dtype=field.latent_dtype or settings["LATENT_DTYPE"],
                quality=quality,
                filled=str(pk) in filled,
            )
        )
    return claims


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


def originals_storage() -> Storage:
    """The Django storage that kept originals go to (``ORIGINALS_STORAGE``)."""
    return storages[conf.get_settings()["ORIGINALS_STORAGE"]]


def _original_name(claim: Claim) -> str:
    prefix = conf.get_settings()["ORIGINALS_PREFIX"]
    return f"{prefix}{claim.label.lower()}/{claim.field_name}/{claim.pk}-{claim.token}"


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
    col = field.companion_attname
    if psnrs is None:
        psnrs = [None] * len(results)
    psnrs = [None if p is None else min(float(p), MAX_PSNR) for p in psnrs]
    storage_names: list[str] = []
    for (claim, _blob, _digest), psnr in zip(results, psnrs, strict=True):
        name = ""
        if claim.quality.keeps_original(psnr):
            name = originals_storage().save(_original_name(claim), ContentFile(claim.staged))
        storage_names.append(name)
    pk_field = model._meta.pk
    db = router.db_for_write(model)
    now = timezone.now()
    match = _matching(field, [(c.pk, c.token) for c, _b, _d in results])
    with transaction.atomic(using=db):
        rows = model._base_manager.filter(match).exclude(**{col("state"): READY})
        eligible = {str(pk) for pk in rows.select_for_update().values_list("pk", flat=True)}
        chosen = [
            (pk_field.to_python(claim.pk), blob, digest, name, claim, psnr)
            for (claim, blob, digest), name, psnr in zip(results, storage_names, psnrs, strict=True)
            if str(pk_field.to_python(claim.pk)) in eligible
        ]
        if chosen:
            measured = any(item[5] is not None for item in chosen)

            def per_row(index: int, output: models.Field) -> Case:
                return Case(
                    *[When(pk=item[0], then=Value(item[index])) for item in chosen],
                    output_field=output,
                )

            updated = (
                model._base_manager.filter(
                    _matching(field, [(item[4].pk, item[4].token) for item in chosen])
                )
                .exclude(**{col("state"): READY})
                .update(
                    **{
                        field.attname: per_row(1, models.BinaryField()),
                        col("digest"): per_row(2, models.CharField()),
                        col("original"): per_row(3, models.CharField()),
                        col("autoencoder"): Case(
                            *[When(pk=item[0], then=Value(item[4].autoencoder)) for item in chosen],
                            output_field=models.CharField(),
                        ),
                        # Gate off (the default): nothing measured, one plain NULL rather than
                        # a CASE of NULLs. Cast: a CASE whose branches are all NULL is text on
                        # PostgreSQL, which a double precision column refuses.
                        col("psnr"): (
                            Cast(per_row(5, models.FloatField()), models.FloatField())
                            if measured
                            else None
                        ),
                    },
                    **_columns(field, state=READY, error="", staged=None, changed=now),
                )
            )
            if updated != len(chosen):  # only where rows could not be locked (SQLite: never)
                written = set(
                    model._base_manager.filter(
                        **{col("state"): READY, f"{col('digest')}__in": [c[2] for c in chosen]}
                    ).values_list("pk", flat=True)
                )
                eligible = {str(pk) for pk in written}
    stored = []
    for (claim, _blob, _digest), name in zip(results, storage_names, strict=True):
        ok = str(pk_field.to_python(claim.pk)) in eligible
        stored.append(ok)
        if not ok:
            if name:
                originals_storage().delete(name)
            logger.info(
                "Dropped a stale encode of %s pk=%s (%s)", claim.label, claim.pk, claim.field_name
            )
    return stored


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


def latent_fields() -> Iterator[tuple[type[models.Model], LatentImageField]]:
    """Every (model, LatentImageField) pair of the installed, concrete models."""
    for model in apps.get_models():
        for field in model._meta.local_fields:
            if isinstance(field, LatentImageField):
                yield model, field


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
    for model, field in latent_fields() if fields is None else fields:
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
