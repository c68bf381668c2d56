from django.contrib import admin

from latentstore.admin import LatentImageAdminMixin
from project.models import Photo


@admin.register(Photo)
class PhotoAdmin(LatentImageAdminMixin, admin.ModelAdmin):
    list_display = ("title", "image_state", "image_width", "image_height", "created")
    list_filter = ("image_state",)
    readonly_fields = ("image_state", "image_error", "image_width", "image_height")
