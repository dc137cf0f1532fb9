"""End-to-end: ``streamlit run app/Home.py`` driven by Playwright in headless Chromium.

One Streamlit server (on the tiny checkpoint of ``test_app.py``) and one Chromium serve the whole module;
each test opens its own tabs, each a Streamlit session of its own. The page helpers live in
``flowcore.release.screenshots`` (``flowcore release screenshots`` takes the README's screenshots with them), so
that step is tested too; the server is this environment's ``flowcore app``, as a user starts it.

Needs the ``playwright`` Python package and Debian's Chromium at ``/usr/bin/chromium`` (never a browser
downloaded by ``playwright install``); the tests skip without them. With ``FLOWCORE_SCREENSHOTS=<folder>``,
``test_every_page_after_an_upload`` saves a full-page ``<folder>/<page>.png`` of every page.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flowcore.release import screenshots as shots

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TIMEOUT = 90_000  # ms; the machine is shared with training runs
N_SESSIONS = 4
# The app's preprocessing defaults (state.preprocessing_options: the sidebar's "Invert" and "Fit" radios).
INVERT, FIT = "auto", "crop"


@dataclass(frozen=True)
class App:
    url: str
    checkpoint: Path  # the tiny fashion_realnvp checkpoint the app shows by default


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    if not shots.CHROMIUM.exists():
        pytest.skip(f"{shots.CHROMIUM} not found (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    pytest.importorskip("streamlit")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_app import make_tiny_setup

    root = tmp_path_factory.mktemp("flowcore_browser")
    ckpts, data = make_tiny_setup(root)
    add_feature_flow(ckpts, data, root / "cache")
    env = {"FLOWCORE_CHECKPOINTS": str(ckpts), "FLOWCORE_DATA_DIR": str(data), "FLOWCORE_DEFAULT_CHECKPOINT": None,
           "FLOWCORE_CACHE": str(root / "cache"), "FLOWCORE_TRAIN_MINUTES_CAP": "0.4"}
    env["OMP_NUM_THREADS"] = "1"  # like conftest.py: on a shared machine one torch thread is much faster here
    with shots.serve(env, log=root / "streamlit.log") as url:
        yield App(url, ckpts / "fashion_realnvp")


def add_feature_flow(ckpts: Path, data: Path, cache: Path) -> None:
    """``rgb_embeddings``: a small flow on the real extractor's features of the tiny RGB set (its weights are
    random, its reference statistics real), when the embeddings extra is installed."""
    try:
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        return
    import flowcore
    from flowcore.data import embeddings
    from flowcore.ood.evaluate import evaluate
    from flowcore.ood.vectors import dataset_features

    rgb = f"npz:{data / 'rgb.npz'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWCORE_CACHE", str(cache))
        flow = flowcore.build({"arch": "realnvp_tabular", "dim": embeddings.FEATURE_DIM, "hidden": 8, "blocks": 1,
                               "couplings": 2})
        flow.standardize.fit(torch.from_numpy(dataset_features(rgb, "train")))
        flowcore.save(flow, ckpts / "rgb_embeddings", name="rgb_embeddings", dataset=rgb,
                      features=embeddings.EXTRACTOR, input_shape=[3, 32, 32], ood=["mnist"])
        evaluate(ckpts / "rgb_embeddings", data_dir=str(data), ood=[f"npz:{data / 'mnist.npz'}"], train_subset=16)


@pytest.fixture(scope="module")
def browser(app: App) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    p = sync_playwright().start()
    try:
        b = shots.launch(p)
        try:
            yield b
        finally:
            b.close()
    finally:
        p.stop()


@pytest.fixture(scope="module")
def context(browser: Any) -> Iterator[Any]:
    """One browser context for the module: its HTTP and code caches make each new tab load faster. Every tab
    is a Streamlit session of its own (a session is one websocket; nothing is shared through cookies)."""
    ctx = browser.new_context(viewport=shots.VIEWPORT)
    ctx.set_default_timeout(TIMEOUT)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def new_page(context: Any) -> Iterator[Any]:
    """``new_page()``: a new tab, so a new Streamlit session; closed after the test."""
    pages = []

    def make() -> Any:
        pages.append(context.new_page())
        return pages[-1]

    yield make
    for page in pages:
        page.close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A real photo (scikit-image's, else a generated one) and four generated ones, as JPEG files."""
    folder = tmp_path_factory.mktemp("photos")
    name, first = shots.real_photo()
    images = [first] + [shots.synthetic_photo(seed, (320 + 32 * seed, 240)) for seed in range(1, N_SESSIONS + 1)]
    paths = []
    for i, img in enumerate(images):
        path = folder / (f"{name}.jpg" if i == 0 else f"scene{i}.jpg")
        img.save(path, quality=90)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- helpers


