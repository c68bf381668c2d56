from django.contrib import admin

from latentstore.fields import without_blobs
from project.models import Photo


@admin.register(Photo)
class PhotoAdmin(admin.ModelAdmin):
    list_display = ("title", "image_state", "image_width", "image_height", "created")
    list_filter = ("image_state",)
    readonly_fields = ("image_state", "image_error", "image_width", "image_height")

    def get_queryset(self, request):
        # The change list never needs the latent blobs or staged originals.
        return without_blobs(super().get_queryset(request))
