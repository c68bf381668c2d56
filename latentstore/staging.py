"""Upload staging: an assigned image read, validated cheaply and held until ``save()``; and the
storage where originals are kept once encoded.

Validation parses the header only (format allow-list, pixel cap, size): no pixel decode, so a
bad upload is refused at once and a good one costs microseconds before the save.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.core.files.base import File
from django.core.files.storage import Storage, storages

from latentstore import conf
from latentstore.images import inspect_image, to_rgb


@dataclass(frozen=True)
class StagedUpload:
    """An assigned image, validated and read into memory, waiting for ``save()``."""

    data: bytes
    format: str
    width: int
    height: int
    name: str = ""


def read_upload(value: Any) -> tuple[bytes, str]:
    """Read an assignable value into bytes: UploadedFile, File, path, bytes or a PIL image.

    Returns the bytes and a file name ('' when there is none). Raises ``ValidationError`` past
    ``MAX_UPLOAD_BYTES`` (without reading more than that) and ``TypeError`` for other values.
    """
    limit = conf.get_settings()["MAX_UPLOAD_BYTES"]
    name = ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, (str, os.PathLike)):
        name = os.path.basename(os.fspath(value))
        size = os.path.getsize(value)
        if size > limit:
            raise _too_big(size, limit)
        with open(value, "rb") as fh:
            data = fh.read()
    elif _is_pil_image(value):
        data, name = _pil_bytes(value)
    elif isinstance(value, File) or hasattr(value, "read"):
        data, name = _file_bytes(value, limit)
    else:
        raise TypeError(
            f"Cannot assign {type(value).__name__!r} to a LatentImageField: use an UploadedFile, "
            "a Django File, a path, bytes or a PIL.Image (or None to clear)."
        )
    if len(data) > limit:
        raise _too_big(len(data), limit)
    return data, name


_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


def _pil_bytes(value: Any) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if value.mode not in _PNG_MODES:
        # CMYK, YCbCr, ...: PNG cannot hold them; apply the RGB policy now.
        value = to_rgb(value, background=conf.get_settings()["ALPHA_BACKGROUND"])
    # PNG is lossless; the encoder sees exactly the pixels that were assigned.
    value.save(buf, format="PNG")
    return buf.getvalue(), getattr(value, "filename", "") or ""


def _file_bytes(value: Any, limit: int) -> tuple[bytes, str]:
    name = os.path.basename(getattr(value, "name", "") or "")
    size = getattr(value, "size", None)
    if isinstance(size, int) and size > limit:
        raise _too_big(size, limit)
    if hasattr(value, "seek"):
        value.seek(0)
    if hasattr(value, "chunks"):
        data = b"".join(value.chunks())
    else:
        data = value.read(limit + 1)
    if hasattr(value, "seek"):
        value.seek(0)
    return data, name


def _too_big(size: int, limit: int) -> ValidationError:
    return ValidationError(
        "The file is %(size)s bytes; the limit is %(limit)s bytes.",
        code="too_large_bytes",
        params={"size": size, "limit": limit},
    )


def _is_pil_image(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(value, Image.Image)


def stage(value: Any) -> StagedUpload:
    """Validate an assignable value cheaply (header parse, no full decode) and stage it."""
    settings = conf.get_settings()
    data, name = read_upload(value)
    info = inspect_image(
        data,
        allowed_formats=settings["ALLOWED_FORMATS"],
        max_pixels=settings["MAX_PIXELS"],
    )
    return StagedUpload(
        data=data, format=info.format, width=info.width, height=info.height, name=name
    )


def originals_storage() -> Storage:
    """The Django storage that kept originals go to (``ORIGINALS_STORAGE``)."""
    return storages[conf.get_settings()["ORIGINALS_STORAGE"]]


def original_name(label: str, field_name: str, pk: Any, token: str) -> str:
    """The storage name under which a row's kept original is saved (``ORIGINALS_PREFIX``)."""
    prefix = conf.get_settings()["ORIGINALS_PREFIX"]
    return f"{prefix}{label.lower()}/{field_name}/{pk}-{token}"