def expected_score(checkpoint: Path, path: Path) -> tuple[float, float]:
    """(log-likelihood in nats, bpd) of an image file as the app computes it, computed here with flowcore."""
    import flowcore
    from flowcore.data.images import decode_image, preprocess
    from flowcore.ood.scores import compute_scores

    cfg = json.loads((checkpoint / "config.json").read_text())
    ref = cfg.get("reference") or {}
    array = preprocess(decode_image(path.read_bytes()), tuple(cfg["model"]["image_shape"]), invert=INVERT, fit=FIT)
    model = flowcore.load(checkpoint)
    out = compute_scores(
        model, array.array[None], None, None, n_draws=int(ref.get("n_draws", 1)), seed=int(ref.get("seed", 0))
    )
    return float(out["likelihood"][0]), float(out["bpd"][0])


def shown_score(page: Any) -> tuple[float, float]:
    """(log-likelihood, bits/dim) of the Score page's metrics."""
    m = shots.metrics(page)
    return float(m["log-likelihood (nats)"].replace(",", "")), float(m["bits/dim"])


def plotly_traces(page: Any, key: str) -> list[dict[str, Any]]:
    """The drawn traces (type, name, hovertemplate, x, y, z; decoded) of the plotly chart with Streamlit key ``key``."""
    return page.evaluate(
        """key => {
             const plain = v => ArrayBuffer.isView(v) ? Array.from(v) : Array.isArray(v) ? v.map(plain) : v ?? null;
             return document.querySelector(`.st-key-${key} .js-plotly-plot`)._fullData.map(d => ({
               type: d.type, name: d.name || '', hover: d.hovertemplate || '',
               x: plain(d.x), y: plain(d.y), z: plain(d.z)}));
           }""",
        key,
    )


# ------------------------------------------------------------------------------------------------ tests


def test_photo_upload_shows_score_and_histogram(app: App, new_page: Any, photos: list[Path]) -> None:
    from playwright.sync_api import expect

    page = new_page()
    shots.open_app(page, app.url)
    sidebar = page.locator('[data-testid="stSidebar"]')
    expect(sidebar.get_by_role("combobox", name="Model")).to_have_value(re.compile("fashion_realnvp"), timeout=TIMEOUT)
    assert "Add images in the sidebar" in shots.main_text(page)

    photo = photos[0]
    shots.upload(page, [photo])
    page.get_by_text("what the model sees").wait_for()
    shots.check_page(page)
    text = shots.main_text(page)
    assert photo.name in text and "bits/dim" in text
    m = shots.metrics(page)
    assert m["verdict at 5% FPR (likelihood)"] in ("OOD", "in-distribution"), m
    assert re.fullmatch(r"\d+\.\d\d %", m["percentile"]), m  # the table's two decimals
    ll, bpd = shown_score(page)
    want_ll, want_bpd = expected_score(app.checkpoint, photo)
    assert bpd == pytest.approx(want_bpd, abs=6e-5) and ll == pytest.approx(want_ll, abs=0.06)

    traces = plotly_traces(page, "hist_likelihood")
    hists = [t["name"].split(" ")[0] for t in traces if t["type"] == "histogram"]
    assert hists == ["train", "test", "mnist"], traces
    (line,) = [t for t in traces if t["type"] == "scatter"]
    assert line["name"] == photo.name and line["x"] == pytest.approx([want_bpd, want_bpd], abs=1e-6)


