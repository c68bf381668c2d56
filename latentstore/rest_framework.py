"""Django REST framework: :class:`LatentImageField`, a serializer field for a model's
LatentImageField (the ``rest`` extra: ``pip install latentstore[rest]``).

Read, it gives an object with the state, the size and signed URLs::

    {"state": "ready", "width": 1600, "height": 1067,
     "url": "https://…/latents/p/….webp",
     "srcset": {"avif": "https://…/….avif 320w, …", "webp": "https://…/….webp 320w, …"},
     "preview_url": "https://…/latents/p/….webp", "error": null}

Written, it takes a multipart file upload, validated as a form or an assignment validates it
(format allow-list, pixel cap, header parse; DRF's own error format for a bad file); ``null``
clears the image. Saving the serializer saves the model, so the encode goes on commit as
everywhere else. Nothing here reads a latent blob unless ``include_latents=True`` asks for the
latents' shape and origin (and even then the blob's bytes only when the view asks for them).

The OpenAPI schema of the field is described to drf-spectacular when it is installed.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.signals import setting_changed
from django.dispatch import receiver
from rest_framework import serializers

from latentstore.blobs import prefetch_blobs
from latentstore.columns import EMPTY, ENCODING, FAILED, PENDING, READY
from latentstore.decoding import decoder_fingerprint, normalise_format
from latentstore.fields import LatentImage
from latentstore.html import picture_candidates, picture_formats, srcset
from latentstore.signing import EXTENSIONS, expiry, sign, sign_set, url_prefix
from latentstore.staging import StagedUpload, stage

__all__ = ["BLOBS_CONTEXT_KEY", "LatentImageField", "forget_links"]

#: ``serializer_context[BLOBS_CONTEXT_KEY] = True`` (from the view) adds the latent blob itself,
#: base64, to fields with ``include_latents=True``. Nothing else ever sends it.
BLOBS_CONTEXT_KEY = "latentstore_blobs"

# Serialized links of ready rows, by field, URL prefix, row, digest and expiry period: a listing
# served again costs a dict lookup per row instead of two signatures. Emptied when settings
# change (SECRET_KEY, URL_SALT, URL_EXPIRES, the decoders...).
_LINKS_MEMO_ENTRIES = 50_000
_links_memo: dict[tuple[Any, ...], dict[str, Any]] = {}


@receiver(setting_changed)
def forget_links(**kwargs: Any) -> None:
    """Empty this process's memo of serialized links (done on every ``setting_changed``)."""
    _links_memo.clear()


