"""The admin mixin: thumbnails, the change form's preview and badge, the actions."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext

from latentstore_workers import autoencoders
from project.models import Photo
from tests.conftest import encode_pointers, latentstore_config
from tests.rows import fake_blob, make_rows, run_web_tier
from tests.test_field import encode_now
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "/admin/demo/photo/"


@pytest.fixture
def admin_client(client):
    user = get_user_model().objects.create_superuser("admin", "a@example.com", "pw")
    client.force_login(user)
    return client


def test_change_list_of_100_rows_loads_no_blob_no_model_and_decodes_nothing(admin_client, broker):
    make_rows(90)
    make_rows(5, "pending", start=90)
    make_rows(5, "failed", start=95)
    broker("latents.decode")
    autoencoders.clear_cache()
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(CHANGELIST)
    assert page.status_code == 200
    html = page.content.decode()
    assert html.count('class="latent-thumb"') == 100, "one thumbnail per row"
    assert len(re.findall(r'<img src="/latents/p/[^"]+\.webp"', html)) == 90
    assert html.count("latentstore/pending.svg") == 5
    assert html.count("latentstore/failed.svg") == 5
    assert html.count('data-latent-state="failed"') >= 5

    photo_sql = [q["sql"] for q in queries.captured_queries if '"demo_photo"' in q["sql"]]
    assert photo_sql and all(
        '"image_staged"' not in sql and '"demo_photo"."image",' not in sql for sql in photo_sql
    ), "the change list must not read latent blobs or staged originals"
    assert autoencoders._cache == {}, "the change list must not load a model"
    assert broker("latents.decode") == [], "rendering the page decodes nothing"

    Photo.objects.filter(pk__in=list(Photo.objects.values_list("pk", flat=True)[10:])).delete()
    with CaptureQueriesContext(connection) as few:
        assert admin_client.get(CHANGELIST).content.decode().count('class="latent-thumb"') == 10
    assert len(queries) == len(few), "queries do not grow with the rows"


def test_web_tier_renders_the_change_list_and_thumbnails_without_torch(tmp_path):
    """In a process that never imported torch: 100 rows, the page, a thumbnail's preview."""
    script = """
import re, sys, django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.contrib.auth import get_user_model
from django.test import Client
from tests.rows import make_rows
make_rows(100)
client = Client()
client.force_login(get_user_model().objects.create_superuser("a", "a@example.com", "pw"))
page = client.get("/admin/demo/photo/")
assert page.status_code == 200, page.status_code
urls = re.findall(r'<img src="(/latents/p/[^"]+)"', page.content.decode())
assert len(urls) == 100, len(urls)
thumb = client.get(urls[0])
assert thumb.status_code == 200 and thumb["Content-Type"] == "image/webp", thumb.status_code
assert "torch" not in sys.modules and "diffusers" not in sys.modules, "torch was imported"
print("NO-TORCH-OK")
"""
    out = run_web_tier(script, tmp_path, timeout=180)
    assert "NO-TORCH-OK" in out.stdout, out.stderr[-3000:]


def test_thumbnail_column_comes_first_and_links_to_the_object(admin_client):
    (pk,) = make_rows(1)
    html = admin_client.get(CHANGELIST).content.decode()
    assert 'class="column-latent_thumbnail"' in html
    assert html.index("column-latent_thumbnail") < html.index("column-title")
    assert f'<a href="/admin/demo/photo/{pk}/change/"><span class="latent-thumb"' in html
    assert "latentstore/admin.css" in html


def test_change_form_shows_preview_badge_and_origin(admin_client, png_bytes):
    photo = Photo.objects.create(title="r", image=png_bytes)
    encode_now(photo)
    html = admin_client.get(f"/admin/demo/photo/{photo.pk}/change/").content.decode()
    assert photo.image.url() in html, "a 40x24 image is not blown up to the 384 box"
    assert 'class="latent-badge latent-badge-ready"' in html
    assert "4 × 3 × 5 float16" in html and photo.image.origin["fingerprint"] in html
    assert 'type="file" name="image"' in html and 'name="image-clear"' in html


