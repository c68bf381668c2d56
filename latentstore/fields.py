"""LatentImageField: Django's Field / Descriptor / value-object triad for images kept as latents.

The field owns one ``bytea``/``BLOB`` column (the latent blob) and adds companion columns named
after it (``<name>_state``, ``<name>_token``, ... see :data:`COMPANIONS`) that appear in
migrations like any other field.

Assigning an upload stages it: on ``save()`` the original bytes, a fresh token, state
``pending`` and the displayed size are written in the save's own statement, and the encode task
is sent once the transaction commits, carrying only ``(model label, pk, field, token)``.

A save that did not assign a new image leaves the field's columns exactly as the database has
them (``SET col = col``), so saving an object loaded before a worker finished never overwrites
the worker's result.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django import forms
from django.core import checks
from django.core.exceptions import ValidationError
from django.core.files.base import File
from django.db import connections, models, transaction
from django.db.models import F, signals
from django.utils import timezone

from latentstore import conf
from latentstore.latents import STORAGE_DTYPES, LatentHeader, read_header, unpack

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

EMPTY, PENDING, ENCODING, READY, FAILED = "empty", "pending", "encoding", "ready", "failed"
STATE_CHOICES = [
    (EMPTY, "empty"),
    (PENDING, "pending"),
    (ENCODING, "encoding"),
    (READY, "ready"),
    (FAILED, "failed"),
]


# --- companion columns -------------------------------------------------------------------------


class CompanionField:
    """Mixin for the columns a LatentImageField adds next to its own.

    It knows its owner field so that a save which did not touch the image writes ``col = col``
    instead of the in-memory (possibly stale) value. When a migration state already carries the
    column (models rendered from migrations), the owner's copy is not added a second time.
    """

    def __init__(self, *args: Any, owner: str, **kwargs: Any) -> None:
        self.owner = owner
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> tuple[str, str, list, dict]:
        name, path, args, kwargs = super().deconstruct()
        kwargs["owner"] = self.owner
        return name, path, args, kwargs

    def contribute_to_class(self, cls: type[models.Model], name: str, **kwargs: Any) -> None:
        if any(f.name == name for f in cls._meta.local_fields):
            return
        super().contribute_to_class(cls, name, **kwargs)

    def pre_save(self, model_instance: models.Model, add: bool) -> Any:
        if add or self.owner in _dirty(model_instance):
            return super().pre_save(model_instance, add)
        return F(self.attname)


class LatentStateField(CompanionField, models.CharField):
    pass


class LatentTokenField(CompanionField, models.UUIDField):
    pass


class LatentTextField(CompanionField, models.TextField):
    pass


class LatentCharField(CompanionField, models.CharField):
    pass


class LatentBytesField(CompanionField, models.BinaryField):
    pass


class LatentSizeField(CompanionField, models.PositiveIntegerField):
    pass


class LatentCountField(CompanionField, models.PositiveSmallIntegerField):
    pass


class LatentTimeField(CompanionField, models.DateTimeField):
    pass


class LatentFloatField(CompanionField, models.FloatField):
    pass


def _companions(owner: str) -> dict[str, models.Field]:
    """The companion columns for a LatentImageField named ``owner``, keyed by suffix."""
    common = {"owner": owner, "editable": False}
    return {
        "state": LatentStateField(
            max_length=16, choices=STATE_CHOICES, default=EMPTY, db_index=True, **common
        ),
        "token": LatentTokenField(null=True, blank=True, **common),
        "error": LatentTextField(blank=True, default="", **common),
        "staged": LatentBytesField(null=True, blank=True, **common),
        "width": LatentSizeField(null=True, blank=True, **common),
        "height": LatentSizeField(null=True, blank=True, **common),
        "attempts": LatentCountField(default=0, **common),
        "changed": LatentTimeField(null=True, blank=True, **common),
        "digest": LatentCharField(max_length=64, blank=True, default="", **common),
        "autoencoder": LatentCharField(max_length=64, blank=True, default="", **common),
        "original": LatentCharField(max_length=255, blank=True, default="", **common),
        # Round-trip PSNR (dB) measured by the encode-time quality gate; None when not measured.
        "psnr": LatentFloatField(null=True, blank=True, **common),
    }


#: Suffixes of the companion columns (``<field>_<suffix>``).
COMPANIONS: tuple[str, ...] = tuple(_companions("x"))
_COMPANION_DEFAULTS: dict[str, Any] = {k: f.get_default() for k, f in _companions("x").items()}


def _dirty(instance: models.Model) -> set[str]:
    return instance.__dict__.setdefault("_latentstore_dirty", set())


# --- what the descriptor holds in instance.__dict__[attname] ------------------------------------


class StoredBlob(bytes):
    """The latent blob exactly as read from the database (not a new upload)."""


class _StoredNone:
    """The database said NULL: no latents (yet).

    A sentinel rather than None because Model.__init__ cannot tell a NULL read from the database
    from a user's ``obj.image = None`` (which clears the image); ``values()`` shows it too.
    """

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "<no stored latents>"


STORED_NONE = _StoredNone()


@dataclass(frozen=True)
class StagedUpload:
    """An assigned image, validated and read into memory, waiting for ``save()``."""

    data: bytes
    format: str
    width: int
    height: int
    name: str = ""


_CLEAR = object()


def read_upload(value: Any) -> tuple[bytes, str]:
    """Read an assignable value into bytes: UploadedFile, File, path, bytes or a PIL image."""
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
        buf = io.BytesIO()
        if value.mode not in _PNG_MODES:
            # CMYK, YCbCr, ...: PNG cannot hold them; apply the RGB policy now.
            from latentstore.images import to_rgb

            value = to_rgb(value, background=conf.get_settings()["ALPHA_BACKGROUND"])
        # PNG is lossless; the encoder sees exactly the pixels that were assigned.
        value.save(buf, format="PNG")
        data = buf.getvalue()
        name = getattr(value, "filename", "") or ""
    elif isinstance(value, File) or hasattr(value, "read"):
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
    else:
        raise TypeError(
            f"Cannot assign {type(value).__name__!r} to a LatentImageField: use an UploadedFile, "
            "a Django File, a path, bytes or a PIL.Image (or None to clear)."
        )
    if len(data) > limit:
        raise _too_big(len(data), limit)
    return data, name


_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


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
    from latentstore.images import inspect_image

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


# --- the value object ---------------------------------------------------------------------------


class LatentImage:
    """What ``obj.image`` returns: state, size and latents of one stored image, decoded on demand.

    Nothing here touches the latent blob until it is asked for (``latents``, ``nbytes``,
    ``origin``, ``decode()``, ``preview()``); with the blob deferred in the queryset it is then
    fetched by one query.
    """

    def __init__(self, instance: models.Model, field: LatentImageField) -> None:
        self.instance = instance
        self.field = field
        self._unpacked: tuple[bytes, LatentHeader, np.ndarray] | None = None
        self._fetched: Any = _MISSING

    # companion columns
    def _companion(self, suffix: str) -> Any:
        return getattr(self.instance, self.field.companion_attname(suffix))

    @property
    def state(self) -> str:
        """``empty``, ``pending``, ``encoding``, ``ready`` or ``failed``."""
        if isinstance(self.instance.__dict__.get(self.field.attname), StagedUpload):
            return PENDING
        return self._companion("state")

    @property
    def error(self) -> str:
        """Why the row is ``failed`` (empty otherwise)."""
        return self._companion("error")

    @property
    def token(self) -> uuid.UUID | None:
        return self._companion("token")

    @property
    def width(self) -> int | None:
        """Displayed width in pixels (after EXIF orientation), known from the moment of save."""
        staged = self.instance.__dict__.get(self.field.attname)
        return staged.width if isinstance(staged, StagedUpload) else self._companion("width")

    @property
    def height(self) -> int | None:
        """Displayed height in pixels (after EXIF orientation)."""
        staged = self.instance.__dict__.get(self.field.attname)
        return staged.height if isinstance(staged, StagedUpload) else self._companion("height")

    @property
    def digest(self) -> str:
        """Content address of the latent blob ('' until ready); part of every cache key."""
        return self._companion("digest")

    @property
    def attempts(self) -> int:
        return self._companion("attempts")

    @property
    def is_ready(self) -> bool:
        return self.state == READY

    @property
    def psnr(self) -> float | None:
        """Round-trip PSNR in dB measured when the worker encoded this image (None: not measured).

        The worker decodes the stored latents right after encoding and compares them with the
        picture it encoded, when the field's ``quality_check`` (or ``QUALITY_CHECK``) is on.
        """
        if isinstance(self.instance.__dict__.get(self.field.attname), StagedUpload):
            return None
        return self._companion("psnr")

    @property
    def low_fidelity(self) -> bool:
        """Whether the measured round trip is below the field's ``min_psnr`` (``MIN_PSNR``).

        False when not measured. Find such rows with ``latentstore.quality.low_fidelity(qs)``.
        """
        from latentstore.quality import QualityPolicy

        return QualityPolicy.for_field(self.field).is_low_fidelity(self.psnr)

    @property
    def has_original(self) -> bool:
        """Whether the original upload is kept in the originals storage (``KEEP_ORIGINAL``)."""
        return bool(self._companion("original"))

    def __bool__(self) -> bool:
        return self.state != EMPTY

    def __repr__(self) -> str:
        return f"<LatentImage {self.field.model._meta.label}.{self.field.name} state={self.state}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LatentImage):
            return self.blob == other.blob and self.state == other.state
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    # the blob
    @property
    def blob(self) -> bytes | None:
        """The stored latent blob (bytes), fetched on first use when the queryset deferred it."""
        raw = self.instance.__dict__.get(self.field.attname, _MISSING)
        if raw is _MISSING:
            if self._fetched is _MISSING:
                self._fetched = self._fetch_blob()
            raw = self._fetched
        if isinstance(raw, StoredBlob):
            return bytes(raw)
        return None

    def _fetch_blob(self) -> Any:
        instance = self.instance
        if instance.pk is None:
            return STORED_NONE
        manager = type(instance)._base_manager.db_manager(instance._state.db)
        row = manager.filter(pk=instance.pk).values_list(self.field.attname, flat=True).first()
        # Not written into instance.__dict__: the field stays deferred, so a later save() of
        # this object does not send the blob back.
        return self.field.from_db_value(row, None, None)

    @property
    def nbytes(self) -> int:
        """Size of the stored latent blob in bytes (0 when there is none)."""
        blob = self.blob
        return len(blob) if blob else 0

    def _require_blob(self) -> bytes:
        blob = self.blob
        if blob is None:
            state = self.state
            detail = f": {self.error}" if state == FAILED and self.error else ""
            raise LatentsNotReady(
                f"{self.field.model._meta.label}.{self.field.name} has no latents "
                f"(state {state!r}{detail})",
                state=state,
            )
        return blob

    @property
    def header(self) -> LatentHeader:
        """The blob's header: origin, shape, storage dtype, original size, padding."""
        return read_header(self._require_blob())

    @property
    def origin(self) -> dict[str, str]:
        """Autoencoder alias, model family and weights fingerprint that made these latents."""
        return self.header.origin

    @property
    def latents(self) -> np.ndarray:
        """float32 array (C, ceil(H/8), ceil(W/8)) in raw latent space (``latent_dist.mean``)."""
        return self.unpack()[1].copy()

    def unpack(self) -> tuple[LatentHeader, np.ndarray]:
        """Header and latents (float32), verified against the blob's checksum; memoised."""
        blob = self._require_blob()
        if self._unpacked is None or self._unpacked[0] != blob:
            header, array = unpack(blob)
            array.setflags(write=False)
            self._unpacked = (blob, header, array)
        return self._unpacked[1], self._unpacked[2]

    # pixels
    def decode(
        self,
        decoder: str | None = None,
        size: int | tuple[int, int] | None = None,
        format: str = "PNG",
    ) -> PILImage.Image:
        """Decode to a PIL image at the original size (or fitted into ``size``), cached.

        ``decoder`` is an alias of ``LATENTSTORE["DECODERS"]`` (the field's decoder when
        omitted). The result is cached under a key made of the blob digest, the decoder alias
        and fingerprint, the size and the format, so a re-encoded row never shows an old picture.
        """
        from latentstore.decoding import decode_image

        return decode_image(self, decoder or self.field.decoder, size=size, format=format)

    def decoded_bytes(
        self,
        decoder: str | None = None,
        size: int | tuple[int, int] | None = None,
        format: str = "PNG",
    ) -> bytes:
        """Like :meth:`decode` but returns the encoded image file (PNG/WEBP/JPEG) as bytes."""
        from latentstore.decoding import decode_bytes

        return decode_bytes(self, decoder or self.field.decoder, size=size, format=format)

    def url(
        self,
        decoder: str | None = None,
        size: int | tuple[int, int] | None = None,
        format: str = "webp",
    ) -> str:
        """A signed URL of the decoded picture, served by ``latentstore.urls``.

        The signature binds this row, the field, ``decoder``, ``size`` (a box, at most
        ``URL_MAX_SIZE``) and ``format``, and the latents' digest: the response is immutable and
        cached for long. Until the decode is cached, the view serves the instant preview and
        schedules the decode. Raises :class:`LatentsNotReady` unless the image is ready.
        """
        from latentstore.signing import url_for

        return url_for(self, decoder or self.field.decoder, size=size, format=format)

    def preview(self, size: int | tuple[int, int] | None = None) -> PILImage.Image:
        """The instant latent→RGB projection: no model, no torch, no cache needed."""
        from latentstore.decoding import fit_size
        from latentstore.preview import latents_to_rgb

        header, array = self.unpack()
        target = fit_size((header.width, header.height), size)
        _c, h, w = array.shape
        if not (header.pad_right or header.pad_bottom):
            return latents_to_rgb(
                array, header.family, header.scaling_factor, header.shift_factor, size=target
            )
        # The grid covers the encode-time padding too: resample only the part of it that holds
        # the picture (a fractional box), so the preview lines up with the decoded image.
        from PIL import Image

        grid = latents_to_rgb(
            array, header.family, header.scaling_factor, header.shift_factor, size=(w, h)
        )
        box = (0.0, 0.0, header.width / header.downsample, header.height / header.downsample)
        return grid.resize(target, Image.Resampling.BILINEAR, box=box)

    def refresh(self) -> LatentImage:
        """Reload this field's columns from the database (e.g. after a worker finished)."""
        names = [self.field.attname] + [self.field.companion_attname(s) for s in COMPANIONS]
        deferred = self.field.attname not in self.instance.__dict__
        if deferred:
            names.remove(self.field.attname)
        self.instance.refresh_from_db(fields=names)
        self._unpacked = None
        self._fetched = _MISSING
        return self

    def original_bytes(self) -> bytes | None:
        """The original upload: staged bytes while not yet encoded, or the kept original."""
        pending = self.instance.__dict__.get(self.field.attname)
        if isinstance(pending, StagedUpload):  # assigned, not saved yet
            return pending.data
        attname = self.field.companion_attname("staged")
        staged = self.instance.__dict__.get(attname, _MISSING)
        if staged is _MISSING:
            manager = type(self.instance)._base_manager.db_manager(self.instance._state.db)
            staged = manager.filter(pk=self.instance.pk).values_list(attname, flat=True).first()
        if staged is not None:
            return bytes(staged)
        name = self._companion("original")
        if name:
            from latentstore.encoding import originals_storage

            with originals_storage().open(name, "rb") as fh:
                return fh.read()
        return None


