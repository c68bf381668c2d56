"""A URLconf that forgot ``latentstore.urls`` (for the system check and url()'s error)."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
