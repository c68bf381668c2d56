"""``path("latents/", include("latentstore.urls"))``: the signed picture URLs."""

from django.urls import re_path

from latentstore import views

app_name = "latentstore"

urlpatterns = [
    # Signer tokens are URL-safe base64 with ':' separators (and a leading '.' when compressed).
    re_path(
        r"^p/(?P<token>[A-Za-z0-9_\-:.]+)\.(?P<ext>webp|png|jpg|avif)$",
        views.picture,
        name="picture",
    ),
    # One token for a <picture>'s sizes and formats; the index picks the size ('p': the preview).
    re_path(
        r"^p/(?P<token>[A-Za-z0-9_\-:.]+)/(?P<index>\d{1,3}|p)\.(?P<ext>webp|png|jpg|avif)$",
        views.picture_in_set,
        name="picture-in-set",
    ),
]
