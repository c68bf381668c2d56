"""``path("latents/", include("latentstore.urls"))``: the signed picture URLs."""

from django.urls import re_path

from latentstore import views

app_name = "latentstore"

urlpatterns = [
    # Signer tokens are URL-safe base64 with ':' separators (and a leading '.' when compressed).
    re_path(
        r"^p/(?P<token>[A-Za-z0-9_\-:.]+)\.(?P<ext>webp|png|jpg)$",
        views.picture,
        name="picture",
    ),
]
