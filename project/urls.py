from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # Signed picture URLs: photo.image.url(), {% latent_img %} and the admin's thumbnails.
    path("latents/", include("latentstore.urls")),
]
