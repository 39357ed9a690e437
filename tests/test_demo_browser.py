"""Both demos in a real headless browser (Debian's chromium driven by playwright), with every request to an
address other than this machine's blocked and recorded: type a query and see result pictures; type a prompt and
see generated pictures. Screenshots are kept in test-artifacts/ (or $INTERN25_TEST_ARTIFACTS)."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tiny_model import offline_cache  # noqa: F401  (a fixture)

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api")

from test_demo_web import painter_export, retrieval  # noqa: E402,F401  (fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's)")
ARTIFACTS = Path(os.environ.get("INTERN25_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
LOCAL = {"127.0.0.1", "localhost"}


def serve_in_thread(app):
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}/"


def wait_for_pictures(page, selector: str, count: int, timeout: float = 60) -> None:
    """Until `count` pictures match `selector`, all loaded and decoded (polled from Python: the pages' policy
    forbids the string evaluation that playwright's wait_for_function uses)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        loaded = page.locator(selector).evaluate_all("imgs => imgs.filter(i => i.complete && i.naturalWidth > 0)"
                                                     ".length")
        if loaded == count and page.locator(selector).count() == count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{selector}: {page.locator(selector).count()} pictures, not {count} loaded ones")


def browse(url: str, act, screenshot: Path) -> list[str]:
    """Opens `url` with every non-local request aborted, runs `act(page)`, keeps a screenshot; returns the blocked
    requests."""
    blocked: list[str] = []

    def route(request_route):
        host = urlparse(request_route.request.url).hostname
        if host in LOCAL or request_route.request.url.startswith(("data:", "blob:")):
            request_route.continue_()
        else:
            blocked.append(request_route.request.url)
            request_route.abort()

    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.route("**/*", route)
            page.goto(url)
            act(page)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return blocked


def check_page(app, act, screenshot: str) -> None:
    """Serves `app`, opens its page and acts on it; no request left the machine and the screenshot was kept."""
    server, thread, url = serve_in_thread(app)
    try:
        blocked = browse(url, act, ARTIFACTS / screenshot)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert blocked == [], blocked
    assert (ARTIFACTS / screenshot).stat().st_size > 1000
    print(f"screenshot: {ARTIFACTS / screenshot}")


def test_the_retrieval_page_shows_result_pictures(retrieval):  # noqa: F811
    client, index, root = retrieval
    from launch.retrieval.web import create_app


    def act(page):
        page.fill("#q", "a red circle")
        page.fill("#top", "4")
        page.click("#go")
        page.wait_for_selector(".hit img")
        wait_for_pictures(page, ".hit img", 4)
        assert "4 hits" in page.inner_text("#status")

    check_page(create_app(index, [root / "pictures", root / "videos"]), act, "retrieval_demo.png")


def test_the_text_to_image_page_shows_generated_pictures(painter_export):  # noqa: F811
    from launch.t2i_demo import create_app
    from uniperceiver import UniPerceiver


    def act(page):
        page.fill("#prompt", "a green star")
        page.fill("#steps", "3")
        page.fill("#images", "2")
        page.click("#go")
        page.wait_for_selector("img.picture", timeout=60_000)
        wait_for_pictures(page, "img.picture", 2)
        assert "2 pictures" in page.inner_text("#status")

    check_page(create_app(UniPerceiver.from_pretrained(painter_export)), act, "t2i_demo.png")
