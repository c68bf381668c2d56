"""The encode protocol between the web tier and the workers: no torch here.

1. ``save()`` stages the upload in the row (fields.py) and, on commit, :func:`enqueue_encode`
   sends the task by name with ``(model label, pk, field, token)``.
2. A worker :func:`claim`\\ s the row (token must match, state pending/encoding), encodes, and
   :func:`write_back`\\ s with an update conditioned on the same token: a row re-uploaded
   meanwhile has a new token, so the stale result updates zero rows and is dropped.
3. :func:`fail` records a human-readable error and keeps the staged original.
4. :func:`sweep` re-enqueues rows left pending/encoding past their lease (the broker may have
   lost the message) and gives up after ``MAX_ATTEMPTS``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.apps import apps
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.db import models, transaction
from django.db.models import F, Q
from django.utils import timezone

from latentstore import conf
from latentstore.fields import ENCODING, FAILED, PENDING, READY, LatentImageField

logger = logging.getLogger("latentstore.encoding")


def get_field(label: str, field_name: str) -> tuple[type[models.Model], LatentImageField]:
    """Resolve ``("app_label.Model", "image")`` to the model class and its LatentImageField."""
    model = apps.get_model(label)
    field = model._meta.get_field(field_name)
    if not isinstance(field, LatentImageField):
        raise TypeError(f"{label}.{field_name} is not a LatentImageField")
    return model, field


def _json_pk(pk: Any) -> Any:
    return pk if isinstance(pk, (int, str)) else str(pk)


def enqueue_encode(label: str, pk: Any, field_name: str, token: uuid.UUID | str) -> bool:
    """Send the encode task by name. Returns False (and logs) when the broker is unreachable.

    A failed send loses nothing: the row is pending in the database and the sweeper enqueues
    it once its lease has passed.
    """
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
    label: str, field_name: str, items: Sequence[tuple[Any, uuid.UUID | str]]
) -> int:
    """Enqueue the encode of many ``(pk, token)`` rows of one field; returns how many were sent.

    The bulk entry point for commands, the sweeper and bulk saves. Rows whose message cannot be
    sent stay pending in the database and are picked up by the sweeper.
    """
    return sum(bool(enqueue_encode(label, pk, field_name, token)) for pk, token in items)


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
    keep_original: bool

    @property
    def model(self) -> type[models.Model]:
        return apps.get_model(self.label)


def _columns(field: LatentImageField, **values: Any) -> dict[str, Any]:
    return {
        field.companion_attname(k) if k != "latents" else field.attname: v
        for k, v in values.items()
    }


def claim(label: str, pk: Any, field_name: str, token: str) -> Claim | None:
    """Mark the row ``encoding`` if its token still matches; None when stale or already done.

    Redelivery after a worker died mid-encode finds the row ``encoding`` and claims it again;
    each claim counts an attempt, and past ``MAX_ATTEMPTS`` the row is marked failed.
    """
    model, field = get_field(label, field_name)
    settings = conf.get_settings()
    rows = model._base_manager.filter(
        Q(**{f"{field.name}_state__in": [PENDING, ENCODING]}),
        pk=pk,
        **{f"{field.name}_token": token},
    )
    with transaction.atomic(using=rows.db):
        updated = rows.update(
            **_columns(field, state=ENCODING, changed=timezone.now()),
            **{field.companion_attname("attempts"): F(field.companion_attname("attempts")) + 1},
        )
        if not updated:
            return None
        staged, attempts, autoencoder, width, height = rows.values_list(
            *(
                field.companion_attname(s)
                for s in ("staged", "attempts", "autoencoder", "width", "height")
            )
        ).get()
    if attempts > settings["MAX_ATTEMPTS"]:
        fail_row(
            label,
            pk,
            field_name,
            token,
            f"Gave up after {attempts - 1} attempts to encode (the worker kept failing).",
        )
        return None
    if staged is None:
        fail_row(label, pk, field_name, token, "The staged original is missing; re-upload it.")
        return None
    keep = field.keep_original if field.keep_original is not None else settings["KEEP_ORIGINAL"]
    return Claim(
        label=label,
        pk=pk,
        field_name=field_name,
        token=str(token),
        staged=bytes(staged),
        attempts=attempts,
        autoencoder=autoencoder or field.autoencoder,
        width=width,
        height=height,
        latent_dtype=field.latent_dtype or settings["LATENT_DTYPE"],
        keep_original=bool(keep),
    )


def originals_storage() -> Storage:
    """The Django storage that kept originals go to (``ORIGINALS_STORAGE``)."""
    return storages[conf.get_settings()["ORIGINALS_STORAGE"]]


def _original_name(claim: Claim) -> str:
    prefix = conf.get_settings()["ORIGINALS_PREFIX"]
    return f"{prefix}{claim.label.lower()}/{claim.field_name}/{claim.pk}-{claim.token}"


def write_back(claim: Claim, blob: bytes, digest: str) -> bool:
    """Store the latents if the row still carries the claim's token; False means stale (dropped)."""
    model, field = get_field(claim.label, claim.field_name)
    original = ""
    if claim.keep_original:
        original = originals_storage().save(_original_name(claim), ContentFile(claim.staged))
    updated = (
        model._base_manager.filter(pk=claim.pk, **{field.companion_attname("token"): claim.token})
        .exclude(**{field.companion_attname("state"): READY})
        .update(
            **_columns(
                field,
                latents=blob,
                state=READY,
                error="",
                staged=None,
                digest=digest,
                changed=timezone.now(),
                original=original,
                autoencoder=claim.autoencoder,
            )
        )
    )
    if not updated:
        if original:
            originals_storage().delete(original)
        logger.info(
            "Dropped a stale encode of %s pk=%s (%s)", claim.label, claim.pk, claim.field_name
        )
        return False
    return True


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
    persistence) costs only the lease's delay. Each requeue renews the lease, so a row is not
    enqueued again until another lease passes. ``fields`` limits the sweep to some
    ``(model, field)`` pairs (default: every LatentImageField).
    """
    settings = conf.get_settings()
    now = now or timezone.now()
    lease = settings["LEASE_SECONDS"] if lease is None else lease
    cutoff = now - timedelta(seconds=lease)
    result = SweepResult()
    for model, field in latent_fields() if fields is None else fields:
        state_col, changed_col = (
            field.companion_attname("state"),
            field.companion_attname("changed"),
        )
        token_col, attempts_col = (
            field.companion_attname("token"),
            field.companion_attname("attempts"),
        )
        stuck = stuck_rows(model, field, cutoff)
        for pk, token, attempts in stuck.values_list("pk", token_col, attempts_col).iterator():
            if attempts >= settings["MAX_ATTEMPTS"]:
                if fail_row(
                    model._meta.label,
                    pk,
                    field.name,
                    str(token),
                    f"Gave up after {attempts} attempts to encode (lease expired).",
                ):
                    result.failed += 1
                continue
            renewed = model._base_manager.filter(
                pk=pk, **{token_col: token, f"{state_col}__in": [PENDING, ENCODING]}
            ).update(**{changed_col: now})
            if not renewed:
                continue
            result.requeued += 1
            if not enqueue_encode(model._meta.label, pk, field.name, token):
                result.not_sent += 1
    return result
