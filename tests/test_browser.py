"""The admin in a real headless Chromium: log in, thumbnails, upload, watch it become ready.

The browser is Debian's ``chromium`` and ``chromium-driver``. When they are missing and the
test runs as root with apt-get available, the session installs them (this is how CI gets them:
the README's test command needs nothing else); otherwise the test skips, saying why. A
screenshot of the change list is written to ``var/test-artifacts/``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from project.models import Photo
from tests.faults import wait_until
from tests.rows import fake_blob, make_rows
from tests.test_field import encode_now
from tests.tiny import image_bytes, make_test_image

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "var" / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these it hangs on a closed network, phoning home.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,860",
)


def _install_chromium() -> str | None:
    """Install chromium + chromium-driver with apt; None when done, else why not."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return None
    if os.geteuid() != 0:
        return "needs root to run apt-get install chromium chromium-driver"
    if shutil.which("apt-get") is None:
        return "apt-get is not available (not a Debian-like system)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ("-o", "DPkg::Lock::Timeout=600")
    # Two test runs on one machine must not run apt at the same time.
    with open(os.path.join(tempfile.gettempdir(), "latentstore-chromium-apt.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if CHROMIUM.exists() and CHROMEDRIVER.exists():
            return None
        for command in (
            ["apt-get", *wait, "update", "-q"],
            [
                "apt-get",
                *wait,
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "chromium",
                "chromium-driver",
            ],
        ):
            try:
                done = subprocess.run(
                    command, env=env, capture_output=True, text=True, timeout=1200
                )
            except subprocess.TimeoutExpired:
                return f"{' '.join(command)} timed out"
            if done.returncode != 0:
                return f"{' '.join(command)} failed: {(done.stderr or done.stdout)[-500:]}"
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return "apt-get installed chromium but /usr/bin/chromium or chromedriver is missing"
    return None


@pytest.fixture(scope="session")
def chromium_installed():
    why_not = _install_chromium()
    if why_not:
        pytest.skip(f"Chromium is not available for the browser test: {why_not}")


@pytest.fixture
def browser(chromium_installed, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager go online
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


IMAGES_LOADED = """
return Array.from(document.querySelectorAll('.latent-thumb img')).map(
    img => [img.closest('tr').querySelector('.field-title').textContent.trim(),
            img.dataset.latentState, img.complete, img.naturalWidth]);
"""


def thumbnails(browser) -> dict[str, tuple[str, bool, int]]:
    return {
        title: (state, done, width)
        for title, state, done, width in browser.execute_script(IMAGES_LOADED)
    }


def test_admin_in_a_real_browser(browser, live_server, celery_worker, tmp_path):
    from selenium.webdriver.common.by import By

    get_user_model().objects.create_superuser("admin", "admin@example.com", "pw")
    for i in range(3):
        photo = Photo.objects.create(
            title=f"ready {i}", image=image_bytes(make_test_image(96, 64, seed=i), "PNG")
        )
        encode_now(photo)
    (pending,) = make_rows(1, "pending")
    (failed,) = make_rows(1, "failed")
    (corrupt,) = make_rows(1)
    Photo.objects.filter(pk=pending).update(title="pending")
    Photo.objects.filter(pk=failed).update(title="failed")
    Photo.objects.filter(pk=corrupt).update(title="corrupt", image=fake_blob()[:-4])

    browser.get(f"{live_server.url}/admin/login/?next=/admin/demo/photo/")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys("pw")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_until(lambda: "/admin/demo/photo/" in browser.current_url, what="the change list")

    # The URL changes before the new page's DOM is there: wait for its rows, not the address.
    rows = wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr"),
        what="the change list's rows",
    )
    assert len(rows) == 6
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result_list tbody .latent-thumb")) == 6
    shown = wait_until(
        lambda: (t := thumbnails(browser)) and all(done for _s, done, _w in t.values()) and t,
        what="every thumbnail to load",
    )
    assert set(shown) == {"ready 0", "ready 1", "ready 2", "pending", "failed", "corrupt"}
    for title in ("ready 0", "ready 1", "ready 2"):
        assert shown[title][0] == "ready" and shown[title][2] > 0, (title, shown[title])
    assert shown["pending"][0] == "pending" and shown["failed"][0] == "failed"
    assert shown["corrupt"][2] > 0, "a corrupt blob shows the error picture, not a broken image"
    assert "Server Error" not in browser.page_source

    upload = tmp_path / "new.png"
    upload.write_bytes(image_bytes(make_test_image(120, 80, seed=7), "PNG"))
    browser.get(f"{live_server.url}/admin/demo/photo/add/")
    browser.find_element(By.NAME, "title").send_keys("uploaded")
    browser.find_element(By.NAME, "image").send_keys(str(upload))
    browser.find_element(By.NAME, "_save").click()
    wait_until(lambda: browser.current_url.endswith("/admin/demo/photo/"), what="the save")
    assert Photo.objects.get(title="uploaded").image.width == 120

    def uploaded_ready():
        browser.refresh()
        state = thumbnails(browser).get("uploaded")
        return state if state and state[0] == "ready" else None

    wait_until(uploaded_ready, what="the uploaded image to become ready")
    shown = wait_until(
        lambda: (t := thumbnails(browser)) and t["uploaded"][1] and t,
        what="the new thumbnail to load",
    )
    assert shown["uploaded"][2] > 0
    badge = browser.find_element(By.CSS_SELECTOR, ".latent-badge-failed")
    assert "The image could not be read" in badge.get_attribute("title")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "admin-change-list.png"))

    browser.get(f"{live_server.url}/admin/demo/photo/{corrupt}/change/")
    assert "The stored latents are unreadable" in browser.page_source
    uploaded = Photo.objects.get(title="uploaded")
    browser.get(f"{live_server.url}/admin/demo/photo/{uploaded.pk}/change/")
    assert browser.find_element(By.CSS_SELECTOR, ".latent-badge-ready").text == "ready"
    assert browser.save_screenshot(str(ARTIFACTS / "admin-change-form.png"))