def test_receptive_field_click_updates_jacobian(app: App, new_page: Any) -> None:
    import flowcore
    from flowcore.data.datasets import load_images

    page = new_page()
    shots.open_app(page, f"{app.url}/receptive_field")
    page.locator('[data-testid="stMain"] h1', has_text="Receptive field").wait_for()
    caption = page.get_by_text(re_latent(0, 14, 14))
    caption.wait_for()
    shots.check_page(page)
    figure = page.locator(".st-key-rf_fig")
    before_png = figure.screenshot()
    before = jacobian_trace(page)

    row, col = 3, 22
    x, y = page.evaluate(
        """([row, col]) => {
             const el = document.querySelector('.st-key-rf_pick .js-plotly-plot');
             const L = el._fullLayout, r = el.getBoundingClientRect();
             return [r.left + L.xaxis._offset + L.xaxis.d2p(col), r.top + L.yaxis._offset + L.yaxis.d2p(row)];
           }""",
        [row, col],
    )
    page.mouse.move(x, y)
    with shots.rerun(page, TIMEOUT):
        page.mouse.click(x, y)
    page.get_by_text(re_latent(0, row, col)).wait_for()
    shots.wait_idle(page, TIMEOUT)
    shots.check_page(page)
    assert page.locator(".st-key-rf_h input").input_value() == str(row)
    assert page.locator(".st-key-rf_w input").input_value() == str(col)
    picked = [t for t in plotly_traces(page, "rf_pick") if t["name"] == "picked"]
    assert [(p["x"], p["y"]) for p in picked] == [([col], [row])]
    markers = [(t["x"], t["y"]) for t in plotly_traces(page, "rf_fig") if t["type"] == "scatter"]
    assert markers and all(m == ([col], [row]) for m in markers), markers

    after = jacobian_trace(page)
    assert not np.allclose(before, after), "the Jacobian heatmap did not change"
    cfg = json.loads((app.checkpoint / "config.json").read_text())
    shape = tuple(cfg["model"]["image_shape"])
    image = load_images(str(cfg["dataset"]), "test", image_shape=shape)[0]  # no input: the first test image
    model = flowcore.load(app.checkpoint)
    for (r, c), shown in (((14, 14), before), ((row, col), after)):
        want = np.abs(flowcore.jacobian_map(model, image, (0, r, c))).max(axis=0)
        np.testing.assert_allclose(shown, want, rtol=1e-3, atol=1e-6 * want.max())
    assert figure.screenshot() != before_png


def re_latent(c: int, h: int, w: int) -> re.Pattern[str]:
    return re.compile(re.escape(f"latent (channel {c}, row {h}, column {w})"))


def jacobian_trace(page: Any) -> np.ndarray:
    """The |dz_i/dx| heatmap of the receptive-field figure."""
    (trace,) = [t for t in plotly_traces(page, "rf_fig") if t["type"] == "heatmap" and "|dz_i / dx|" in t["hover"]]
    return np.asarray(trace["z"], dtype=np.float64)


