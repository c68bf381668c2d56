"""The admin: thumbnails, a preview with a state badge, and re-encode / retry actions.

Adopt it in one line::

    @admin.register(Photo)
    class PhotoAdmin(LatentImageAdminMixin, admin.ModelAdmin):
        list_display = ("title", "created")

The change list gets a thumbnail column (first, and a link to the object), the change form a
preview with a state badge, the latents' origin and a file input to replace the image, and the
actions "Re-encode selected images" and "Retry failed images".

Rendering never waits for a neural decode and never loads a model: the change list defers every
latent blob (:func:`~latentstore.queries.without_blobs`) and links each thumbnail's signed URL,
whose view serves the cached decode or the instant latent→RGB preview (and schedules the decode
for the next view). A pending or failed row shows a placeholder and a badge; unreadable latents
show an error badge.
"""

from __future__ import annotations

import functools
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import IS_POPUP_VAR
from django.contrib.admin.utils import model_ngettext
from django.db import models
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import SafeString

from latentstore import maintenance
from latentstore.fields import (
    FAILED,
    READY,
    LatentImage,
    LatentImageField,
)
from latentstore.html import escape, picture_tag, state_badge
from latentstore.quality import QualityPolicy, low_fidelity_q
from latentstore.queries import latent_fields_of, without_blobs

THUMBNAIL_COLUMN = "latent_thumbnail"