class LatentImageField(serializers.Field):
    """A serializer field for a model's :class:`~latentstore.fields.LatentImageField`.

    ``widths``, ``formats`` and ``upscale`` choose the ``srcset`` candidates as
    ``{% latent_picture %}`` does (defaults: ``PICTURE_WIDTHS``, ``PICTURE_FORMATS``);
    ``url`` is the largest candidate in ``url_format``; ``preview_url`` the instant
    ``preview_decoder`` picture fitted into ``preview_size`` (None: no preview, one signature
    a row instead of two). ``decoder`` defaults to the model
    field's. ``include_latents=True`` adds the latents' shape, dtype and origin. ``allow_null``
    is True unless given: ``null`` clears the image.
    """

    default_error_messages = {
        "invalid": "Upload a valid image file: {message}",
        "not_a_file": "Upload a file (multipart/form-data), not {kind}.",
    }

    def __init__(
        self,
        *,
        widths: Iterable[int] | str | None = None,
        formats: Iterable[str] | str | None = None,
        upscale: bool = False,
        url_format: str = "webp",
        decoder: str | None = None,
        preview_decoder: str = "rgb",
        preview_size: int | None = 64,
        include_latents: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("allow_null", True)
        super().__init__(**kwargs)
        self.widths = widths
        self.formats = formats
        self.upscale = upscale
        self.url_format = url_format
        self.decoder = decoder
        self.preview_decoder = preview_decoder
        self.preview_size = preview_size
        self.include_latents = include_latents
        self._prefix: tuple[Any, str] = (None, "")
        self._prefetched_for: Any = None
        self._formats: list[str] | None = None
        self._url_format = ""
        self._signed: list[str] = []
        self._options_key: str | None = None

    # --- read -----------------------------------------------------------------------------

    def to_representation(self, value: LatentImage) -> dict[str, Any]:
        image = value
        state = image.state
        key = None
        if state == READY and not self.include_latents:
            # A ready row's links depend only on its digest, this field's options, the URL
            # prefix and the expiry period: an API that lists the same rows again signs nothing.
            instance = image.instance
            # The decoder's fingerprint too: new weights on disk make new links.
            fingerprint = decoder_fingerprint(
                self.decoder or image.field.decoder, image.autoencoder
            )
            key = (self._options(), self._url_prefix(), instance._meta.label, instance.pk,
                   image.field.name, image.digest, fingerprint, expiry())  # fmt: skip
            links = _links_memo.get(key)
            if links is not None:
                return dict(links)
        data: dict[str, Any] = {
            "state": state,
            "width": image.width,
            "height": image.height,
            "url": None,
            "srcset": {},
            "preview_url": None,
            "error": image.error or None,
        }
        if state == READY:
            self._links(image, data)
        if self.include_latents:
            data["latents"] = self._latents(image) if state == READY else None
        if key is not None:
            if len(_links_memo) >= _LINKS_MEMO_ENTRIES:
                _links_memo.clear()  # bounded; cheaper than an LRU for a memo of signatures
            _links_memo[key] = dict(data)
        return data

    def _links(self, image: LatentImage, data: dict[str, Any]) -> None:
        # Two signatures a row, whatever the widths and formats: one picture-set token for the
        # srcsets and the url, one token for the preview (another decoder).
        prefix = self._url_prefix()
        if self._formats is None:  # parsed once per field, not once per row
            self._formats = picture_formats(self.formats)
            self._url_format = normalise_format(self.url_format)
            self._signed = list(dict.fromkeys([*self._formats, self._url_format]))
        candidates = picture_candidates(image, self.widths, upscale=self.upscale)
        boxes = [box for _width, box in candidates]
        decoder = self.decoder or image.field.decoder
        base = f"{prefix}{sign_set(image, decoder, boxes, self._signed)}/"
        data["srcset"] = {fmt.lower(): srcset(base, candidates, fmt) for fmt in self._formats}
        data["url"] = f"{base}{len(candidates) - 1}.{EXTENSIONS[self._url_format]}"
        if self.preview_size is not None:
            token, ext = sign(image, self.preview_decoder, self.preview_size, "webp")
            data["preview_url"] = f"{prefix}{token}.{ext}"

    def _options(self) -> str:
        """This field's link options as one hashable value (fields are copied per serializer)."""
        if self._options_key is None:
            self._options_key = repr(
                (type(self).__qualname__, self.widths, self.formats, self.upscale,
                 self.url_format, self.decoder, self.preview_decoder, self.preview_size)
            )  # fmt: skip
        return self._options_key

    def _url_prefix(self) -> str:
        # Absolute URLs when the view passed its request (as DRF's FileField does). The scheme,
        # host and path prefix are worked out once per request, not once per picture.
        request = self.context.get("request")
        if self._prefix[0] is not request or not self._prefix[1]:
            host = request.build_absolute_uri("/").rstrip("/") if request is not None else ""
            self._prefix = (request, host + url_prefix())
        return self._prefix[1]

    def _latents(self, image: LatentImage) -> dict[str, Any]:
        self._prefetch_siblings(image)
        header = image.header
        latents: dict[str, Any] = {
            "shape": list(header.shape),
            "dtype": header.dtype,
            "origin": header.origin,
            "nbytes": image.nbytes,
        }
        if self.context.get(BLOBS_CONTEXT_KEY):
            latents["blob"] = base64.b64encode(image.blob or b"").decode("ascii")
        return latents

    def _prefetch_siblings(self, image: LatentImage) -> None:
        # A listing of rows without their blobs would read one blob per row: fetch those of
        # every row being serialized at once (one query per model), the first time one is needed.
        rows = getattr(self.root, "instance", None)
        if rows is None or rows is self._prefetched_for or isinstance(rows, type(image.instance)):
            return
        self._prefetched_for = rows
        name = image.field.name
        prefetch_blobs(getattr(row, name) for row in rows if isinstance(row, type(image.instance)))

    # --- write ----------------------------------------------------------------------------

    def to_internal_value(self, data: Any) -> StagedUpload:
        if isinstance(data, (str, bytes, int, float, list, dict)):
            self.fail("not_a_file", kind=type(data).__name__)
        try:
            return stage(data)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(
                [self.error_messages["invalid"].format(message=m) for m in exc.messages],
                code="invalid",
            ) from None
        except TypeError:
            self.fail("not_a_file", kind=type(data).__name__)


STATES = [EMPTY, PENDING, ENCODING, READY, FAILED]


def _uri(description: str) -> dict[str, Any]:
    return {"type": "string", "format": "uri", "nullable": True, "description": description}


def openapi_schema(include_latents: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.0 schema of what :class:`LatentImageField` reads out."""
    properties: dict[str, Any] = {
        "state": {"type": "string", "enum": STATES, "description": "the encode state"},
        "width": {"type": "integer", "nullable": True, "description": "displayed width (px)"},
        "height": {"type": "integer", "nullable": True, "description": "displayed height (px)"},
        "url": _uri("a signed URL of the picture at the largest srcset width (when ready)"),
        "srcset": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "format (avif, webp, ...) -> a srcset value: signed URLs with "
            "width descriptors (empty until ready)",
        },
        "preview_url": _uri("a signed URL of the instant latent->RGB preview (when ready)"),
        "error": {"type": "string", "nullable": True, "description": "why the image failed"},
    }
    if include_latents:
        properties["latents"] = {
            "type": "object",
            "nullable": True,
            "properties": {
                "shape": {"type": "array", "items": {"type": "integer"}},
                "dtype": {"type": "string", "enum": ["float16", "int8", "int4"]},
                "origin": {"type": "object", "additionalProperties": {"type": "string"}},
                "nbytes": {"type": "integer"},
                "blob": {"type": "string", "format": "byte", "description": "only on request"},
            },
            "required": ["shape", "dtype", "origin", "nbytes"],
        }
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name != "latents"],
    }


try:
    from drf_spectacular.extensions import OpenApiSerializerFieldExtension
    from drf_spectacular.plumbing import ComponentIdentity, ResolvedComponent
except ImportError:  # drf-spectacular is optional
    pass
else:

    class LatentImageFieldSchema(OpenApiSerializerFieldExtension):
        """drf-spectacular: an upload (a binary string) in requests, the ``LatentImage``
        component (``LatentImageWithLatents`` with ``include_latents``) in responses."""

        target_class = LatentImageField
        match_subclasses = True

        def map_serializer_field(self, auto_schema: Any, direction: str) -> dict[str, Any]:
            if direction == "request":
                return {"type": "string", "format": "binary"}
            with_latents = bool(self.target.include_latents)
            name = "LatentImageWithLatents" if with_latents else "LatentImage"
            component = ResolvedComponent(
                name=name,
                type=ResolvedComponent.SCHEMA,
                schema=openapi_schema(with_latents),
                object=ComponentIdentity(f"latentstore.rest_framework.{name}"),
            )
            auto_schema.registry.register_on_missing(component)
            return component.ref