def test_corrupt_upload_shows_a_clear_error(app: App, new_page: Any, photos: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "corrupt.png"
    junk.write_bytes(b"this is not an image at all " * 40)
    truncated = tmp_path / "truncated.jpg"
    data = photos[1].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    page = new_page()
    shots.open_app(page, app.url)
    shots.upload(page, [junk, truncated])
    errors = page.locator('[data-testid="stAlertContentError"]')
    errors.nth(1).wait_for()
    shown = errors.all_inner_texts()
    assert len(shown) == 2, shown
    assert any(e.startswith("corrupt.png:") and "not a PNG, JPEG" in e for e in shown), shown
    assert any(e.startswith("truncated.jpg:") and "truncated or corrupt JPEG" in e for e in shown), shown
    assert "Traceback" not in page.content()
    assert page.locator('[data-testid="stException"]').count() == 0
    text = shots.main_text(page)
    assert "Score" in text and "Add images in the sidebar" in text  # the page still works, nothing scored
    assert not shots.metrics(page)


def test_four_concurrent_sessions_get_their_own_scores(app: App, new_page: Any, photos: list[Path]) -> None:
    photos = photos[1:]  # images no other test scores: every session computes its own
    assert len(photos) == N_SESSIONS
    want = {p.name: expected_score(app.checkpoint, p) for p in photos}
    bpds = sorted(b for _, b in want.values())
    # the page shows bits/dim to 4 decimals: scores 3e-4 apart are told apart there
    assert min(np.diff(bpds)) > 3e-4, f"the test images must score apart to tell sessions apart: {want}"

    pages = [new_page() for _ in photos]
    for page in pages:  # start on the light Guide page (a tab's first load is the costly part here)
        page.goto(f"{app.url}/guide")  # returns on the load event: the sessions start at once
    for page in pages:
        page.locator('[data-testid="stMain"] h1', has_text="Guide").wait_for()
        shots.wait_idle(page, TIMEOUT)
    for page, photo in zip(pages, photos, strict=True):
        shots.upload(page, [photo])
    for page in pages:  # returns at once: the four sessions score their image concurrently
        page.locator('[data-testid="stSidebarNav"] a[href$="/"]').click()
    for page, photo in zip(pages, photos, strict=True):
        page.locator('[data-testid="stMain"] h3', has_text=photo.name).wait_for()
        shots.wait_idle(page, TIMEOUT)
    for page, photo in zip(pages, photos, strict=True):  # again once all are done: nothing was overwritten
        shots.check_page(page)
        ll, bpd = shown_score(page)
        want_ll, want_bpd = want[photo.name]
        assert bpd == pytest.approx(want_bpd, abs=6e-5), (photo.name, bpd, want)
        assert ll == pytest.approx(want_ll, abs=0.06), (photo.name, ll, want)
        assert shots.uploaded_names(page) == [photo.name]
        text = shots.main_text(page)
        assert photo.name in text
        assert not [other.name for other in photos if other != photo and other.name in text]
        line = [t["name"] for t in plotly_traces(page, "hist_likelihood") if t["type"] == "scatter"]
        assert line == [photo.name]


def test_every_page_after_an_upload(app: App, new_page: Any, photos: list[Path]) -> None:
    page = new_page()
    shots.open_app(page, app.url)
    shots.upload(page, [photos[0]])
    folder = os.environ.get("FLOWCORE_SCREENSHOTS")
    visits = shots.visit_every_page(page, Path(folder) if folder else None, TIMEOUT)
    assert list(visits) == [s.name for s in shots.PAGES]
    for spec in shots.PAGES:
        assert spec.title in visits[spec.name].text
        assert visits[spec.name].charts >= spec.charts, (spec.name, visits[spec.name].charts)
    assert photos[0].name in visits["score"].text and photos[0].name in visits["latents"].text
    assert "Kirichenko" in visits["guide"].text
    if folder:
        for spec in shots.PAGES:
            assert (Path(folder) / f"{spec.name}.png").stat().st_size > 10_000


def test_features_page_gives_a_photo_both_verdicts(app: App, new_page: Any, photos: list[Path]) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    page = new_page()
    shots.open_app(page, app.url)
    shots.upload(page, photos[:1])
    shots.go_to(page, next(s for s in shots.PAGES if s.name == "features"))
    shots.check_page(page)
    text = shots.main_text(page)
    assert f"{photos[0].name}: the flow on features says" in text, text[:2000]
    assert "the pixel flow rgb_realnvp says" in text, text[:2000]


def test_a_fresh_set_up_without_data_works_from_the_bundled_examples(app: App, browser: Any, tmp_path: Path) -> None:
    """What the README's app command gives (the shipped checkpoints, no FLOWCORE_DATA_DIR): the gallery offers the
    bundled examples, adding them gives a score, and the tour and every page open without an error."""
    env = {"FLOWCORE_CHECKPOINTS": None, "FLOWCORE_DATA_DIR": None, "FLOWCORE_DEFAULT_CHECKPOINT": None,
           "FLOWCORE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    with shots.serve(env, log=tmp_path / "streamlit.log") as url:
        ctx = browser.new_context(viewport={"width": 1024, "height": 768})
        ctx.set_default_timeout(TIMEOUT)
        try:
            page = ctx.new_page()
            shots.open_app(page, url)
            shots.go_to(page, next(s for s in shots.PAGES if s.name == "inputs"))
            page.get_by_role("tab", name="Gallery").click()
            page.get_by_text("bundled examples").first.wait_for()
            with shots.rerun(page, TIMEOUT):
                page.locator('[data-testid="stMain"] button', has_text="Add these").first.click()
            assert_verdict_then_every_page(page, "fashion_mnist #0")
        finally:
            ctx.close()


def assert_verdict_then_every_page(page: Any, expected_text: str) -> None:
    """The Score page gives a likelihood verdict and shows ``expected_text``; then every page opens cleanly."""
    shots.go_to(page, next(s for s in shots.PAGES if s.name == "score"), TIMEOUT)
    shots.check_page(page)
    m = shots.metrics(page)
    assert m["verdict at 5% FPR (likelihood)"] in ("OOD", "in-distribution"), m
    assert expected_text in shots.main_text(page)
    visits = shots.visit_every_page(page, None, TIMEOUT)
    assert list(visits) == [s.name for s in shots.PAGES]


def blob_zip(folder: Path, n: int, noise: bool = False, seed: int = 0) -> Path:
    """A zip of ``n`` 28x28 PNGs in a subfolder: bright blobs on black, or uniform noise."""
    import io
    import zipfile

    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    path = folder / ("noise.zip" if noise else f"blobs{seed}.zip")
    with zipfile.ZipFile(path, "w") as z:
        for i in range(n):
            if noise:
                a = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            else:
                cy, cx = rng.uniform(9, 19, 2)
                a = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18)).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            z.writestr(f"set/{i}.png", buf.getvalue())
    return path


