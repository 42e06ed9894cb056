"""The web viewer in a real browser: headless Chromium (Debian's `chromium`, WebGL through
SwiftShader) opens `blisswriter serve`'s page while the real writer writes a scan, follows
the scan's link to its default plot, and sees the plot's data grow. Screenshots of the last
run: bench/results/web_browser_1.png and _2.png (the README shows one).

Driven by Playwright's Python package with the system's Chromium (`executable_path`): no
browser is downloaded. `.ci/run` installs `chromium` where it is missing; the test is skipped,
saying why, only where it cannot be.
"""

import os
import shutil
import threading
import urllib.parse
from pathlib import Path

import pytest

from blissdata.fixtures import publish
from web_helpers import start_serve, start_writer_process
from writer_helpers import stop_process, wait_status

SHOTS = Path(__file__).resolve().parent.parent / "bench" / "results"
CHROMIUM_FLAGS = ["--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                  "--no-sandbox"]  # --no-sandbox: CI runs as root, where the sandbox refuses
SIGNAL = "/3.1/plotselect/diode"  # the ascan fixture's default plot


def chromium_path() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if not found:
        pytest.skip("no Chromium: install Debian's package (apt-get install chromium; .ci/run "
                    "does) or set CHROMIUM=/path/to/chrome")
    return found


def test_live_scan_in_browser(store, data_root, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed "
                                   "(pip install -e .[test])")
    browser_path = chromium_path()
    writer = start_writer_process(store.url, data_root, tmp_path)
    server, url = start_serve([data_root], store.url, log_path=tmp_path / "serve.log")
    master = data_root / "sample.h5"
    published = []
    producer = threading.Thread(target=lambda: published.extend(publish(
        store, "ascan", session="demo", path=str(master), npoints=100, rate=10, number=3)))
    producer.start()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=browser_path,
                                                 args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            sizes = []  # bytes of each answer for the plot's signal: its points, growing

            def on_response(response):
                query = urllib.parse.parse_qs(urllib.parse.urlparse(response.url).query)
                if "/h5grove/data" in response.url and query.get("path") == [SIGNAL]:
                    sizes.append(int(response.headers.get("content-length", 0)))

            page.on("response", on_response)
            page.goto(url)
            page.get_by_role("link", name="ascan").click(timeout=30_000)  # the running scan
            page.get_by_text("diode (counts)").first.wait_for(timeout=30_000)  # plot title
            page.wait_for_timeout(1000)
            first = sizes[-1]
            page.screenshot(path=str(SHOTS / "web_browser_1.png"))
            for _ in range(25):  # refreshed in a transition: the plot never gives way to
                page.wait_for_timeout(100)  # a "Loading" placeholder
                assert "Loading" not in page.inner_text("main")
            second = sizes[-1]
            page.screenshot(path=str(SHOTS / "web_browser_2.png"))
            text = page.inner_text("body")
            errors = page.locator(".error-banner, [class*='_error_'], [class*='detailedError']")
            assert errors.count() == 0, errors.all_inner_texts()
            for expected in (str(master), "sample.h5", "3.1", "plotselect", "diode (counts)",
                             "roby", "writing"):
                assert expected in text, (expected, text)
            assert second > first > 0, sizes  # 8 bytes a point: the plot grew

            producer.join(60)
            assert wait_status(store, published[0].key).state == "done"
            live = page.get_by_role("checkbox", name="live")
            page.wait_for_function("() => !document.querySelector('header input').checked",
                                   timeout=15_000)  # the scan ended: the refresh stops
            assert not live.is_checked()
            page.wait_for_timeout(1500)
            assert sizes[-1] == 100 * 8, sizes  # every point, after the last read
            browser.close()
    finally:
        producer.join(60)
        stop_process(server)
        stop_process(writer)
