"""Nothing let in: no pickle on the wire or in weights, admin actions behind permissions.

Signed, bounded, expiring image URLs are tested in ``tests/test_urls.py``.
"""

from __future__ import annotations

import shlex
import time
import uuid

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission

from project.celery import app
from project.models import Photo
from tests.conftest import latentstore_config
from tests.rows import make_rows
from tests.test_field import encode_now
from tests.test_protocol import wait_for
from tests.tiny import image_bytes, make_test_image, tiny_autoencoder_config

pytestmark = pytest.mark.django_db(transaction=True)


def hostile_pickle(command: str) -> bytes:
    """A protocol-0 pickle that runs ``os.system(command)`` when loaded, written by hand."""
    return b"cos\nsystem\n(S" + repr(command).encode() + b"\ntR."


def test_the_worker_refuses_a_pickle_payload_and_keeps_working(celery_worker, tmp_path, caplog):
    marker = tmp_path / "pwned"
    body = hostile_pickle(f"touch {shlex.quote(str(marker))}")
    task_id = str(uuid.uuid4())
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue("latents.encode")
        try:
            queue.put(
                body,
                serializer=None,
                content_type="application/x-python-serialize",
                content_encoding="binary",
                headers={"task": "latentstore.encode", "id": task_id, "lang": "py"},
            )
        finally:
            queue.close()
    # A real upload behind it: once it is encoded, the worker has been past the pickle.
    photo = Photo.objects.create(title="after", image=image_bytes(make_test_image(40, 24), "PNG"))
    assert wait_for(photo).state == "ready"
    time.sleep(0.2)
    assert not marker.exists(), "the pickle was loaded"
    assert "Refusing to deserialize untrusted content of type pickle" in caplog.text


def test_the_celery_app_accepts_json_only():
    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import loads

    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json"
    with pytest.raises(ContentDisallowed):
        loads(
            hostile_pickle("true"),
            "application/x-python-serialize",
            "binary",
            accept=app.conf.accept_content,
        )


def test_weights_that_are_not_safetensors_are_refused(settings, tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from latentstore_workers.autoencoders import load_autoencoder

    torch.manual_seed(0)
    model = AutoencoderKL(**tiny_autoencoder_config())
    model.save_pretrained(tmp_path, safe_serialization=False)  # a pickled .bin only
    assert not list(tmp_path.glob("*.safetensors")) and list(tmp_path.glob("*.bin"))
    settings.LATENTSTORE = latentstore_config(tmp_path)
    with pytest.raises(Exception, match="safetensors"):
        load_autoencoder("default")


@pytest.fixture
def viewer(client):
    user = get_user_model().objects.create_user("viewer", "v@example.com", "pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_photo"))
    client.force_login(user)
    return client


@pytest.mark.parametrize("action", ["reencode_selected", "retry_failed"])
def test_admin_actions_posted_without_the_change_permission_do_nothing(
    viewer, broker, settings, tiny_vae_dir, action
):
    settings.LATENTSTORE = latentstore_config(tiny_vae_dir, KEEP_ORIGINAL=True)
    photo = Photo.objects.create(title="r", image=image_bytes(make_test_image(40, 24), "PNG"))
    encode_now(photo)
    (failed,) = make_rows(1, "failed", start=1)
    broker("latents.encode")
    before = dict(Photo.objects.values_list("pk", "image_state"))
    response = viewer.post(
        "/admin/demo/photo/",
        {"action": action, "_selected_action": [photo.pk, failed], "index": 0},
    )
    assert response.status_code in (200, 302, 403)
    assert dict(Photo.objects.values_list("pk", "image_state")) == before
    assert broker("latents.encode") == [], "nothing was queued"


def test_the_admin_needs_a_staff_login(client):
    (pk,) = make_rows(1)
    for url in ("/admin/demo/photo/", f"/admin/demo/photo/{pk}/change/"):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]