def test_change_form_for_pending_failed_and_corrupt_rows(admin_client):
    (pending,) = make_rows(1, "pending")
    html = admin_client.get(f"/admin/demo/photo/{pending}/change/").content.decode()
    assert "latent-badge-pending" in html and "latentstore/pending.svg" in html

    (failed,) = make_rows(1, "failed")
    html = admin_client.get(f"/admin/demo/photo/{failed}/change/").content.decode()
    assert "latent-badge-failed" in html and "The image could not be read: broken" in html

    (corrupt,) = make_rows(1)
    Photo.objects.filter(pk=corrupt).update(image=fake_blob()[:-3])
    page = admin_client.get(f"/admin/demo/photo/{corrupt}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "latent-badge-error" in html and "The stored latents are unreadable" in html
    assert admin_client.get(CHANGELIST).status_code == 200


def test_view_only_users_see_the_preview_read_only(client, png_bytes):
    from django.contrib.auth.models import Permission

    photo = Photo.objects.create(title="r", image=png_bytes)
    encode_now(photo)
    viewer = get_user_model().objects.create_user("viewer", "v@example.com", "pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_photo"))
    client.force_login(viewer)
    page = client.get(f"/admin/demo/photo/{photo.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert photo.image.url() in html and "latent-badge-ready" in html
    assert "&lt;LatentImage" not in html and 'type="file"' not in html
    listing = client.get(CHANGELIST).content.decode()
    assert listing.count('class="latent-thumb"') == 1
    assert "reencode_selected" not in listing, "actions need the change permission"


def test_replacing_the_image_through_the_change_form(admin_client, broker, png_bytes):
    photo = Photo.objects.create(title="old", image=png_bytes)
    encode_now(photo)
    broker("latents.encode")
    new = image_bytes(make_test_image(64, 48, seed=4), "PNG")
    response = admin_client.post(
        f"/admin/demo/photo/{photo.pk}/change/",
        {"title": "new", "image": SimpleUploadedFile("n.png", new)},
    )
    assert response.status_code == 302, response.content[:2000]
    photo.refresh_from_db()
    assert photo.image.state == "pending" and (photo.image.width, photo.image.height) == (64, 48)
    sent = broker("latents.encode")
    assert encode_pointers(sent) == [["demo.Photo", photo.pk, "image", str(photo.image_token)]]


def test_editing_other_fields_keeps_the_encoded_image(admin_client, broker, png_bytes):
    photo = Photo.objects.create(title="old", image=png_bytes)
    encode_now(photo)
    blob, token = photo.image.blob, photo.image_token
    broker("latents.encode")
    response = admin_client.post(f"/admin/demo/photo/{photo.pk}/change/", {"title": "renamed"})
    assert response.status_code == 302, response.content[:2000]
    photo = Photo.objects.get(pk=photo.pk)
    assert photo.title == "renamed" and photo.image.state == "ready"
    assert photo.image.blob == blob and photo.image_token == token
    assert broker("latents.encode") == []


def test_action_reencode_selected_from_kept_originals(
    admin_client, broker, settings, tiny_vae_dir, png_bytes
):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, KEEP_ORIGINAL=True)
    kept = Photo.objects.create(title="kept", image=png_bytes)
    encode_now(kept)
    assert kept.image_original
    (lost,) = make_rows(1)  # no original anywhere
    broker("latents.encode")
    old_token = kept.image_token
    response = admin_client.post(
        CHANGELIST,
        {"action": "reencode_selected", "_selected_action": [kept.pk, lost]},
        follow=True,
    )
    assert response.status_code == 200
    text = [str(m) for m in response.context["messages"]]
    assert any("1 photo (image) re-encoding" in m for m in text), text
    assert any("1 photo (image) skipped: no original kept" in m for m in text), text
    kept.refresh_from_db()
    assert kept.image.state == "pending" and kept.image_token != old_token
    assert bytes(kept.image_staged) == png_bytes and kept.image_original == ""
    sent = encode_pointers(broker("latents.encode"))
    assert sent == [["demo.Photo", kept.pk, "image", str(kept.image_token)]]
    assert Photo.objects.get(pk=lost).image.state == "ready"


def test_action_retry_failed(admin_client, broker):
    (failed,) = make_rows(1, "failed")
    (ready,) = make_rows(1)
    broker("latents.encode")
    response = admin_client.post(
        CHANGELIST, {"action": "retry_failed", "_selected_action": [failed, ready]}, follow=True
    )
    text = [str(m) for m in response.context["messages"]]
    assert any("1 photo (image) queued again" in m for m in text), text
    assert any("skipped: not failed" in m for m in text), text
    row = Photo.objects.get(pk=failed)
    assert row.image.state == "pending" and row.image_error == "" and row.image_attempts == 0
    sent = encode_pointers(broker("latents.encode"))
    assert sent == [["demo.Photo", failed, "image", str(row.image_token)]]


def test_round_trip_quality_shows_in_the_list_the_form_and_a_filter(admin_client, settings):
    settings.LATENTSTORE = {**settings.LATENTSTORE, "MIN_PSNR": 22.0}
    low, fine, unmeasured = make_rows(3, distinct=True)
    Photo.objects.filter(pk=low).update(image_psnr=17.25, image_original="originals/x.png")
    Photo.objects.filter(pk=fine).update(image_psnr=26.5)

    html = admin_client.get(CHANGELIST).content.decode()
    assert html.count('data-latent-quality="low"') == 1
    assert 'title="17.25 dB PSNR, below the 22 dB threshold (original kept)"' in html
    assert "image round trip" in html and "low fidelity (&lt; 22 dB)" in html

    def listed(query: str) -> set[int]:
        page = admin_client.get(f"{CHANGELIST}?image_quality={query}").content.decode()
        return {int(pk) for pk in re.findall(r"/admin/demo/photo/(\d+)/change/", page)}

    assert listed("low") == {low}
    assert listed("ok") == {fine}
    assert listed("unmeasured") == {unmeasured}

    form = admin_client.get(f"/admin/demo/photo/{low}/change/").content.decode()
    assert "<dt>round trip</dt>" in form
    assert "17.25 dB PSNR, below the 22 dB threshold (original kept)" in form
    assert "latent-badge-low-fidelity" in form
    form = admin_client.get(f"/admin/demo/photo/{fine}/change/").content.decode()
    assert "26.50 dB PSNR</dd>" in form and "latent-badge-low-fidelity" not in form
    form = admin_client.get(f"/admin/demo/photo/{unmeasured}/change/").content.decode()
    assert "round trip" not in form.split('class="latent-details"')[1].split("</dl>")[0]
