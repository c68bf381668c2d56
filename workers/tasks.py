"""The worker's Celery tasks: encode uploads, decode latents into the shared cache.

Both are registered by *name* (``latentstore.encode``, ``latentstore.decode``); the web tier
sends them with ``send_task`` and never imports this module (or torch).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.db import DatabaseError, InterfaceError

from latentstore import conf, encoding
from latentstore.latents import blob_digest, pack

logger = logging.getLogger("workers.tasks")

RETRY_DELAYS = (2, 10, 30)  # seconds; a transient failure (database, OOM) is retried


@shared_task(
    name="latentstore.encode",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=len(RETRY_DELAYS),
)
def encode(self, label: str, pk: Any, field_name: str, token: str) -> str:
    """Encode one staged upload and write the latents back (token-checked)."""
    from latentstore.images import open_rgb
    from workers.autoencoders import load_autoencoder
    from workers.codec import NonFiniteLatents, encode_images

    try:
        claim = encoding.claim(label, pk, field_name, token)
    except (DatabaseError, InterfaceError) as exc:
        raise self.retry(exc=exc, countdown=_delay(self)) from exc
    if claim is None:
        return "stale"

    settings = conf.get_settings()
    try:
        picture = open_rgb(claim.staged, background=settings["ALPHA_BACKGROUND"])
    except (ValueError, OSError) as exc:
        encoding.fail(claim, f"The image could not be read: {exc}")
        return "failed"

    try:
        ae = load_autoencoder(claim.autoencoder)
    except KeyError as exc:  # no such alias: a configuration error, not the image's fault
        encoding.fail(claim, str(exc.args[0]) if exc.args else str(exc))
        return "failed"
    except Exception as exc:
        logger.exception("Loading autoencoder %r failed", claim.autoencoder)
        if self.request.retries >= self.max_retries:
            encoding.fail(claim, f"Loading autoencoder {claim.autoencoder!r} failed: {exc}")
            return "failed"
        raise self.retry(exc=exc, countdown=_delay(self)) from exc

    try:
        (latents,) = encode_images(ae, [picture])
    except NonFiniteLatents:
        encoding.fail(claim, "The autoencoder produced non-finite latents (NaN/Inf).")
        return "failed"

    blob = pack(
        latents,
        autoencoder=ae.alias,
        family=ae.family,
        fingerprint=ae.fingerprint,
        scaling_factor=ae.scaling_factor,
        shift_factor=ae.shift_factor,
        width=picture.width,
        height=picture.height,
        downsample=ae.downsample,
        dtype=claim.latent_dtype,
    )
    try:
        written = encoding.write_back(claim, blob, blob_digest(blob))
    except (DatabaseError, InterfaceError) as exc:
        # The claim stays "encoding"; the retry claims again with the same token.
        raise self.retry(exc=exc, countdown=_delay(self)) from exc
    return "ready" if written else "stale"


@shared_task(name="latentstore.decode", bind=True, acks_late=True, ignore_result=True)
def decode(
    self, label: str, pk: Any, field_name: str, alias: str, size: list[int], format: str, key: str
) -> str:
    """Decode one row with decoder ``alias`` and put the picture in the shared cache at ``key``."""
    from latentstore.decoding import get_cache, render

    model, field = encoding.get_field(label, field_name)
    cache = get_cache()
    try:
        instance = model._base_manager.get(pk=pk)
        image = getattr(instance, field.name)
        data = render(image, alias, (int(size[0]), int(size[1])), format)
    except Exception as exc:
        logger.exception("Decode of %s pk=%s with %r failed", label, pk, alias)
        cache.set(key + ":error", f"{type(exc).__name__}: {exc}", 60)
        return "failed"
    cache.set(key, data, conf.get_settings()["CACHE_TIMEOUT"])
    return "ok"


def _delay(task) -> int:
    return RETRY_DELAYS[min(task.request.retries, len(RETRY_DELAYS) - 1)]
