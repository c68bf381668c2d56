"""On a CPU the batch plan comes from the device; the first picture never waits; a message whose
rows another claim took costs its claim and nothing else.

Real tiny models, real PostgreSQL: the timings the CPU rule decides from are the real passes'
(or, where a test needs "long" passes, written into the model's record as a worker would have
measured them on a big model).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from django.db import connection
from django.test.utils import CaptureQueriesContext

from latentstore import encoding
from latentstore_workers import autoencoders, cpu
from latentstore_workers import tasks as worker_tasks
from latentstore_workers.autoencoders import clear_cache, load_autoencoder
from latentstore_workers.codec import decode_outcomes, encode_images, encode_many, iter_encode
from latentstore_workers.pipeline import encode_rows
from project.models import Photo
from tests.conftest import requires_postgres
from tests.test_batching import configure, pictures, watch
from tests.test_claims import LABEL, pointers, staged


@pytest.fixture(autouse=True)
def _fresh_models():
    clear_cache()  # the CPU plan's measurements live on the loaded model
    yield
    clear_cache()


def use(settings, **top) -> None:
    settings.LATENTSTORE = {**settings.LATENTSTORE, **top}


# --- the rule -----------------------------------------------------------------------------------


def test_the_cpu_rule_from_measured_timings():
    """``{batch: (passes, best seconds per picture)}`` -> the next pass's size."""
    choose = cpu.choose_batch
    assert choose({}, 16) == 1  # nothing measured: one picture, at once
    assert choose({1: (1, 0.01)}, 16) == 1  # the first pass at a shape is a warm-up
    assert choose({1: (2, 0.01)}, 16) == 2  # short passes: try twice the size
    assert choose({1: (2, 0.01)}, 1) == 1  # ... within what the task and memory allow
    # This CPU, measured (design.md): SD-size 192² at 0.87 s a picture one at a time is all
    # compute; a bigger batch (11: 1.33 s a picture) is never even tried.
    assert choose({1: (2, 0.87)}, 16) == 1
    assert choose({1: (2, 0.87), 11: (1, 1.33)}, 16) == 1
    # A doubling must pay at least MARGIN per picture, else the smaller (quicker) batch stays.
    assert choose({1: (2, 0.010), 2: (1, 0.005)}, 16) == 2  # not measured twice yet
    assert choose({1: (2, 0.010), 2: (2, 0.0095)}, 16) == 1
    assert choose({1: (2, 0.010), 2: (2, 0.006)}, 16) == 4
    assert choose({1: (2, 0.010), 2: (2, 0.006), 4: (2, 0.0058)}, 16) == 2
    assert choose({1: (2, 0.010), 2: (2, 0.006), 4: (2, 0.004)}, 16) == 8
    assert choose({1: (2, 0.010), 2: (2, 0.006), 4: (2, 0.004)}, 6) == 6  # capped, then tried
    timings = {1: (2, 0.04), 2: (2, 0.03), 4: (2, 0.028)}
    assert choose(timings, 16) == 2  # 4 is less than 10 % quicker than 2
    assert choose(timings, 16) == choose(dict(timings), 16)  # a settled choice stays
    # A doubled pass that pays and became long (4 x 0.026 s) settles there: nothing left to
    # amortise, so 8 is not tried.
    assert choose({1: (2, 0.04), 2: (2, 0.03), 4: (2, 0.026)}, 16) == 4


def test_auto_plans_each_cpu_pass_from_the_passes_before_it(settings):
    use(settings, CPU_BATCH_SIZE="auto")
    ae = load_autoencoder("default")
    key = ("encode", (32, 32))
    seen: list[tuple[int, dict]] = []

    def note(x):  # before each pass: its size, and what had been measured when it was planned
        seen.append((x.shape[0], dict(ae.pass_times.get(key, {}))))

    images = pictures([(32, 32)] * 14)
    with watch(ae.model.encoder, fault=note):
        outcomes = encode_many(ae, images, max_batch=16)
    assert all(o.ok for o in outcomes)
    assert [size for size, _ in seen[:2]] == [1, 1]  # the first picture runs alone, at once
    left = len(images)
    for size, timings in seen:
        assert size == min(cpu.choose_batch(timings, 16), left), (size, timings)
        left -= size
    assert left == 0
    # Tiny 32x32 passes are short: the fixed cost of a pass matters, so bigger was tried
    # (unless the machine was so loaded that even these passes were long).
    if ae.pass_times[key][1][1] < cpu.LONG_PASS_SECONDS:
        assert max(size for size, _ in seen) >= 2
    assert sum(passes for passes, _best in ae.pass_times[key].values()) == len(seen)


