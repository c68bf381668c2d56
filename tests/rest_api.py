"""A small REST API over the demo ``Photo`` for the REST field's tests: serializers, a viewset,
and a URLconf (the project's URLs plus ``/api/``). Used with ``pytest.mark.urls``."""

from __future__ import annotations

from django.urls import include, path
from drf_spectacular.openapi import AutoSchema
from rest_framework import serializers, viewsets
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.routers import SimpleRouter

from latentstore.queries import without_blobs
from latentstore.rest_framework import LatentImageField
from project.models import Photo
from project.urls import urlpatterns as project_urlpatterns


class PhotoSerializer(serializers.ModelSerializer):
    image = LatentImageField(required=False, widths=[64, 128, 400])

    class Meta:
        model = Photo
        fields = ["id", "title", "image"]


class PhotoLatentsSerializer(PhotoSerializer):
    image = LatentImageField(read_only=True, formats="webp", include_latents=True)


class PhotoViewSet(viewsets.ModelViewSet):
    queryset = without_blobs(Photo.objects.order_by("pk"))  # a listing reads no blob
    serializer_class = PhotoSerializer
    parser_classes = [MultiPartParser, FormParser, JSONParser]
    renderer_classes = [JSONRenderer]
    permission_classes = [AllowAny]
    authentication_classes: list = []
    schema = AutoSchema()


class PhotoLatentsViewSet(viewsets.ReadOnlyModelViewSet):
    """The latents' shape and origin; their bytes only with ``?blobs=1``."""

    queryset = without_blobs(Photo.objects.order_by("pk"))
    serializer_class = PhotoLatentsSerializer
    renderer_classes = [JSONRenderer]
    permission_classes = [AllowAny]
    authentication_classes: list = []
    schema = AutoSchema()

    def get_serializer_context(self):
        context = super().get_serializer_context()
        context["latentstore_blobs"] = self.request.query_params.get("blobs") == "1"
        return context


router = SimpleRouter()
router.register("photos", PhotoViewSet, basename="photo")
router.register("photo-latents", PhotoLatentsViewSet, basename="photo-latents")

urlpatterns = [*project_urlpatterns, path("api/", include(router.urls))]
