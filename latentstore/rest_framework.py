"""Django REST framework: :class:`LatentImageField`, a serializer field for a model's
LatentImageField (the ``rest`` extra: ``pip install latentstore[rest]``).

Read, it gives an object with the state, the size and signed URLs::

    {"state": "ready", "width": 1600, "height": 1067,
     "url": "https://…/latents/p/<token>/4.webp",
     "srcset": {"avif": "https://…/<token>/0.avif 320w, …", "webp": "https://…/0.webp 320w, …"},
     "preview_url": "https://…/latents/p/<token>/p.webp", "error": null}

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
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers

from latentstore import conf
from latentstore.blobs import prefetch_blobs
from latentstore.columns import EMPTY, ENCODING, FAILED, PENDING, READY, ImageFacts
from latentstore.decoding import normalise_format
from latentstore.fields import LatentImage
from latentstore.html import candidate_count, parse_widths, picture_formats
from latentstore.signing import (
    EXTENSIONS,
    PREVIEW_INDEX,
    WIDTH_ONLY,
    SetSigner,
    SetTemplate,
    url_prefix,
)
from latentstore.staging import StagedUpload, stage

__all__ = ["BLOBS_CONTEXT_KEY", "LatentImageField"]

#: ``serializer_context[BLOBS_CONTEXT_KEY] = True`` (from the view) adds the latent blob itself,
#: base64, to fields with ``include_latents=True``. Nothing else ever sends it.
BLOBS_CONTEXT_KEY = "latentstore_blobs"


@dataclass(frozen=True)
class _Shape:
    """What the links of every ready row with the same srcset candidates share: the size boxes
    of its token (widths alone: any height fits), the srcset parts and the url's ending.

    A srcset is ``base.join(parts)``: ``["", "0.avif 320w, ", ..., "4.avif 1600w"]`` puts the
    base before each candidate in one join. When the last candidate is the row's own size, the
    last part is ``last`` (``"4.avif "``) plus the row's width, set in ``parts`` per row: rows
    of any width share the rest.
    """

    boxes: tuple[tuple[int, int] | None, ...]
    srcsets: tuple[tuple[str, list[str], str], ...]  # (format key, parts, last)
    own: bool  # the last candidate is the row's own size
    url: str


def _shape(
    wanted: tuple[int, ...], count: int, own: bool, formats: list[str], url_format: str
) -> _Shape:
    """The :class:`_Shape` of the first ``count`` of ``wanted`` (and the own size if ``own``)."""
    widths = [f"{width}w" for width in wanted[:count]]
    srcsets = []
    for fmt in formats:
        ext = EXTENSIONS[fmt]
        items = [f"{index}.{ext} {width}" for index, width in enumerate(widths)]
        items.append(f"{count}.{ext} " if own else items.pop())
        parts = ["", *(f"{item}, " for item in items[:-1]), items[-1]]
        srcsets.append((fmt.lower(), parts, items[-1]))
    boxes = tuple((width, WIDTH_ONLY) for width in wanted[:count]) + ((None,) if own else ())
    return _Shape(boxes, tuple(srcsets), own, f"{count + own - 1}.{EXTENSIONS[url_format]}")


class LatentImageField(serializers.Field):
    """A serializer field for a model's :class:`~latentstore.fields.LatentImageField`.

    ``widths``, ``formats`` and ``upscale`` choose the ``srcset`` candidates as
    ``{% latent_picture %}`` does (defaults: ``PICTURE_WIDTHS``, ``PICTURE_FORMATS``);
    ``url`` is the largest candidate in ``url_format``; ``preview_url`` the instant
    ``preview_decoder`` picture fitted into ``preview_size`` (None: no preview). All of a row's
    links share one signed token. ``decoder`` defaults to the model field's.
    ``include_latents=True`` adds the latents' shape, dtype and origin. ``allow_null`` is True
    unless given: ``null`` clears the image.
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
        self._prefetched_for: Any = None
        self._formats: list[str] | None = None
        self._url_format = ""
        self._signers: dict[str, SetSigner] = {}
        self._last: tuple[Any, ...] | None = None
        self._shapes: dict[tuple[int, bool], _Shape] = {}
        self._wanted_widths: tuple[tuple[int, ...], int | None] | None = None

    # --- read -----------------------------------------------------------------------------

    def to_representation(self, value: LatentImage) -> dict[str, Any]:
        image = value
        facts = image.facts()
        data: dict[str, Any] = {
            "state": facts.state,
            "width": facts.width,
            "height": facts.height,
            "url": None,
            "srcset": {},
            "preview_url": None,
            "error": facts.error or None,
        }
        if facts.state == READY and facts.digest:
            self._links(image, facts, data)
        if self.include_latents:
            data["latents"] = self._latents(image) if facts.state == READY else None
        return data

    def _links(self, image: LatentImage, facts: ImageFacts, data: dict[str, Any]) -> None:
        # One signature a row, whatever the widths and formats: a picture-set token for the
        # srcsets, the url and the preview. The rest of each link is shared by rows whose
        # srcset candidates are the same widths.
        own_w, own_h = facts.width, facts.height
        if not own_w or not own_h:
            return
        wanted, limit = self._wanted()
        count, own = candidate_count(own_w, own_h, wanted, self.upscale, limit)
        if not count and not own:
            return
        shape = self._shapes.get((count, own))
        if shape is None:
            formats = self._picture_formats()  # sets self._url_format too
            shape = _shape(wanted, count, own, formats, self._url_format)
            self._shapes[(count, own)] = shape
        signer, template, prefix = self._template(image, shape, facts.autoencoder)
        base = f"{prefix}{signer.sign_row(template, image.instance.pk, facts.digest)}/"
        if own:  # the last part is the row's own width: set per row in the shape's lists
            width = f"{own_w}w"
            for _key, parts, last in shape.srcsets:
                parts[-1] = last + width
        data["srcset"] = {key: base.join(parts) for key, parts, _last in shape.srcsets}
        data["url"] = base + shape.url
        if self.preview_size is not None:
            data["preview_url"] = f"{base}{PREVIEW_INDEX}.webp"

    def _template(
        self, image: LatentImage, shape: _Shape, autoencoder: str
    ) -> tuple[SetSigner, SetTemplate, str]:
        """The signer, the token template and the URL prefix of ``image``'s row."""
        # The rows of a listing mostly share their model, candidates and autoencoder: the last
        # template is checked first, without building a key.
        last = self._last
        model = type(image.instance)
        if last is not None and last[0] is shape and last[1] is model and last[2] == autoencoder:
            return last[3]
        field = image.field
        decoder = self.decoder or field.decoder
        signer = self._signers.get(decoder)
        if signer is None:
            formats = [*self._picture_formats(), self._url_format]
            preview = None
            if self.preview_size is not None:
                preview = (self.preview_decoder, self.preview_size, "webp")
            signer = SetSigner(decoder, list(dict.fromkeys(formats)), preview)
            self._signers[decoder] = signer
        label = model._meta.label_lower
        template = signer.template(label, field.name, autoencoder, shape.boxes)
        found = (signer, template, self._url_prefix())
        self._last = (shape, model, autoencoder, found)
        return found

    def _wanted(self) -> tuple[tuple[int, ...], int | None]:
        """The srcset widths and ``URL_MAX_SIZE``, read once per field, not once per row."""
        if self._wanted_widths is None:
            self._wanted_widths = (parse_widths(self.widths), conf.get_settings()["URL_MAX_SIZE"])
        return self._wanted_widths

    def _picture_formats(self) -> list[str]:
        if self._formats is None:
            self._formats = picture_formats(self.formats)
            self._url_format = normalise_format(self.url_format)
        return self._formats

    def _url_prefix(self) -> str:
        # Absolute URLs when the view passed its request (as DRF's FileField does); worked out
        # with each template (_template), not once per picture.
        request = self.context.get("request")
        host = request.build_absolute_uri("/").rstrip("/") if request is not None else ""
        return host + url_prefix()

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