def test_a_fixed_cpu_batch_size_and_the_memory_plan(settings):
    images = pictures([(32, 32)] * 5)
    use(settings, CPU_BATCH_SIZE=2)
    ae = load_autoencoder("default")
    with watch(ae.model.encoder) as encodes:
        latents = encode_images(ae, images, max_batch=16)
    items = [(z, 32, 32) for z in latents]
    with watch(ae.model.decoder) as decodes:
        assert all(o.ok for o in decode_outcomes(ae, items, max_batch=8))
    assert [s[0] for s in encodes] == [2, 2, 1]
    assert [s[0] for s in decodes] == [2, 2, 1]  # decoding follows the same rule
    clear_cache()
    use(settings, CPU_BATCH_SIZE=None)  # the memory plan, as on a GPU
    ae = load_autoencoder("default")
    with watch(ae.model.encoder) as encodes:
        encode_images(ae, images, max_batch=16)
    assert [s[0] for s in encodes] == [5]


def test_on_a_cpu_each_batch_is_handed_back_before_the_next_is_computed():
    """A CPU pass is done when it returns: computing the next one first would only delay it."""
    ae = load_autoencoder("default")
    events: list[str] = []
    with watch(ae.model.encoder, fault=lambda x: events.append(f"launch {x.shape[0]}")):
        for done in iter_encode(ae, pictures([(32, 32)] * 5), max_batch=2):
            events.append(f"results {[i for i, _o in done]}")
    assert events == [
        "launch 2",
        "results [0, 1]",
        "launch 2",
        "results [2, 3]",
        "launch 1",
        "results [4]",
    ]


def test_threads_torch_against_the_pixel_pool(settings):
    before = torch.get_num_threads()
    try:
        use(settings, CPU_THREADS=1)
        encode_images(load_autoencoder("default"), pictures([(32, 32)]))
        assert torch.get_num_threads() == 1
        # Beside a CPU model the pixel pool gets the cores torch leaves, at least one.
        assert cpu.pixel_threads(4, on_cpu=True) == max(1, min(4, cpu.cores() - 1))
        assert cpu.pixel_threads(4, on_cpu=False) == 4
        use(settings, CPU_THREADS=None)
        assert cpu.pixel_threads(4, on_cpu=True) == max(1, min(4, cpu.cores() - 1))
    finally:
        torch.set_num_threads(before)
    assert cpu.pixel_threads(4, on_cpu=True) == max(1, min(4, cpu.cores() - before))


@pytest.mark.gpu
def test_a_gpu_keeps_the_memory_plan(settings, tiny_vae_dir):
    configure(settings, tiny_vae_dir, top={"CPU_BATCH_SIZE": "auto"}, DEVICE="cuda")
    ae = load_autoencoder("default")
    with watch(ae.model.encoder) as shapes:
        encode_many(ae, pictures([(32, 32)] * 5), max_batch=16)
    assert [s[0] for s in shapes] == [5]


# --- the worker: first picture, rows arriving, stale messages ----------------------------------


def fill_queries(captured) -> list[str]:
    return [q["sql"] for q in captured if "SKIP LOCKED" in q["sql"]]


