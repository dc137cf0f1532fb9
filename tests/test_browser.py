"""End-to-end: ``streamlit run app/Home.py`` driven by Playwright in headless Chromium.

Needs the ``playwright`` Python package and Debian's Chromium at ``/usr/bin/chromium`` (never a
downloaded browser). With ``FLOWCORE_SCREENSHOTS`` set, screenshots go to ``docs/screenshots/``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = ROOT / "docs" / "screenshots"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    pytest.importorskip("streamlit")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_app import make_tiny_setup

    root = tmp_path_factory.mktemp("flowcore_browser")
    ckpts, data = make_tiny_setup(root)
    port = free_port()
    env = dict(os.environ, FLOWCORE_CHECKPOINTS=str(ckpts), FLOWCORE_DATA_DIR=str(data))
    env.pop("FLOWCORE_DEFAULT_CHECKPOINT", None)
    log = open(root / "streamlit.log", "w")
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(ROOT / "app" / "Home.py"),
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"streamlit did not start: {(root / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_dashboard_in_chromium(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    upload = tmp_path / "checkers.png"
    yy, xx = np.mgrid[:64, :48]
    Image.fromarray((255 * ((xx // 8 + yy // 8) % 2)).astype(np.uint8)).save(upload)
    screenshots = bool(os.environ.get("FLOWCORE_SCREENSHOTS"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server)
            sidebar = page.locator('[data-testid="stSidebar"]')
            sidebar.get_by_text("Model", exact=True).wait_for(timeout=60_000)
            picker = sidebar.get_by_role("combobox", name="Model")
            expect(picker).to_have_value(re.compile("fashion_realnvp"), timeout=30_000)
            page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)

            page.locator('input[type="file"]').first.set_input_files(str(upload))
            page.get_by_text("what the model sees").wait_for(timeout=60_000)
            metrics = page.locator('[data-testid="stMetric"]')
            metrics.first.wait_for(timeout=30_000)
            text = page.locator('[data-testid="stMain"]').inner_text()
            assert "checkers.png" in text and "bits/dim" in text
            assert "OOD" in text or "in-distribution" in text
            assert "Traceback" not in page.content()
            if screenshots:
                SHOTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SHOTS / "score.png"))
                for title, file in (("Latents", "latents"), ("Coupling layers", "couplings")):
                    page.get_by_role("link", name=title).click()
                    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
                    page.wait_for_timeout(1500)
                    assert "Traceback" not in page.content()
                    page.screenshot(path=str(SHOTS / f"{file}.png"))
        finally:
            browser.close()