_MISSING = object()


class LatentsNotReady(Exception):
    """The row has no latents yet (pending/encoding), never had (empty), or failed."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


# --- the descriptor -----------------------------------------------------------------------------


class LatentImageDescriptor:
    """``obj.image`` returns a :class:`LatentImage`; assignment stages a new upload."""

    def __init__(self, field: LatentImageField) -> None:
        self.field = field
        self.cache_name = f"_latentstore_image_{field.name}"

    def __get__(self, instance: models.Model | None, owner: type) -> Any:
        if instance is None:
            return self
        image = instance.__dict__.get(self.cache_name)
        if image is None:
            image = instance.__dict__[self.cache_name] = LatentImage(instance, self.field)
        return image

    def __set__(self, instance: models.Model, value: Any) -> None:
        attname = self.field.attname
        if isinstance(value, (StoredBlob, _StoredNone)):
            # From the database (from_db_value / loaddata): not a change of this object.
            instance.__dict__[attname] = value
            return
        if isinstance(value, LatentImage):
            if value.instance is instance:
                return
            if type(value.instance) is type(instance) and value.instance.pk == instance.pk:
                # refresh_from_db() copies from a fresh instance of the same row.
                raw = value.instance.__dict__.get(attname, _MISSING)
                if raw is _MISSING:
                    instance.__dict__.pop(attname, None)
                else:
                    instance.__dict__[attname] = raw
                return
            original = value.original_bytes()
            if original is None:
                raise ValueError(
                    "Cannot copy a LatentImage without its original from another row; assign "
                    "its decode() instead (a lossy round trip)."
                )
            value = original
        if value is None or value == "" or value is False:
            # Model.__init__ assigns the default (None) to new objects: that is a clear too.
            staged: Any = _CLEAR
        elif isinstance(value, StagedUpload):
            staged = value
        else:
            staged = stage(value)
        instance.__dict__[attname] = staged
        # save() rewrites every companion column. On an object loaded with some of them
        # deferred (without_blobs() defers the staged original), Django would save only the
        # loaded columns and the new upload would be lost: mark them loaded, pre_save fills them.
        for suffix, default in _COMPANION_DEFAULTS.items():
            instance.__dict__.setdefault(self.field.companion_attname(suffix), default)
        _dirty(instance).add(self.field.name)


# --- the field ----------------------------------------------------------------------------------


class LatentImageField(models.Field):
    """A model field that stores an image as VAE latents, encoded by Celery workers.

    ``autoencoder`` names an entry of ``LATENTSTORE["AUTOENCODERS"]`` used to encode; ``decoder``
    the entry of ``LATENTSTORE["DECODERS"]`` that ``decode()`` uses by default;
    ``keep_original`` (default: the ``KEEP_ORIGINAL`` setting) keeps the upload in a Django
    storage once encoded: ``True``, ``False`` or ``"low_fidelity"`` (only rows whose round trip
    is below ``min_psnr``); ``latent_dtype`` (default: ``LATENT_DTYPE``) is ``float16``,
    ``int8`` or ``int4``. ``quality_check`` (default: ``QUALITY_CHECK``) makes the worker decode
    right after encoding and store the round-trip PSNR in ``<name>_psnr``; rows below
    ``min_psnr`` (default: ``MIN_PSNR``) are low-fidelity (``obj.image.low_fidelity``).
    """

    description = "An image stored as VAE latents"
    descriptor_class = LatentImageDescriptor

    def __init__(
        self,
        verbose_name: str | None = None,
        name: str | None = None,
        *,
        autoencoder: str = "default",
        decoder: str = "default",
        keep_original: bool | str | None = None,
        latent_dtype: str | None = None,
        quality_check: bool | None = None,
        min_psnr: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.autoencoder = autoencoder
        self.decoder = decoder
        self.keep_original = keep_original
        self.latent_dtype = latent_dtype
        self.quality_check = quality_check
        self.min_psnr = min_psnr
        kwargs.setdefault("null", True)
        kwargs.setdefault("blank", False)
        super().__init__(verbose_name, name, **kwargs)

    def deconstruct(self) -> tuple[str, str, list, dict]:
        name, path, args, kwargs = super().deconstruct()
        if kwargs.get("null") is True:
            del kwargs["null"]
        for attr, default in (
            ("autoencoder", "default"),
            ("decoder", "default"),
            ("keep_original", None),
            ("latent_dtype", None),
            ("quality_check", None),
            ("min_psnr", None),
        ):
            value = getattr(self, attr)
            if value != default:
                kwargs[attr] = value
        return name, path, args, kwargs

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        errors = super().check(**kwargs)
        if not self.null:
            errors.append(
                checks.Error(
                    "LatentImageField must be null=True: rows hold no latents until encoded.",
                    obj=self,
                    id="latentstore.E010",
                )
            )
        if self.latent_dtype is not None and self.latent_dtype not in STORAGE_DTYPES:
            errors.append(
                checks.Error(
                    f"latent_dtype={self.latent_dtype!r} is not one of "
                    f"{', '.join(map(repr, STORAGE_DTYPES))}.",
                    obj=self,
                    id="latentstore.E011",
                )
            )
        errors += self._check_quality_options()
        return errors

    def _check_quality_options(self) -> list[checks.CheckMessage]:
        from latentstore.quality import KEEP_LOW_FIDELITY, option_problems

        ids = {
            "keep_original": "latentstore.E030",
            "quality_check": "latentstore.E031",
            "min_psnr": "latentstore.E033",
        }
        problems = option_problems(
            self.keep_original, self.quality_check, self.min_psnr, unset_allowed=True
        )
        errors = [
            checks.Error(f"{name}={getattr(self, name)!r} {why}.", obj=self, id=ids[name])
            for name, why in problems.items()
        ]
        # A field-only conflict: the settings' KEEP_ORIGINAL="low_fidelity" just turns the
        # check on. Both options are valid here, so only E033 can precede it: put it first.
        if self.quality_check is False and self.keep_original == KEEP_LOW_FIDELITY:
            errors.insert(
                0,
                checks.Error(
                    "keep_original='low_fidelity' needs the round-trip measurement, but "
                    "quality_check=False turns it off.",
                    obj=self,
                    hint="Drop quality_check=False (keep_original='low_fidelity' turns it on).",
                    id="latentstore.E032",
                ),
            )
        return errors

    def get_internal_type(self) -> str:
        return "BinaryField"

    def companion_attname(self, suffix: str) -> str:
        return f"{self.name}_{suffix}"

    @property
    def companion_names(self) -> list[str]:
        """Names of this field's companion columns (include them in ``update_fields``)."""
        return [self.companion_attname(s) for s in COMPANIONS]

    def contribute_to_class(self, cls: type[models.Model], name: str, **kwargs: Any) -> None:
        super().contribute_to_class(cls, name, **kwargs)
        # Models rendered from migrations ("__fake__") list their companion columns themselves:
        # adding the current set there would give an old migration state a column that a later
        # migration adds (AddField of a new companion would then fail: "already exists").
        if cls.__module__ != "__fake__":
            existing = {f.name for f in cls._meta.local_fields}
            for suffix, companion in _companions(name).items():
                companion_name = self.companion_attname(suffix)
                if companion_name not in existing:
                    cls.add_to_class(companion_name, companion)
        if not cls._meta.abstract:
            signals.pre_save.connect(self._check_update_fields, sender=cls, weak=False)
            signals.post_save.connect(self._enqueue_on_commit, sender=cls, weak=False)

    # database values
    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if value is None:
            return STORED_NONE
        return StoredBlob(value)

    def to_python(self, value: Any) -> Any:
        # Used by the deserializers (loaddata): base64 text as written by value_to_string().
        if isinstance(value, str):
            return StoredBlob(base64.b64decode(value.encode("ascii"))) if value else STORED_NONE
        if value is None:
            return STORED_NONE
        return value

    def value_to_string(self, obj: models.Model) -> str:
        blob = getattr(obj, self.attname).blob
        return base64.b64encode(blob).decode("ascii") if blob else ""

    def get_prep_value(self, value: Any) -> Any:
        if isinstance(value, LatentImage):
            raw = value.instance.__dict__.get(self.attname)
            return bytes(raw) if isinstance(raw, StoredBlob) else None
        if isinstance(value, (_StoredNone, StagedUpload)) or value is _CLEAR:
            return None
        return value

    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> Any:
        value = super().get_db_prep_value(value, connection, prepared)
        if value is not None:
            return connection.Database.Binary(value)
        return value

    def pre_save(self, model_instance: models.Model, add: bool) -> Any:
        if self.name not in _dirty(model_instance) and not add:
            return F(self.attname)
        raw = model_instance.__dict__.get(self.attname)
        if isinstance(raw, StagedUpload):
            self._apply_staged(model_instance, raw)
        elif raw is _CLEAR:
            self._apply_clear(model_instance)
        return getattr(model_instance, self.attname)

    def _apply_staged(self, instance: models.Model, staged: StagedUpload) -> None:
        values = {
            "state": PENDING,
            "token": uuid.uuid4(),
            "error": "",
            "staged": staged.data,
            "width": staged.width,
            "height": staged.height,
            "attempts": 0,
            "changed": timezone.now(),
            "digest": "",
            "autoencoder": self.autoencoder,
            "original": "",
            "psnr": None,
        }
        for suffix, value in values.items():
            setattr(instance, self.companion_attname(suffix), value)
        instance.__dict__[self.attname] = STORED_NONE
        instance.__dict__.setdefault("_latentstore_enqueue", {})[self.name] = values["token"]

    def _apply_clear(self, instance: models.Model) -> None:
        for suffix, field in _companions(self.name).items():
            setattr(instance, self.companion_attname(suffix), field.get_default())
        instance.__dict__[self.attname] = STORED_NONE

    # signals
    def _check_update_fields(
        self,
        sender: type,
        instance: models.Model,
        update_fields: Any = None,
        raw: bool = False,
        **kwargs: Any,
    ) -> None:
        if update_fields is None or raw or self.name not in update_fields:
            return
        missing = [n for n in self.companion_names if n not in update_fields]
        if missing:
            raise ValueError(
                f"save(update_fields=...) names {self.name!r} but not its companion columns "
                f"{missing}; add {type(instance).__name__}.{self.name}.field.companion_names."
            )

    def _enqueue_on_commit(
        self,
        sender: type,
        instance: models.Model,
        raw: bool = False,
        using: str | None = None,
        **kwargs: Any,
    ) -> None:
        dirty = _dirty(instance)
        dirty.discard(self.name)
        token = instance.__dict__.get("_latentstore_enqueue", {}).pop(self.name, None)
        if token is None or raw:
            return
        from latentstore.encoding import enqueue_encode

        label, pk, name = instance._meta.label, instance.pk, self.name
        transaction.on_commit(lambda: enqueue_encode(label, pk, name, token), using=using)

    # forms
    def formfield(self, **kwargs: Any) -> forms.Field:
        return super().formfield(**{"form_class": LatentImageFormField, **kwargs})

    def save_form_data(self, instance: models.Model, data: Any) -> None:
        # Like FileField: None means "unchanged", False means "clear".
        if data is not None:
            setattr(instance, self.name, data or None)

    def value_from_object(self, obj: models.Model) -> LatentImage:
        return getattr(obj, self.attname)


