"""Screenshots of every dashboard page, taken in headless Chromium (Playwright) after uploading example images.

Usage (in a checkout)::

    flowcore release screenshots                                   # the default checkpoint
    flowcore release screenshots --checkpoint mnist_realnvp        # a name in the checkpoints folder, or a path
    flowcore release screenshots --image a.png --image b.jpg       # upload these instead of the examples

Starts ``flowcore app`` (this environment's) on a free port (the checkpoint preselected through
``FLOWCORE_DEFAULT_CHECKPOINT``), uploads the first Fashion-MNIST and the first MNIST test image (as PNG,
from ``$FLOWCORE_DATA_DIR``; a generated photo when neither is there), visits every page through the
sidebar and saves a full-page screenshot of each to ``docs/screenshots/<page>.png`` (``--out``).

Needs the ``playwright`` Python package and Debian's Chromium (``/usr/bin/chromium``, ``--chromium``);
never a browser downloaded by ``playwright install``. ``tests/test_browser.py`` drives the dashboard with
the helpers below, so they are tested against a tiny checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# the dashboard as a user starts it: this environment's `flowcore app` (a checkout's app/ when installed editable)
FLOWCORE_APP = [sys.executable, "-m", "flowcore", "app"]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}
MAX_HEIGHT = 8000  # full-page screenshots are cut here


@dataclass(frozen=True)
class PageSpec:
    """A dashboard page: screenshot name, URL path (st.Page infers it from the file name), title, min. charts."""

    name: str
    path: str
    title: str
    charts: int = 0


# Every page of the dashboard, in sidebar order. ``charts``: plotly charts it shows with an input (tiny model).
PAGES = (
    PageSpec("score", "", "Score", 1),
    PageSpec("inputs", "inputs", "Inputs", 0),
    PageSpec("compare", "compare", "Compare models", 2),
    PageSpec("perturb", "perturb", "Perturbation explorer", 2),
    PageSpec("features", "features", "What works: flows on features", 0),
    PageSpec("train_own", "train_own", "Train on your images", 0),
    PageSpec("latents", "latents", "Latents", 1),
    PageSpec("couplings", "couplings", "Coupling layers", 1),
    PageSpec("receptive_field", "receptive_field", "Receptive field", 2),
    PageSpec("resampling", "resampling", "Patch resampling", 1),
    PageSpec("samples", "samples", "Samples", 1),
    PageSpec("tour", "tour", "The paper in ten minutes", 1),
    PageSpec("guide", "guide", "Guide", 0),
)


class PageProblem(AssertionError):
    """A page showed a traceback or an error, or did not finish."""


# -------------------------------------------------------------------------------------------- images


def synthetic_photo(seed: int = 0, size: tuple[int, int] = (384, 288)) -> Image.Image:
    """A natural-looking RGB picture (sky gradient, sun, hills, a house, a tree, texture, soft focus)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    top, bottom = rng.uniform(40, 140, 3), rng.uniform(150, 250, 3)
    sky = top[None, None] + (bottom - top)[None, None] * (yy / h)[..., None]
    sky += rng.uniform(-25, 25) * (xx / w)[..., None]
    img = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    sx, sy, r = rng.uniform(0.15, 0.85) * w, rng.uniform(0.1, 0.35) * h, rng.uniform(0.05, 0.1) * w
    draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=tuple(int(v) for v in rng.integers(200, 256, 3)))
    for layer in range(3):
        base = h * (0.45 + 0.15 * layer + rng.uniform(-0.05, 0.05))
        amp, freq, phase = rng.uniform(10, 40), rng.uniform(1, 4) * np.pi / w, rng.uniform(0, 2 * np.pi)
        ridge = [(x, base + amp * np.sin(freq * x + phase)) for x in range(0, w + 8, 8)]
        colour = tuple(int(v) for v in rng.integers(20, 120, 3) // (layer + 1) + [10, 40, 10])
        draw.polygon([(0, h), *ridge, (w, h)], fill=colour)
    hx, hy, hw = rng.uniform(0.1, 0.6) * w, 0.62 * h, rng.uniform(0.15, 0.25) * w
    draw.rectangle([hx, hy, hx + hw, hy + 0.6 * hw], fill=tuple(int(v) for v in rng.integers(120, 230, 3)))
    draw.polygon([(hx - 8, hy), (hx + hw / 2, hy - 0.4 * hw), (hx + hw + 8, hy)], fill=(120, 40, 30))
    draw.rectangle([hx + 0.4 * hw, hy + 0.3 * hw, hx + 0.6 * hw, hy + 0.6 * hw], fill=(60, 40, 20))
    tx = hx + hw + rng.uniform(0.05, 0.2) * w
    draw.rectangle([tx - 5, 0.55 * h, tx + 5, 0.8 * h], fill=(70, 50, 30))
    draw.ellipse([tx - 35, 0.35 * h, tx + 35, 0.62 * h], fill=(30, int(rng.integers(90, 150)), 40))
    noisy = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float64)
    noisy += rng.normal(0, 6, noisy.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def real_photo() -> tuple[str, Image.Image]:
    """scikit-image's astronaut photo when scikit-image is installed, else :func:`synthetic_photo`."""
    try:
        from skimage import data

        return "astronaut", Image.fromarray(np.asarray(data.astronaut()))
    except Exception:  # not installed, or its data files missing
        return "photo", synthetic_photo(0)


def example_images(folder: Path) -> list[Path]:
    """The first Fashion-MNIST and MNIST test images as PNG files in ``folder`` (from ``$FLOWCORE_DATA_DIR``);
    the photo of :func:`real_photo` as JPEG when neither dataset is there."""
    from flowcore.data.datasets import DatasetNotFound, load_images

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for dataset in ("fashion_mnist", "mnist"):
        try:
            x = load_images(dataset, "test")
        except (DatasetNotFound, OSError, ValueError):
            continue
        if len(x):
            path = folder / f"{dataset}_test_0.png"
            Image.fromarray(np.squeeze(np.asarray(x[0], dtype=np.uint8))).save(path)
            out.append(path)
    if not out:
        name, img = real_photo()
        path = folder / f"{name}.jpg"
        img.save(path, quality=90)
        out.append(path)
    return out


# ---------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(env: dict[str, str | None] | None = None, log: Path | None = None, timeout: float = 90,
          command: list[str] | None = None, cwd: Path | None = None) -> Iterator[str]:
    """The dashboard (``command + ["--port", PORT]``, by default this environment's ``flowcore app``) on a free
    local port, run in ``cwd``; yields its URL. ``env``: variables to set (None: unset)."""
    environ = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    port = free_port()
    cmd = [*(command or FLOWCORE_APP), "--port", str(port)]
    if log is None:
        fd, name = tempfile.mkstemp(prefix="flowcore_streamlit_", suffix=".log")
        os.close(fd)
        log = Path(name)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        if r.read() == b"ok":
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"streamlit did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def launch(playwright: Any, chromium: Path = CHROMIUM) -> Any:
    """Headless Debian Chromium (never a downloaded browser)."""
    return playwright.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)


