"""LatentImageField: Django's Field / Descriptor / value-object triad for images kept as latents.

This module is the top of the package, as Django's ``files.py`` is for ``FileField``: the field
uses staging, the codec, decoding and signing below it, and nothing below imports it.

The field owns one ``bytea``/``BLOB`` column (the latent blob) and adds companion columns named
after it (``<name>_state``, ``<name>_token``, ... see :mod:`latentstore.columns`) that appear in
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
import uuid
from typing import TYPE_CHECKING, Any

from django import forms
from django.core import checks
from django.db import models, transaction
from django.db.models import F, signals
from django.utils import timezone

from latentstore import blobs
from latentstore.blobs import STORED_NONE, StoredBlob, from_db, is_stored
from latentstore.columns import (  # noqa: F401  (re-exported: migrations name these classes here)
    COMPANION_DEFAULTS,
    COMPANIONS,
    EMPTY,
    ENCODING,
    FAILED,
    PENDING,
    READY,
    STATE_CHOICES,
    CompanionField,
    ImageFacts,
    LatentBytesField,
    LatentCharField,
    LatentCountField,
    LatentFloatField,
    LatentSizeField,
    LatentStateField,
    LatentTextField,
    LatentTimeField,
    LatentTokenField,
    companions,
    dirty,
    facts_reader,
    pending_upload,
)
from latentstore.decoding import decode_bytes, decode_image, fit_size
from latentstore.dispatch import enqueue_encode
from latentstore.exceptions import LatentsNotReady
from latentstore.forms import LatentImageFormField
from latentstore.latents import STORAGE_DTYPES, LatentHeader, read_header, unpack
from latentstore.preview import preview_picture
from latentstore.quality import QualityPolicy, field_option_errors
from latentstore.signing import url_for
from latentstore.staging import StagedUpload, originals_storage, read_upload, stage  # noqa: F401

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

__all__ = [
    "EMPTY",
    "ENCODING",
    "FAILED",
    "PENDING",
    "READY",
    "LatentImage",
    "LatentImageDescriptor",
    "LatentImageField",
    "LatentImageFormField",
    "LatentsNotReady",
    "StagedUpload",
]

_MISSING = object()
_CLEAR = object()


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

    # the row's columns
    def _column(self, suffix: str) -> Any:
        name = self.field.companion_attname(suffix)
        # A loaded column is in the instance's __dict__; a deferred one loads through getattr.
        value = self.instance.__dict__.get(name, _MISSING)
        return getattr(self.instance, name) if value is _MISSING else value

    def facts(self) -> ImageFacts:
        """The row's state, size, digest, autoencoder and error in one call, reading no blob:
        what a listing reads per row (each property alone costs a lookup of its column)."""
        values = self.instance.__dict__
        field = self.field
        staged = values.get(field.attname)
        if isinstance(staged, StagedUpload):
            return ImageFacts(
                PENDING, staged.width, staged.height, self.digest, self.autoencoder, self.error
            )
        names, read = facts_reader(field.name)
        try:
            return ImageFacts._make(read(values))
        except KeyError:  # a deferred column loads through getattr, as _column does
            return ImageFacts._make(getattr(self.instance, name) for name in names)

    @property
    def _staged(self) -> StagedUpload | None:
        """The upload assigned to this object and not saved yet."""
        raw = self.instance.__dict__.get(self.field.attname)
        return raw if isinstance(raw, StagedUpload) else None

    @property
    def state(self) -> str:
        """``empty``, ``pending``, ``encoding``, ``ready`` or ``failed``."""
        return PENDING if self._staged else self._column("state")

    @property
    def error(self) -> str:
        """Why the row is ``failed`` (empty otherwise)."""
        return self._column("error")

    @property
    def token(self) -> uuid.UUID | None:
        """The row's current upload token: a worker's result is stored only under it."""
        return self._column("token")

    @property
    def width(self) -> int | None:
        """Displayed width in pixels (after EXIF orientation), known from the moment of save."""
        staged = self._staged
        return staged.width if staged else self._column("width")

    @property
    def height(self) -> int | None:
        """Displayed height in pixels (after EXIF orientation)."""
        staged = self._staged
        return staged.height if staged else self._column("height")

    @property
    def digest(self) -> str:
        """Content address of the latent blob ('' until ready); part of every cache key."""
        return self._column("digest")

    @property
    def attempts(self) -> int:
        """Encode attempts counted since the last upload."""
        return self._column("attempts")

    @property
    def autoencoder(self) -> str:
        """Alias of the autoencoder whose latents the row holds ('' before the first upload)."""
        return self._column("autoencoder")

    @property
    def original_name(self) -> str:
        """Storage name of the kept original in ``ORIGINALS_STORAGE`` ('' when none is kept)."""
        return self._column("original")

    @property
    def has_original(self) -> bool:
        """Whether the original upload is kept in the originals storage (``KEEP_ORIGINAL``)."""
        return bool(self.original_name)

    @property
    def is_ready(self) -> bool:
        return self.state == READY

    @property
    def psnr(self) -> float | None:
        """Round-trip PSNR in dB measured when the worker encoded this image (None: not measured).

        The worker decodes the stored latents right after encoding and compares them with the
        picture it encoded, when the field's ``quality_check`` (or ``QUALITY_CHECK``) is on.
        """
        return None if self._staged else self._column("psnr")

    @property
    def low_fidelity(self) -> bool:
        """Whether the measured round trip is below the field's ``min_psnr`` (``MIN_PSNR``).

        False when not measured. Find such rows with ``latentstore.queries.low_fidelity(qs)``.
        """
        return QualityPolicy.for_field(self.field).is_low_fidelity(self.psnr)

    def require_ready(self) -> None:
        """Raise :class:`LatentsNotReady` unless the row is ``ready`` (reads no blob).

        The message names the model, the field, the state and, for a failed row, its error.
        """
        if self.state != READY or not self.digest:
            raise self._not_ready()

    def _not_ready(self) -> LatentsNotReady:
        state = self.state
        detail = f": {self.error}" if state == FAILED and self.error else ""
        return LatentsNotReady(
            f"{self.field.model._meta.label}.{self.field.name} has no latents "
            f"(state {state!r}{detail})",
            state=state,
        )

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
            raw = blobs.fetched_blob(self.instance, self.field.attname)
        return bytes(raw) if isinstance(raw, StoredBlob) else None

    @property
    def nbytes(self) -> int:
        """Size of the stored latent blob in bytes (0 when there is none)."""
        blob = self.blob
        return len(blob) if blob else 0

    def _require_blob(self) -> bytes:
        blob = self.blob
        if blob is None:
            raise self._not_ready()
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
        """Header and latents (float32, read-only), verified against the blob's checksum;
        memoised. Raises :class:`LatentsNotReady` when the row holds no latents."""
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
        return decode_image(self, decoder or self.field.decoder, size=size, format=format)

    def decoded_bytes(
        self,
        decoder: str | None = None,
        size: int | tuple[int, int] | None = None,
        format: str = "PNG",
    ) -> bytes:
        """Like :meth:`decode` but returns the encoded image file (PNG/WEBP/JPEG) as bytes."""
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
        return url_for(self, decoder or self.field.decoder, size=size, format=format)

    def preview(self, size: int | tuple[int, int] | None = None) -> PILImage.Image:
        """The instant latent→RGB projection: no model, no torch, no cache needed."""
        header, array = self.unpack()
        return preview_picture(header, array, fit_size((header.width, header.height), size))

    def refresh(self) -> LatentImage:
        """Reload this field's columns from the database (e.g. after a worker finished)."""
        names = [self.field.attname] + [self.field.companion_attname(s) for s in COMPANIONS]
        if self.field.attname not in self.instance.__dict__:  # deferred: stays deferred
            names.remove(self.field.attname)
        self.instance.refresh_from_db(fields=names)
        self._unpacked = None
        blobs.forget(self.instance, self.field.attname)
        return self

    def original_bytes(self) -> bytes | None:
        """The original upload: staged bytes while not yet encoded, or the kept original."""
        staged = self._staged
        if staged:  # assigned, not saved yet
            return staged.data
        data = blobs.column(self.instance, self.field.companion_attname("staged"))
        if data is not None:
            return bytes(data)
        if self.original_name:
            with originals_storage().open(self.original_name, "rb") as fh:
                return fh.read()
        return None


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
        if is_stored(value):
            # From the database (from_db_value / loaddata): not a change of this object.
            instance.__dict__[attname] = value
            return
        if isinstance(value, LatentImage):
            value = self._from_image(instance, value)
            if value is None:
                return
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
        for suffix, default in COMPANION_DEFAULTS.items():
            instance.__dict__.setdefault(self.field.companion_attname(suffix), default)
        dirty(instance).add(self.field.name)

    def _from_image(self, instance: models.Model, value: LatentImage) -> bytes | None:
        """What assigning another LatentImage means: nothing (the same row), or its original."""
        attname = self.field.attname
        if value.instance is instance:
            return None
        if type(value.instance) is type(instance) and value.instance.pk == instance.pk:
            # refresh_from_db() copies from a fresh instance of the same row.
            raw = value.instance.__dict__.get(attname, _MISSING)
            if raw is _MISSING:
                instance.__dict__.pop(attname, None)
            else:
                instance.__dict__[attname] = raw
            return None
        original = value.original_bytes()
        if original is None:
            raise ValueError(
                "Cannot copy a LatentImage without its original from another row; assign "
                "its decode() instead (a lossy round trip)."
            )
        return original


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
        errors += field_option_errors(self)
        return errors

    def get_internal_type(self) -> str:
        return "BinaryField"

    def companion_attname(self, suffix: str) -> str:
        """The attribute (and column) name of companion column ``suffix``: ``<name>_<suffix>``."""
        # Read a dozen times per row by listings and serializers: built once per field name.
        names = self.__dict__.get("_companion_names")
        if names is None or names[0] != self.name:
            names = self._companion_names = (self.name, {s: f"{self.name}_{s}" for s in COMPANIONS})
        return names[1].get(suffix) or f"{self.name}_{suffix}"

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
            for suffix, companion in companions(name).items():
                companion_name = self.companion_attname(suffix)
                if companion_name not in existing:
                    cls.add_to_class(companion_name, companion)
        if not cls._meta.abstract:
            signals.pre_save.connect(self._check_update_fields, sender=cls, weak=False)
            signals.post_save.connect(self._enqueue_on_commit, sender=cls, weak=False)

    # database values
    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        return from_db(value)

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
        if value is _CLEAR or isinstance(value, StagedUpload) or is_stored(value):
            return None
        return value

    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> Any:
        value = super().get_db_prep_value(value, connection, prepared)
        if value is not None:
            return connection.Database.Binary(value)
        return value

    def pre_save(self, model_instance: models.Model, add: bool) -> Any:
        if self.name not in dirty(model_instance) and not add:
            return F(self.attname)
        raw = model_instance.__dict__.get(self.attname)
        if isinstance(raw, StagedUpload):
            self._apply_staged(model_instance, raw)
        elif raw is _CLEAR:
            self._apply_clear(model_instance)
        return getattr(model_instance, self.attname)

    def _apply_staged(self, instance: models.Model, staged: StagedUpload) -> None:
        values = {
            **pending_upload(uuid.uuid4(), self.autoencoder, timezone.now()),
            "staged": staged.data,
            "width": staged.width,
            "height": staged.height,
        }
        for suffix, value in values.items():
            setattr(instance, self.companion_attname(suffix), value)
        instance.__dict__[self.attname] = STORED_NONE
        instance.__dict__.setdefault("_latentstore_enqueue", {})[self.name] = values["token"]

    def _apply_clear(self, instance: models.Model) -> None:
        for suffix, field in companions(self.name).items():
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
        dirty(instance).discard(self.name)
        token = instance.__dict__.get("_latentstore_enqueue", {}).pop(self.name, None)
        if token is None or raw:
            return
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