class LatentImageFormField(forms.FileField):
    """A file input that validates the image cheaply (format, pixel cap, header) on clean()."""

    default_error_messages = {
        **forms.FileField.default_error_messages,
    }

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("max_length", None)
        super().__init__(**kwargs)

    def to_python(self, data: Any) -> Any:
        data = super().to_python(data)
        if data is None:
            return None
        staged = stage(data)
        # construct_instance() hands this to the field's save_form_data(); the staged upload
        # carries the validated bytes so nothing is read twice.
        return staged

    def widget_attrs(self, widget: forms.Widget) -> dict[str, Any]:
        attrs = super().widget_attrs(widget)
        if isinstance(widget, forms.FileInput) and "accept" not in widget.attrs:
            attrs.setdefault("accept", "image/*")
        return attrs


@functools.cache  # read per row by the admin's change list; a model's fields do not change
def latent_fields_of(model: type[models.Model]) -> tuple[LatentImageField, ...]:
    """The model's :class:`LatentImageField` s, in declaration order."""
    return tuple(f for f in model._meta.concrete_fields if isinstance(f, LatentImageField))


def without_blobs(queryset: models.QuerySet) -> models.QuerySet:
    """Defer every latent blob and staged original of the queryset's model (for listings).

    ``state``, ``width``, ``height`` and ``digest`` stay loaded, so thumbnails that come from the
    decode cache need no blob at all.
    """
    names = []
    for field in latent_fields_of(queryset.model):
        names += [field.name, field.companion_attname("staged")]
    return queryset.defer(*names)


