"""``{% load latentstore %}``: pictures of LatentImageFields in templates.

``{% latent_img photo.image size=256 %}`` renders an ``<img>`` with the fitted width and height
and a signed URL (the cached decode, or the instant preview while the decode is on its way);
while the image is pending or failed it renders a placeholder of the same size.
``{% latent_url photo.image size=256 as src %}`` gives the signed URL alone ("" until ready).
``{% latent_picture photo.image %}`` renders a responsive ``<picture>``: AVIF and WebP sources
with a ``srcset`` of widths each, and a JPEG ``<img>`` to fall back on.
"""

from __future__ import annotations

from typing import Any

from django import template
from django.utils.safestring import SafeString

from latentstore.fields import LatentImage, LatentsNotReady
from latentstore.html import picture_tag, responsive_picture

register = template.Library()


@register.simple_tag
def latent_img(
    image: LatentImage | None,
    size: int | None = None,
    decoder: str | None = None,
    format: str = "webp",
    alt: str = "",
    density: int = 1,
    upscale: bool = True,
    **attrs: Any,
) -> SafeString:
    """``<img>`` of ``image`` fitted into a ``size`` box; a placeholder until it is ready.

    Other keyword arguments become attributes: ``class_="rounded"`` (or ``css_class``),
    ``loading="eager"``; ``density=2`` asks for a twice-as-large picture for high-DPI screens;
    ``upscale=False`` never shows a small image larger than it is.
    """
    if not isinstance(image, LatentImage):
        return SafeString("")
    if "css_class" in attrs:
        attrs["class_"] = attrs.pop("css_class")
    return picture_tag(
        image,
        size,
        decoder=decoder,
        format=format,
        alt=alt,
        density=int(density),
        upscale=bool(upscale),
        **attrs,
    )


@register.simple_tag
def latent_url(
    image: LatentImage | None,
    size: int | None = None,
    decoder: str | None = None,
    format: str = "webp",
) -> str:
    """The signed URL of ``image``'s picture, or "" while it is not ready."""
    if not isinstance(image, LatentImage):
        return ""
    try:
        return image.url(decoder=decoder, size=size, format=format)
    except LatentsNotReady:
        return ""


@register.simple_tag
def latent_picture(
    image: LatentImage | None,
    widths: Any = None,
    sizes: str | None = None,
    formats: Any = None,
    decoder: str | None = None,
    alt: str = "",
    upscale: bool = False,
    **attrs: Any,
) -> SafeString:
    """A responsive ``<picture>`` of ``image`` (see :func:`latentstore.html.responsive_picture`).

    ``widths="320 640 1280"``, ``formats="avif webp"`` and ``sizes`` default to the
    ``PICTURE_WIDTHS``, ``PICTURE_FORMATS`` and ``PICTURE_SIZES`` settings. Other keyword
    arguments become attributes of the ``<img>``: ``class_`` (or ``css_class``), ``loading``.
    """
    if not isinstance(image, LatentImage):
        return SafeString("")
    if "css_class" in attrs:
        attrs["class_"] = attrs.pop("css_class")
    return responsive_picture(
        image,
        widths=widths,
        sizes=sizes,
        formats=formats,
        decoder=decoder,
        alt=alt,
        upscale=bool(upscale),
        **attrs,
    )
