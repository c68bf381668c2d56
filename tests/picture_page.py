"""A test-only page of ``{% latent_picture %}`` s (the browser test): the project's URLs plus
``/pictures/``. Used with ``pytest.mark.urls("tests.picture_page")``."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.template import Context, Template
from django.urls import path

from project.models import Photo
from project.urls import urlpatterns as project_urlpatterns

TAG = (
    '{% latent_picture photo.image widths="160 320 640" sizes="320px" formats="avif webp" '
    'alt=photo.title loading="eager" %}'
)
PAGE = Template(
    """{% load latentstore %}<!doctype html>
<html><head><meta charset="utf-8"><title>pictures</title>
<style>body { margin: 16px; font-family: sans-serif } figure { margin: 0 0 16px }</style></head>
<body>{% for photo in photos %}<figure id="photo-{{ photo.pk }}">"""
    + TAG
    + """<figcaption>{{ photo.title }}</figcaption></figure>{% endfor %}</body></html>"""
)


def pictures(request: HttpRequest) -> HttpResponse:
    photos = Photo.objects.order_by("pk")
    return HttpResponse(PAGE.render(Context({"photos": photos})))


urlpatterns = [*project_urlpatterns, path("pictures/", pictures)]