def prefetch_blobs(images: Iterable[LatentImage]) -> None:
    """Fetch the deferred blobs of ``images`` in one query per model and database.

    Each image keeps its blob exactly as its own first ``blob`` access would have, so a batch
    decode over rows of :func:`without_blobs` reads them all at once instead of one query per
    row. Images whose blob is loaded or already fetched are left alone.
    """
    groups: dict[tuple[type[models.Model], str | None, LatentImageField], dict[Any, list]] = {}
    for image in images:
        instance = image.instance
        if (
            instance.pk is None
            or image._fetched is not _MISSING
            or image.field.attname in instance.__dict__
        ):
            continue
        key = (type(instance), instance._state.db, image.field)
        pk = instance._meta.pk.to_python(instance.pk)
        groups.setdefault(key, {}).setdefault(pk, []).append(image)
    for (model, db, field), by_pk in groups.items():
        manager = model._base_manager.db_manager(db)
        pks = list(by_pk)
        # SQLite caps the parameters of a query: as in_bulk(), ask in slices below the cap.
        step = connections[manager.db].features.max_query_params or len(pks)
        rows: dict[Any, Any] = {}
        for start in range(0, len(pks), step):
            page = manager.filter(pk__in=pks[start : start + step])
            rows.update(page.values_list("pk", field.attname))
        for pk, same_row in by_pk.items():
            fetched = field.from_db_value(rows.get(pk), None, None)  # a deleted row: no latents
            for image in same_row:
                image._fetched = fetched