def start_own_training(page: Any, url: str, name: str, images: Path, ood: Path | None) -> None:
    from playwright.sync_api import expect

    shots.open_app(page, url.rstrip("/") + "/train_own")
    main = page.locator('[data-testid="stMain"]')
    inputs = main.locator('input[type="file"]')
    chips = main.locator(':is([data-testid="stFileChipName"], [data-testid="stFileUploaderFileName"])')
    inputs.nth(0).set_input_files(str(images))
    chips.filter(has_text=images.stem).first.wait_for(timeout=TIMEOUT)
    if ood is not None:
        inputs.nth(1).set_input_files(str(ood))
        chips.filter(has_text=ood.stem).first.wait_for(timeout=TIMEOUT)
    # The chip appears as soon as a file is chosen; its spinner stays until the server holds the bytes. A form sent
    # before then carries no files (seen on a loaded CI machine), so wait for every spinner to go.
    expect(main.locator('[data-testid="stFileChipIconSpinner"]')).to_have_count(0, timeout=TIMEOUT)
    main.get_by_role("textbox", name="Name of your model").fill(name)
    main.get_by_text("grayscale", exact=True).click()
    main.get_by_role("button", name="Start training").click()


def test_train_own_page_trains_live_queues_a_second_session_and_opens_the_model(
    app: App, new_page: Any, tmp_path: Path
) -> None:
    """The page in Chromium: a zip upload, the quick preset (capped by FLOWCORE_TRAIN_MINUTES_CAP on this server),
    progress seen, the live histogram redrawn for at least two epochs, a second tab queued behind it and told so,
    then the model opened in the picker and scored on the Score page."""
    from playwright.sync_api import expect

    blobs, noise = blob_zip(tmp_path, 60), blob_zip(tmp_path, 25, noise=True)
    page = new_page()
    start_own_training(page, app.url, "browser_blobs", blobs, noise)
    main = page.locator('[data-testid="stMain"]')
    expect(main.locator('[data-testid="stProgress"]')).to_be_visible(timeout=TIMEOUT)
    second = new_page()
    start_own_training(second, app.url, "browser_second", blob_zip(tmp_path, 55, seed=1), None)
    expect(second.locator('[data-testid="stMain"]')).to_contain_text("1 ahead of yours", timeout=TIMEOUT)
    seen = set()
    epoch_text = re.compile(r"after epoch (\d+)")
    for _ in range(240):  # the page redraws itself every 2 s: collect the epochs its live histogram showed
        m = epoch_text.search(shots.main_text(page))
        if m:
            seen.add(int(m.group(1)))
        if "is in your zoo" in shots.main_text(page):
            break
        page.wait_for_timeout(250)
    assert len(seen) >= 2, seen
    expect(main).to_contain_text("is in your zoo", timeout=TIMEOUT)
    shots.wait_idle(page, TIMEOUT)
    page.locator(".st-key-own_histogram .js-plotly-plot").wait_for(timeout=TIMEOUT)
    hists = [t["name"] for t in plotly_traces(page, "own_histogram") if t["type"] == "histogram"]
    assert [h.split(" ")[0] for h in hists] == ["test", "ood"], hists  # held-out and the OOD set
    main.get_by_role("button", name="Open it in the Model picker").click()
    sidebar = page.locator('[data-testid="stSidebar"]')
    expect(sidebar.get_by_role("combobox", name="Model")).to_have_value(re.compile("browser_blobs"), timeout=TIMEOUT)
    main.get_by_role("link", name="Score page").click()
    page.get_by_role("heading", name="Score").first.wait_for(timeout=TIMEOUT)
    shots.check_page(page)
    # the second tab's job got the slot once the first ended; cancel it there
    expect(second.locator('[data-testid="stMain"]')).to_contain_text("running", timeout=TIMEOUT)
    second.locator('[data-testid="stMain"]').get_by_role("button", name="Cancel").click()
    expect(second.locator('[data-testid="stMain"]')).to_contain_text(re.compile("cancelled|is in your zoo"),
                                                                     timeout=TIMEOUT)