# -------------------------------------------------------------------------------------------- the page


WATCH_RUNS = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  window.__flowcoreRuns = 0;
  if (!window.__flowcoreObserver) {
    window.__flowcoreObserver = new MutationObserver(records => { window.__flowcoreRuns += records.length; });
    window.__flowcoreObserver.observe(app, {attributes: true, attributeFilter: ['data-test-script-state']});
  }
}"""


def wait_idle(page: Any, timeout: float = 60_000, settle_ms: int = 300) -> None:
    """Until the script run is over, no spinner is left and every plotly chart has drawn (then ``settle_ms`` more
    for plotly's last relayout, which a screenshot needs and a latency measurement does not)."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout)
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stSpinner"]') &&
                 Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"]'))
                      .every(e => e.querySelector('.js-plotly-plot .main-svg'))""",
        timeout=timeout,
    )
    if settle_ms:
        page.wait_for_timeout(settle_ms)


@contextlib.contextmanager
def rerun(page: Any, timeout: float = 90_000, settle_ms: int = 300) -> Iterator[None]:
    """Around an action that makes the app rerun: afterwards wait until a run has started and is over."""
    page.evaluate(WATCH_RUNS)
    yield
    page.wait_for_function("() => window.__flowcoreRuns > 0", timeout=timeout)
    wait_idle(page, timeout, settle_ms)


def check_page(page: Any) -> None:
    """No traceback, no exception box, no error alert on the page."""
    if "Traceback" in page.content() or page.locator('[data-testid="stException"]').count():
        raise PageProblem(f"traceback on {page.url}: {main_text(page)[:1500]}")
    errors = page.locator('[data-testid="stAlertContentError"]').all_inner_texts()
    if errors:
        raise PageProblem(f"error on {page.url}: {errors}")


def main_text(page: Any) -> str:
    return page.locator('[data-testid="stMain"]').inner_text()


def metrics(page: Any) -> dict[str, str]:
    """``{label: value}`` of the ``st.metric`` boxes in the main area."""
    out = {}
    for box in page.locator('[data-testid="stMain"] [data-testid="stMetric"]').all():
        label = box.locator('[data-testid="stMetricLabel"]').inner_text().strip()
        out[label] = box.locator('[data-testid="stMetricValue"]').inner_text().strip()
    return out


def open_app(page: Any, url: str, timeout: float = 90_000) -> None:
    """Load the dashboard (its default page, or ``url``'s page) and wait until it has run."""
    page.goto(url)
    page.locator('[data-testid="stSidebarNav"]').wait_for(timeout=timeout)
    page.locator('[data-testid="stMain"] h1').first.wait_for(timeout=timeout)
    wait_idle(page, timeout)


FILE_NAMES = '[data-testid="stSidebar"] :is([data-testid="stFileChipName"], [data-testid="stFileUploaderFileName"])'


def start_upload(page: Any, paths: list[Path]) -> None:
    """Give files to the sidebar's uploader (returns at once; see :func:`upload`)."""
    page.locator('[data-testid="stSidebar"] input[type="file"]').set_input_files([str(p) for p in paths])


def uploaded_names(page: Any) -> list[str]:
    """Names of the files in the sidebar's uploader (the full name: the chip shows a shortened one)."""
    return page.locator(FILE_NAMES).evaluate_all("els => els.map(e => e.title || e.textContent.trim())")


def upload(page: Any, paths: list[Path], timeout: float = 90_000) -> None:
    """Give files to the sidebar's uploader and wait until each is listed there and the app has rerun."""
    with rerun(page, timeout):
        start_upload(page, paths)
    page.wait_for_function(
        """([selector, names]) => {
             const have = Array.from(document.querySelectorAll(selector)).map(e => e.title || e.textContent.trim());
             return names.every(n => have.includes(n));
           }""",
        arg=[FILE_NAMES, [p.name for p in paths]],
        timeout=timeout,
    )


def go_to(page: Any, spec: PageSpec, timeout: float = 90_000, settle_ms: int = 300) -> None:
    """Switch page with the sidebar link (client-side: the session and its uploads are kept) and wait."""
    nav = page.locator('[data-testid="stSidebarNav"]')
    more = nav.locator('[data-testid="stSidebarNavViewButton"]')
    if more.count() and "more" in more.inner_text().lower():
        more.click()
    link = nav.locator(f'a[href$="/{spec.path}"]')
    if link.count() != 1:  # another URL scheme: find the link by its title
        link = nav.get_by_role("link", name=spec.title)
    with rerun(page, timeout, settle_ms):
        link.first.click()
    page.wait_for_url(lambda u: u.split("?")[0].rstrip("/").endswith(f"/{spec.path}".rstrip("/")), timeout=timeout)
    page.locator('[data-testid="stMain"] h1', has_text=spec.title).first.wait_for(timeout=timeout)
    wait_idle(page, timeout, settle_ms)


def full_page_screenshot(page: Any, path: Path) -> None:
    """The whole page: Streamlit scrolls inside ``stMain`` and the sidebar, so the viewport is grown to fit."""
    size = page.viewport_size or VIEWPORT
    height = page.evaluate(
        """() => Math.max(window.innerHeight, ...['stMain', 'stSidebarContent'].map(id => {
                 const e = document.querySelector(`[data-testid="${id}"]`); return e ? e.scrollHeight : 0; }))"""
    )
    page.set_viewport_size({"width": size["width"], "height": min(int(height), MAX_HEIGHT)})
    try:
        page.wait_for_timeout(800)  # plotly resizes
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(size)


@dataclass(frozen=True)
class Visit:
    text: str  # the main area's text
    charts: int  # plotly charts drawn


def visit_every_page(page: Any, folder: Path | None = None, timeout: float = 90_000) -> dict[str, Visit]:
    """Visit every page through the sidebar, check it and save ``folder/<page>.png``; what each page showed."""
    visits = {}
    for spec in PAGES:
        go_to(page, spec, timeout)
        check_page(page)
        charts = page.locator('[data-testid="stMain"] [data-testid="stPlotlyChart"] .js-plotly-plot').count()
        visits[spec.name] = Visit(main_text(page), charts)
        if folder is not None:
            full_page_screenshot(page, folder / f"{spec.name}.png")
    return visits


def own_training_screenshots(url: str, browser: Any, folder: Path, timeout: float = 90_000,
                             viewport: dict[str, int] | None = None) -> None:
    """The "Train on your images" page on its bundled example (MNIST digits, Fashion-MNIST as OOD; needs
    ``FLOWCORE_DATA_DIR``): ``train_own.png`` while it trains (after the third epoch), ``train_own_done.png`` when
    the model is in the zoo."""
    page = browser.new_page(viewport=viewport or VIEWPORT)
    page.set_default_timeout(timeout)
    try:
        open_app(page, url.rstrip("/") + "/train_own", timeout)
        main = page.locator('[data-testid="stMain"]')
        main.get_by_text("the example: 600 MNIST digits", exact=False).click()
        main.get_by_role("textbox", name="Name of your model").fill("my_digits")
        main.get_by_role("button", name="Start training").click()
        main.get_by_text("after epoch 3)").first.wait_for(timeout=10 * timeout)
        wait_idle(page, timeout)
        full_page_screenshot(page, folder / "train_own.png")
        main.get_by_text("is in your zoo").first.wait_for(timeout=20 * timeout)
        wait_idle(page, timeout)
        full_page_screenshot(page, folder / "train_own_done.png")
    finally:
        page.close()


# ---------------------------------------------------------------------------------------------- command


def take(checkpoint: str, out: Path, images: list[Path] | None = None, chromium: Path = CHROMIUM,
         timeout_s: float = 300, size: str | None = None, own_training: bool = False) -> str:
    """``flowcore release screenshots``: every page of ``checkpoint`` after uploading ``images`` (default: the
    first Fashion-MNIST and MNIST test images), or with ``own_training`` only the Train-on-your-images page during
    and after a training of its bundled example (capped at 2 CPU minutes, in a temporary zoo); returns what it
    wrote."""
    from playwright.sync_api import sync_playwright

    from flowcore.zoo.checkpoints import resolve

    resolve(checkpoint)  # an unknown checkpoint: its one-line CheckpointError before a browser starts
    if not chromium.exists():
        raise FileNotFoundError(f"{chromium} not found (apt-get install chromium)")
    viewport = VIEWPORT
    if size:
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--size wants WIDTHxHEIGHT, e.g. 1024x768, not {size!r}") from None
        viewport = {"width": width, "height": height}
    timeout = 1000 * timeout_s
    with tempfile.TemporaryDirectory() as tmp:
        images = images or example_images(Path(tmp))
        env = {"FLOWCORE_DEFAULT_CHECKPOINT": checkpoint}
        if own_training:
            env.update(FLOWCORE_CACHE=str(Path(tmp) / "cache"), FLOWCORE_TRAIN_MINUTES_CAP="2")
        with serve(env, log=Path(tmp) / "streamlit.log") as url, sync_playwright() as p:
            browser = launch(p, chromium)
            try:
                if own_training:
                    own_training_screenshots(url, browser, out, timeout, viewport)
                    return f"train_own.png and train_own_done.png in {out}"
                page = browser.new_page(viewport=viewport)
                page.set_default_timeout(timeout)
                open_app(page, url, timeout)
                upload(page, images, timeout)
                visit_every_page(page, out, timeout)
            finally:
                browser.close()
    return f"{len(PAGES)} screenshots of {checkpoint} with {', '.join(p.name for p in images)} in {out}"
