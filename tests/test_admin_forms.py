"""The field in Django's admin (a file input) and the Celery settings the protocol relies on."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile

from project.models import Photo

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    user = get_user_model().objects.create_superuser("admin", "a@example.com", "pw")
    client.force_login(user)
    return client


def test_admin_add_form_has_a_file_input_and_saves_an_upload(admin_client, png_bytes):
    page = admin_client.get("/admin/demo/photo/add/")
    assert page.status_code == 200
    assert b'type="file" name="image"' in page.content
    assert b'accept="image/*"' in page.content

    response = admin_client.post(
        "/admin/demo/photo/add/",
        {"title": "from admin", "image": SimpleUploadedFile("a.png", png_bytes)},
    )
    assert response.status_code == 302, response.content[:2000]
    photo = Photo.objects.get(title="from admin")
    assert photo.image.state == "pending"
    assert (photo.image.width, photo.image.height) == (40, 24)


def test_admin_rejects_a_non_image_with_a_form_error(admin_client):
    response = admin_client.post(
        "/admin/demo/photo/add/",
        {"title": "bad", "image": SimpleUploadedFile("a.jpg", b"<html>hello</html>")},
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["image"]
    assert not Photo.objects.exists()


def test_admin_change_list_renders_without_loading_blobs(admin_client, png_bytes):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for i in range(3):
        Photo.objects.create(title=f"p{i}", image=png_bytes)
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get("/admin/demo/photo/")
    assert page.status_code == 200
    listing = [q["sql"] for q in queries.captured_queries if 'FROM "demo_photo"' in q["sql"]]
    assert listing and all(
        '"image_staged"' not in sql and '"demo_photo"."image",' not in sql for sql in listing
    )


def test_celery_app_has_the_reliability_settings():
    from latentstore.celery_config import TASK_TIME_LIMIT
    from project.celery import app

    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert list(conf.accept_content) == ["json"] and conf.task_serializer == "json"
    assert conf.broker_transport_options["visibility_timeout"] > TASK_TIME_LIMIT
    assert conf.task_routes["latentstore.encode"]["queue"] == "latents.encode"


def test_worker_tasks_are_declared_acks_late_and_registered_by_name():
    from latentstore_workers import tasks
    from project.celery import app

    app.loader.import_default_modules()
    assert app.tasks["latentstore.encode"].__module__ == "latentstore_workers.tasks"
    assert tasks.encode.acks_late and tasks.encode.reject_on_worker_lost
    assert "latentstore.sweep" in app.tasks