@requires_postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("plan", ["auto", None])
def test_the_first_picture_on_an_idle_worker_does_not_wait(settings, plan):
    use(settings, CPU_BATCH_SIZE=plan, FILL_WAIT_SECONDS=30)
    (photo,) = staged(1)
    load_autoencoder("default")  # a warm worker
    start = time.monotonic()
    with CaptureQueriesContext(connection) as queries:
        report = encode_rows(LABEL, "image", pointers([photo]))
    assert time.monotonic() - start < 30
    assert report.ready == 1 and report.filled == 0
    assert len(fill_queries(queries)) == 1  # the claim's own fill, never a second claim


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_cpu_worker_does_not_wait_for_rows_it_would_not_batch(settings):
    """Rows arriving, but the CPU plan's first pass takes one picture: no reason to wait."""
    use(settings, CPU_BATCH_SIZE="auto", FILL_WAIT_SECONDS=30)
    photos = staged(3)
    start = time.monotonic()
    report = encode_rows(LABEL, "image", pointers(photos[:1]))
    assert time.monotonic() - start < 30
    assert report.ready == 3 and report.filled == 2


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_rows_arriving_make_the_worker_wait_once_and_claim_again(settings):
    """The claim filled some rows but fewer than its first pass takes: it waits
    FILL_WAIT_SECONDS, once, and the rows saved meanwhile join the same first pass."""
    use(settings, CPU_BATCH_SIZE=None, FILL_WAIT_SECONDS=3.0, ENCODE_BATCH_SIZE=8)
    first = staged(2)
    ae = load_autoencoder("default")
    result = {}

    def worker():
        try:
            result["report"] = encode_rows(LABEL, "image", pointers(first[:1]))
        finally:
            connection.close()

    with watch(ae.model.encoder) as shapes:
        thread = threading.Thread(target=worker)
        thread.start()
        deadline = time.monotonic() + 30
        while not Photo.objects.filter(pk=first[1].pk, image_state="encoding").exists():
            assert time.monotonic() < deadline, "the worker never claimed"
            time.sleep(0.01)
        later = staged(3, seed=20)  # saved while the worker waits
        thread.join(60)
    assert not thread.is_alive()
    assert [s[0] for s in shapes] == [5]  # all five in the first pass
    assert result["report"].ready == 5 and result["report"].filled == 4
    assert set(Photo.objects.values_list("image_state", flat=True)) == {"ready"}
    assert len(later) == 3


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_message_whose_row_was_taken_costs_its_claim_and_nothing_else(settings):
    """No model, no thread, no blob read: one transaction with an UPDATE that takes nothing and
    the fill's SELECT (the SELECT of the claimed rows' columns is skipped)."""
    (photo,) = staged(1)
    (taken,) = encoding.claim_batch(LABEL, "image", pointers([photo]))  # another worker's
    clear_cache()
    args = [LABEL, photo.pk, "image", str(photo.image_token)]
    with CaptureQueriesContext(connection) as queries:
        answer = worker_tasks.encode.apply(args=args).get()
    assert answer == worker_tasks.NOTHING_TO_DO
    sql = [q["sql"] for q in queries.captured_queries]
    assert [s.split()[0] for s in sql] == ["BEGIN", "UPDATE", "SELECT", "COMMIT"], sql
    assert "SKIP LOCKED" in sql[2]  # the fill, which found nothing else pending
    assert not [s for s in sql if "image_staged" in s.split(" FROM ")[0]]  # no blob selected
    assert not [t for t in threading.enumerate() if t.name.startswith("latentstore-db")]
    assert not autoencoders._cache  # no model was loaded for it
    photo.refresh_from_db()
    assert photo.image_state == "encoding" and taken.token == str(photo.image_token)


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_run_times_its_host_stages(settings):
    photos = staged(3)
    report = encode_rows(LABEL, "image", pointers(photos))
    assert report.ready == 3
    stages = {"claim", "decode", "stack", "forward", "unpack", "pack", "write"}
    assert stages <= set(report.seconds), report.seconds
    assert all(report.seconds[s] > 0 for s in stages)


def test_the_cpu_settings_are_checked(settings):
    from django.core import checks

    def ids(**top) -> set[str]:
        use(settings, **top)
        return {m.id for m in checks.run_checks(tags=["latentstore"])}

    for good in ("auto", None, 3):
        assert "latentstore.E058" not in ids(CPU_BATCH_SIZE=good, CPU_THREADS=None)
    assert "latentstore.E058" in ids(CPU_BATCH_SIZE="fast")
    assert "latentstore.E058" in ids(CPU_BATCH_SIZE=0)
    assert "latentstore.E058" in ids(CPU_BATCH_SIZE="auto", CPU_THREADS=0)
    assert "latentstore.E057" in ids(CPU_THREADS=2, FILL_WAIT_SECONDS=-1)
    assert "latentstore.E057" not in ids(FILL_WAIT_SECONDS=0)
