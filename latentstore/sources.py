"""The source files of an import: one file read from its storage and checked as an upload is.

:func:`read_source` reads in chunks, never past the limit (``MAX_UPLOAD_BYTES``), hashing as it
goes; :func:`check_image` validates the bytes as an upload is validated and (unless told not
to) decodes the pixels once, cheaply, so a truncated file is refused before it is staged;
:func:`prepare` does both (on a reader thread of :mod:`latentstore.importing`). What cannot be
imported raises :class:`SourceError`, whose message is the reason in the import's report.
:func:`shared_names` says which files another row holds too (those are never deleted).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models

from latentstore import conf
from latentstore.images import inspect_image

__all__ = ["Source", "SourceError", "check_image", "prepare", "read_source", "shared_names"]

_CHUNK = 256 * 1024


class SourceError(Exception):
    """A source file that cannot be imported; the message is the reason in the report."""


@dataclass(frozen=True)
class Source:
    """A source file read into memory (at most ``MAX_UPLOAD_BYTES``) and validated."""

    data: bytes
    sha256: str
    format: str
    width: int
    height: int


def read_source(storage: Any, name: str, limit: int) -> tuple[bytes, str]:
    """The file's bytes and sha256, read in chunks and never more than ``limit`` + 1 bytes."""
    try:
        fh = storage.open(name, "rb")
    except FileNotFoundError:
        raise SourceError("missing file") from None
    except Exception as exc:  # a storage backend raises its own types (botocore, OSError, ...)
        raise SourceError(f"storage error: {type(exc).__name__}: {exc}") from None
    digest = hashlib.sha256()
    buf = bytearray()
    try:
        with fh:
            try:
                size = fh.size
            except Exception:  # some storages cannot tell before reading
                size = None
            if isinstance(size, int) and size > limit:
                raise SourceError(f"too large: {size} bytes, the limit is {limit}")
            while True:
                block = fh.read(min(_CHUNK, limit + 1 - len(buf)))
                if not block:
                    break
                buf += block
                digest.update(block)
                if len(buf) > limit:
                    raise SourceError(f"too large: more than {limit} bytes")
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError("missing file") from None
    except Exception as exc:
        raise SourceError(f"storage error: {type(exc).__name__}: {exc}") from None
    return bytes(buf), digest.hexdigest()


def check_image(data: bytes, verify: bool = True) -> tuple[str, int, int]:
    """Validate ``data`` as an upload is validated; with ``verify``, decode its pixels once.

    Returns (format, width, height). Raises :class:`SourceError` with the reason.
    """
    settings = conf.get_settings()
    try:
        info = inspect_image(
            data, allowed_formats=settings["ALLOWED_FORMATS"], max_pixels=settings["MAX_PIXELS"]
        )
    except ValidationError as exc:
        reason = "; ".join(exc.messages)
        raise SourceError(f"{exc.code or 'invalid'}: {reason}" if exc.code else reason) from None
    if verify:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data), formats=[info.format]) as img:
                if img.format == "JPEG":
                    # All of the entropy-coded data is read at 1/8 scale too: a cut file
                    # still fails, at a fraction of a full decode.
                    img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
            raise SourceError(f"truncated or corrupt: {exc}") from None
    return info.format, info.width, info.height


def prepare(storage: Any, name: str, limit: int, verify: bool) -> Source:
    """Read and validate one source (runs on a thread)."""
    data, sha = read_source(storage, name, limit)
    fmt, width, height = check_image(data, verify)
    return Source(data=data, sha256=sha, format=fmt, width=width, height=height)


def _file_fields(model: type[models.Model]) -> list[tuple[type[models.Model], Any]]:
    """Every (model, FileField) of the registry ``model`` belongs to (historical ones too)."""
    return [
        (other, f)
        for other in model._meta.apps.get_models()
        for f in other._meta.concrete_fields
        if isinstance(f, models.FileField)
    ]


def shared_names(
    model: type[models.Model], source_field: Any, names: dict[str, Any], db: str
) -> set[str]:
    """The names among ``names`` (name -> the row's pk) that any other row holds.

    Every file field of every installed model counts, whatever its storage: when in doubt,
    a file is kept.
    """
    shared: set[str] = set()
    wanted = list(names)
    for other, f in _file_fields(model):
        same = other._meta.concrete_model is model._meta.concrete_model
        hits = other._base_manager.using(db).filter(**{f"{f.attname}__in": wanted})
        for pk, value in hits.values_list("pk", f.attname):
            if same and f.attname == source_field.attname and str(pk) == str(names.get(value)):
                continue  # the row itself
            shared.add(value)
    return shared