class LatentImageWidget(forms.ClearableFileInput):
    """A file input with the current picture, its state badge and where its latents came from."""

    template_name = "latentstore/widgets/latent_image.html"
    preview_size = 384

    def get_context(self, name: str, value: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
        context = super().get_context(name, value, attrs)
        context["widget"]["latent"] = (
            describe(value, self.preview_size) if isinstance(value, LatentImage) and value else None
        )
        return context


def describe(image: LatentImage, size: int) -> dict[str, Any]:
    """What the change form shows of ``image``: picture, badge, error and details."""
    details: list[tuple[str, Any]] = []
    error = None
    if image.width and image.height:
        details.append(("size", f"{image.width} × {image.height} px"))
    if image.state == READY:
        try:
            header, _latents = image.unpack()  # one row: verify the whole blob
        except Exception as exc:  # corrupt, truncated, unknown version: say so, do not 500
            error = f"The stored latents are unreadable: {exc}"
        else:
            c, h, w = header.shape
            details += [
                ("latents", f"{c} × {h} × {w} {header.dtype}, {image.nbytes:,} bytes"),
                ("autoencoder", f"{header.autoencoder} ({header.family})"),
                ("weights", header.fingerprint),
            ]
            quality = quality_text(image)
            if quality:
                details.append(("round trip", quality))
    elif image.attempts:
        details.append(("attempts", image.attempts))
    if error is not None:
        picture = picture_for_error(image, size)
    else:
        picture = _safe_picture(image, size, density=1, upscale=False)
    badge = state_badge(image, error=error)
    if error is None and image.state == READY:
        badge = SafeString(badge + quality_badge(image))
    return {
        "picture": picture,
        "badge": badge,
        "error": error or (image.error if image.state == FAILED else ""),
        "details": details,
        "state": image.state if error is None else "error",
    }


def quality_text(image: LatentImage) -> str:
    """The measured round-trip PSNR and what it means, or "" when the gate did not measure it."""
    value = image.psnr
    if value is None:
        return ""
    policy = QualityPolicy.for_field(image.field)
    text = f"{value:.2f} dB PSNR"
    if policy.is_low_fidelity(value):
        text += f", below the {policy.min_psnr:g} dB threshold"
        text += " (original kept)" if image.has_original else " (no original kept)"
    return text


def quality_badge(image: LatentImage) -> SafeString:
    """A "low fidelity" badge for a ready row whose round trip fell below its threshold."""
    if not image.low_fidelity:
        return SafeString("")
    return SafeString(
        f'<span class="latent-badge latent-badge-low-fidelity" data-latent-quality="low"'
        f' title="{escape(quality_text(image))}">low fidelity</span>'
    )


def picture_for_error(image: LatentImage, size: int) -> SafeString:
    from django.templatetags.static import static

    from latentstore.html import display_size

    fitted = display_size(image, size) or (size, size)
    return format_html(
        '<img src="{}" width="{}" height="{}" alt="unreadable" class="latent-img '
        'latent-img-error" data-latent-state="error">',
        static("latentstore/failed.svg"),
        *fitted,
    )


def _safe_picture(image: LatentImage, size: int, density: int, upscale: bool = True) -> SafeString:
    try:
        return picture_tag(image, size, density=density, empty=True, upscale=upscale)
    except Exception as exc:  # e.g. a decoder alias that is no longer configured
        return state_badge(image, error=f"{type(exc).__name__}: {exc}")


@functools.cache
def quality_filter(field: LatentImageField) -> type[admin.SimpleListFilter]:
    """A change-list filter on ``field``'s measured round trip: low fidelity, fine, unmeasured."""
    psnr = field.companion_attname("psnr")
    state = field.companion_attname("state")

    class QualityFilter(admin.SimpleListFilter):
        title = f"{field.verbose_name} round trip"
        parameter_name = f"{field.name}_quality"

        def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
            threshold = QualityPolicy.for_field(field).min_psnr
            return [
                ("low", f"low fidelity (< {threshold:g} dB)"),
                ("ok", f"≥ {threshold:g} dB"),
                ("unmeasured", "not measured"),
            ]

        def queryset(self, request: HttpRequest, queryset: models.QuerySet) -> models.QuerySet:
            threshold = QualityPolicy.for_field(field).min_psnr
            value = self.value()
            if value == "low":
                return queryset.filter(low_fidelity_q(field, threshold))
            if value == "ok":
                return queryset.filter(**{f"{psnr}__gte": threshold})
            if value == "unmeasured":
                return queryset.filter(**{state: READY, f"{psnr}__isnull": True})
            return queryset

    QualityFilter.__name__ = QualityFilter.__qualname__ = f"{field.name.title()}QualityFilter"
    return QualityFilter


class LatentImageAdminMixin:
    """Thumbnails, a preview widget and re-encode/retry actions for every LatentImageField.

    Options (class attributes): ``latent_thumbnail_size`` (the thumbnail box in CSS pixels,
    default 64; pictures are fetched at twice that for high-DPI screens) and
    ``latent_thumbnail_column`` (False keeps ``list_display`` as you wrote it; put
    ``"latent_thumbnail"`` in it yourself to place the column), ``latent_quality_filter``
    (default True: a change-list filter per field on the measured round-trip PSNR, see
    :func:`quality_filter`).
    """

    latent_thumbnail_size = 64
    latent_thumbnail_column = True
    latent_quality_filter = True
    latent_widget = LatentImageWidget

    # querysets: the change list never needs a blob
    def get_queryset(self, request: HttpRequest) -> models.QuerySet:
        return without_blobs(super().get_queryset(request))

    # the change list
    def get_list_display(self, request: HttpRequest) -> Any:
        columns = list(super().get_list_display(request))
        if self.latent_thumbnail_column and THUMBNAIL_COLUMN not in columns:
            columns.insert(0, THUMBNAIL_COLUMN)
        return columns

    def get_list_filter(self, request: HttpRequest) -> Any:
        filters = list(super().get_list_filter(request))
        if self.latent_quality_filter:
            filters += [quality_filter(f) for f in latent_fields_of(self.model)]
        return filters

    def get_list_display_links(self, request: HttpRequest, list_display: Any) -> Any:
        links = super().get_list_display_links(request, list_display)
        if not self.list_display_links and list_display and list_display[0] == THUMBNAIL_COLUMN:
            # The thumbnail and the column after it both open the object.
            return list(list_display[:2])
        return links

    @admin.display(description="Image")
    def latent_thumbnail(self, obj: models.Model) -> SafeString:
        box = self.latent_thumbnail_size
        parts = []
        for field in latent_fields_of(type(obj)):
            image = getattr(obj, field.name)
            picture = _safe_picture(image, box, density=2)
            badge = state_badge(image) if image.state != READY else quality_badge(image)
            parts.append(
                f'<span class="latent-thumb" data-latent-field="{escape(field.name)}">'
                f"{picture}{badge}</span>"
            )
        return SafeString("".join(parts))

    # the change form
    def formfield_for_dbfield(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if isinstance(db_field, LatentImageField) and "widget" not in kwargs:
            overrides = getattr(self, "formfield_overrides", {}).get(type(db_field), {})
            if "widget" not in overrides:
                kwargs["widget"] = self.latent_widget
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    # view-only users: the same preview, read-only (Django would print the value object)
    def get_fields(self, request: HttpRequest, obj: models.Model | None = None) -> Any:
        fields = list(super().get_fields(request, obj))
        if obj is None or self.has_change_permission(request, obj):
            return fields
        names = {f.name for f in latent_fields_of(self.model)}
        shown = [n for n in fields if n not in names]
        if len(shown) < len(fields):
            shown.insert(fields.index(next(n for n in fields if n in names)), "latent_preview")
        return shown

    def get_readonly_fields(self, request: HttpRequest, obj: models.Model | None = None) -> Any:
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and not self.has_change_permission(request, obj):
            fields.append("latent_preview")
        return fields

    @admin.display(description="Image")
    def latent_preview(self, obj: models.Model) -> SafeString:
        parts = []
        for field in latent_fields_of(type(obj)):
            image = getattr(obj, field.name)
            if not image:
                continue
            info = describe(image, LatentImageWidget.preview_size)
            details = "".join(
                f"<dt>{escape(name)}</dt><dd>{escape(value)}</dd>"
                for name, value in info["details"]
            )
            error = f'<p class="latent-error">{escape(info["error"])}</p>' if info["error"] else ""
            parts.append(
                f'<div class="latent-widget"><div class="latent-current">{info["picture"]}</div>'
                f'<div class="latent-details">{info["badge"]}{error}<dl>{details}</dl></div></div>'
            )
        return SafeString("".join(parts))

    @property
    def media(self) -> forms.Media:
        return super().media + forms.Media(css={"all": ["latentstore/admin.css"]})

    # actions
    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        if self.actions is None or IS_POPUP_VAR in request.GET:
            return actions
        if self.has_change_permission(request):
            for func in (reencode_selected, retry_failed):
                name = func.__name__
                actions.setdefault(name, (func, name, func.short_description))
        return actions


@admin.action(description="Re-encode selected images (from kept originals)")
def reencode_selected(modeladmin: Any, request: HttpRequest, queryset: models.QuerySet) -> None:
    """Stage each selected row's original again and enqueue its encode."""
    _act(modeladmin, request, queryset, maintenance.reencode, "re-encoding")


@admin.action(description="Retry failed images")
def retry_failed(modeladmin: Any, request: HttpRequest, queryset: models.QuerySet) -> None:
    """Queue the failed rows among the selected ones again."""
    _act(modeladmin, request, queryset, maintenance.retry, "queued again")


def _act(
    modeladmin: Any, request: HttpRequest, queryset: models.QuerySet, action: Any, verb: str
) -> None:
    pks = list(queryset.values_list("pk", flat=True))
    for field in latent_fields_of(queryset.model):
        _report(modeladmin, request, field, action(queryset.model, field, pks=pks), verb)


def _report(
    modeladmin: Any, request: HttpRequest, field: LatentImageField, report: Any, verb: str
) -> None:
    def label(count: int) -> str:
        # "1 photo", "2 photos": the model's own singular and plural names.
        return f"{model_ngettext(field.model, count)} ({field.name})"

    if report.staged:
        modeladmin.message_user(
            request, f"{report.staged} {label(report.staged)} {verb}.", messages.SUCCESS
        )
    for reason, count in report.skipped.items():
        hint = (
            " (manage.py latents_reencode --from-decoded re-encodes decoded pixels, lossy)"
            if reason == maintenance.NO_ORIGINAL
            else ""
        )
        modeladmin.message_user(
            request, f"{count} {label(count)} skipped: {reason}{hint}.", messages.WARNING
        )
    if report.errors:
        first = "; ".join(f"pk={pk}: {msg}" for pk, msg in list(report.errors.items())[:3])
        count = len(report.errors)
        modeladmin.message_user(
            request, f"{count} {label(count)} could not be staged: {first}", messages.ERROR
        )
    if not report.staged and not report.skipped and not report.errors:
        modeladmin.message_user(request, f"No {label(0)} to act on.", messages.INFO)
