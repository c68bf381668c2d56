"""The bad-input corpus (tests/corpus.py), each case driven through the form and a real worker.

A case is either refused at the form with a ``ValidationError`` before anything is stored, or
saved and then ``ready`` (a valid image the RGB policy handles) or honestly ``failed`` with a
message a person understands and the original kept. No case may crash the worker or lose a row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.forms import modelform_factory

from project.models import Photo
from tests.conftest import latentstore_config
from tests.corpus import CASES, Case

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
PhotoForm = modelform_factory(Photo, fields=["title", "image"])
ACCEPTED = [c for c in CASES if c.expect != "rejected"]
REJECTED = [c for c in CASES if c.expect == "rejected"]


def test_the_corpus_is_large_and_covers_every_outcome():
    assert len(CASES) >= 25
    assert {c.expect for c in CASES} == {"rejected", "failed", "ready"}


@pytest.fixture
def case_settings(settings, tiny_vae_dir):
    def apply(case: Case) -> None:
        settings.LATENTSTORE = latentstore_config(tiny_vae_dir, **dict(case.settings))

    return apply


def submit(case: Case):
    upload = SimpleUploadedFile(case.filename, case.data, content_type=case.content_type)
    return PhotoForm({"title": case.name}, {"image": upload})


@pytest.mark.parametrize("case", REJECTED, ids=lambda c: c.name)
def test_refused_at_the_form_before_anything_is_stored(case, case_settings, robustness):
    case_settings(case)
    form = submit(case)
    assert not form.is_valid()
    (error,) = form.errors.as_data()["image"]
    assert error.code == case.code, error
    assert not Photo.objects.exists()
    robustness.input(case, f"refused at the form: {error.messages[0]}", lost=0)


def wait_settled(photo: Photo, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        image = photo.image.refresh()
        if image.state in ("ready", "failed"):
            return image
        time.sleep(0.05)
    raise AssertionError(f"{photo.title}: still {photo.image.state!r} after {timeout} s")


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda c: c.name)
def test_accepted_then_ready_or_honestly_failed(case, case_settings, celery_worker, robustness):
    case_settings(case)
    form = submit(case)
    assert form.is_valid(), form.errors
    photo = form.save()
    image = wait_settled(photo)
    if case.expect == "ready":
        assert image.state == "ready", image.error
        assert (image.width, image.height) == case.size
        c, h, w = image.latents.shape
        assert (h, w) == (-(-case.size[1] // 8), -(-case.size[0] // 8))
        assert image.decode(decoder="rgb").size == case.size
        outcome = f"ready, {case.size[0]}x{case.size[1]}"
    else:
        assert image.state == "failed"
        assert case.message in image.error, image.error
        assert image.original_bytes() == case.data  # nothing lost: the upload stays staged
        outcome = f"failed: {image.error}"
    robustness.input(case, outcome, lost=0 if image.state in ("ready", "failed") else 1)


def test_the_worker_survives_the_whole_corpus_in_a_row(celery_worker, settings, tiny_vae_dir):
    """Every accepted case back to back on one worker: each settles, and the last still encodes."""
    photos = []
    for case in ACCEPTED:
        if case.settings:
            continue
        photos.append(Photo.objects.create(title=case.name, image=case.data))
    settled = [wait_settled(p).state for p in photos]
    assert set(settled) <= {"ready", "failed"}
    last = Photo.objects.create(title="after", image=ACCEPTED[-1].data)
    assert wait_settled(last).state == "ready"


MEMORY_PROBE = r"""
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import django
django.setup()
from django.core.exceptions import ValidationError
from latentstore import conf
from latentstore.images import inspect_image, open_rgb
from tests.corpus import CASES
out = {}
for case in CASES:
    settings = {**conf.DEFAULTS, **dict(case.settings)}
    data = case.data
    try:
        info = inspect_image(data, allowed_formats=settings["ALLOWED_FORMATS"],
                             max_pixels=settings["MAX_PIXELS"])
        try:
            img = open_rgb(data)
            out[case.name] = "rgb %dx%d" % img.size
        except ValueError as exc:
            out[case.name] = "valueerror"
    except ValidationError as exc:
        out[case.name] = "rejected " + exc.code
print(json.dumps(out))
"""


def test_no_case_needs_an_unbounded_allocation(tmp_path):
    """Header checks and decoding of the whole corpus run inside a 1 GiB address-space limit.

    A decompression bomb that slipped past the header check would need tens of GB and die with
    MemoryError here; torch is not imported, so the limit measures the image handling alone.
    """
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(1 << 30)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(results) == {c.name for c in CASES}
    for case in CASES:
        got = results[case.name]
        if case.expect == "rejected" and case.code not in ("too_large_bytes",):
            assert got == f"rejected {case.code}", (case.name, got)
        elif case.expect == "ready":
            assert got == "rgb {}x{}".format(*case.size), (case.name, got)
        elif case.expect == "failed":
            assert got == "valueerror", (case.name, got)