def test_the_installed_wheels_dashboard_works_on_every_page_after_an_upload(browser: Any, tmp_path: Path) -> None:
    """The dashboard as a user of the wheel meets it: the wheel installed into a fresh venv and started by its own
    ``flowcore app`` outside the checkout, with no data folder and no FLOWCORE_* setting (so only what the wheel
    carries: the default model, the background model it names, the bundled examples). After one upload the Score
    page gives a verdict with the likelihood-ratio score and every page, tour included, opens without an error."""
    from conftest import install_built_wheel
    from PIL import Image

    wheel = install_built_wheel(tmp_path, ROOT)
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FLOWCORE_")}
    env.update(wheel.env)
    env["OMP_NUM_THREADS"] = "1"
    shirt = tmp_path / "shirt.png"
    Image.fromarray((np.random.default_rng(1).random((28, 28)) * 255).astype(np.uint8)).save(shirt)
    with shots.serve(env, log=tmp_path / "streamlit.log", command=[str(wheel.flowcore), "app"],
                     cwd=wheel.work) as url:
        ctx = browser.new_context(viewport=shots.VIEWPORT)
        ctx.set_default_timeout(TIMEOUT)
        try:
            page = ctx.new_page()
            shots.open_app(page, url)
            shots.upload(page, [shirt], TIMEOUT)
            assert_verdict_then_every_page(page, "likelihood_ratio")
        finally:
            ctx.close()