PICTURES = """
return Array.from(document.querySelectorAll('figure picture img')).map(img => ({
    title: img.alt, state: img.dataset.latentState, complete: img.complete,
    currentSrc: img.currentSrc, naturalWidth: img.naturalWidth,
    naturalHeight: img.naturalHeight, renderedWidth: img.getBoundingClientRect().width}));
"""


@pytest.mark.urls("tests.picture_page")
def test_latent_picture_in_a_real_browser(browser, live_server):
    """Chromium picks a source of the <picture> for sizes="320px" and draws it 320 px wide."""
    ready = Photo.objects.create(
        title="ready", image=image_bytes(make_test_image(400, 240, seed=3), "PNG")
    )
    encode_now(ready)
    Photo.objects.create(title="pending", image=image_bytes(make_test_image(400, 240), "PNG"))

    browser.get(f"{live_server.url}/pictures/")
    shown = wait_until(
        lambda: (
            (p := browser.execute_script(PICTURES))
            and len(p) == 2
            and all(i["complete"] and i["naturalWidth"] for i in p)
            and {i["title"]: i for i in p}
        ),
        what="both pictures to load",
    )
    picked = shown["ready"]
    assert picked["state"] == "ready"
    # Chromium reads AVIF: it takes the first <source>, and the 320w candidate for a 320 px slot
    # at device pixel ratio 1 (the candidates are 160w, 320w and the picture's own 400w).
    assert picked["currentSrc"].startswith(f"{live_server.url}/latents/p/"), picked
    assert picked["currentSrc"].endswith("/1.avif"), picked
    assert (picked["naturalWidth"], picked["naturalHeight"]) == (320, 192), picked
    assert picked["renderedWidth"] == 320, picked
    pending = shown["pending"]
    assert pending["state"] == "pending" and pending["currentSrc"].endswith("pending.svg")
    assert pending["renderedWidth"] == 320  # the same box as the ready picture's
    assert "Server Error" not in browser.page_source

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "latent-picture.png"))
