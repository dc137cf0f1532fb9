"""Dashboard tests: every page under Streamlit's AppTest with a tiny checkpoint, and the figure builders.

The tiny checkpoint (RealNVP, hidden 4, 1 block, 1x28x28) is built, saved and evaluated against synthetic
npz data in a temporary folder; ``FLOWCORE_CHECKPOINTS`` and ``FLOWCORE_DATA_DIR`` point there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image

from flowcore.data import images
from flowcore.flows.config import describe_architecture

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("streamlit")
pytest.importorskip("plotly")

from streamlit.testing.v1 import AppTest  # noqa: E402

from flowcore.dashboard import figures, service, state  # noqa: E402

HOME = ROOT / "app" / "Home.py"
TIMEOUT = 180  # a guard against a hung script, not a speed limit: a slow CPU shared with trainings needs minutes
TINY = {"arch": "realnvp", "image_shape": [1, 28, 28], "hidden": 4, "blocks": 1, "scales": 2}
RGB_TINY = {"arch": "realnvp", "image_shape": [3, 32, 32], "hidden": 4, "blocks": 1, "scales": 3}


# ------------------------------------------------------------------------------------------- fixtures


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_tiny_setup(root: Path) -> tuple[Path, Path]:
    """Synthetic Fashion-like / MNIST-like npz data and an evaluated tiny checkpoint ``fashion_realnvp``,
    plus a copy ``fashion_copy`` and a checkpoint without reference statistics ``noref``."""
    import flowcore
    from flowcore.ood.evaluate import evaluate

    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:28, :28]
    blob = np.exp(-((yy - 14) ** 2 + (xx - 14) ** 2) / 40.0) * 200

    def fashion(n: int) -> np.ndarray:
        return np.clip(blob[None] + rng.normal(0, 20, (n, 28, 28)), 0, 255).astype(np.uint8)

    def digits(n: int) -> np.ndarray:
        return ((rng.random((n, 28, 28)) < 0.1) * 255).astype(np.uint8)

    np.savez(
        data / "fashion_mnist.npz", x_train=fashion(40), y_train=np.zeros(40), x_test=fashion(16), y_test=np.zeros(16)
    )
    np.savez(data / "mnist.npz", x_train=digits(8), y_train=np.zeros(8), x_test=digits(16), y_test=np.zeros(16))

    ckpts = root / "checkpoints"
    model = flowcore.build(TINY)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    folder = ckpts / "fashion_realnvp"
    flowcore.save(model, folder, name="fashion_realnvp", dataset=f"npz:{data / 'fashion_mnist.npz'}", ood=["mnist"])
    evaluate(folder, data_dir=str(data), ood=[f"npz:{data / 'mnist.npz'}"], train_subset=32)
    shutil.copytree(folder, ckpts / "fashion_copy")
    noref = ckpts / "noref"
    noref.mkdir()
    shutil.copy(folder / "model.safetensors", noref / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("reference", None)
    cfg["name"] = "noref"
    (noref / "config.json").write_text(json.dumps(cfg))
    # an RGB 32x32 model (the CIFAR-10 / CelebA layout), evaluated against grayscale OOD data
    rgb_data = data / "rgb.npz"
    np.savez(rgb_data, x_train=(rng.random((24, 32, 32, 3)) * 255).astype(np.uint8),
             x_test=(rng.random((8, 32, 32, 3)) * 255).astype(np.uint8))
    rgb = flowcore.build(RGB_TINY)
    with torch.no_grad():
        for p in rgb.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    flowcore.save(rgb, ckpts / "rgb_realnvp", name="rgb_realnvp", dataset=f"npz:{rgb_data}", ood=["mnist"])
    evaluate(ckpts / "rgb_realnvp", data_dir=str(data), ood=[f"npz:{data / 'mnist.npz'}"], train_subset=16)
    return ckpts, data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("flowcore_app")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWCORE_CHECKPOINTS", str(root / "checkpoints"))
        mp.setenv("FLOWCORE_DATA_DIR", str(root / "data"))
        mp.setenv("FLOWCORE_CACHE", str(root / "cache"))  # the user's own models and jobs: none but the tests'
        mp.delenv("FLOWCORE_DEFAULT_CHECKPOINT", raising=False)
        yield make_tiny_setup(root)


@pytest.fixture
def env(tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    ckpts, data = tiny
    monkeypatch.setenv("FLOWCORE_CHECKPOINTS", str(ckpts))
    monkeypatch.setenv("FLOWCORE_DATA_DIR", str(data))
    monkeypatch.setenv("FLOWCORE_CACHE", str(ckpts.parent / "cache"))
    monkeypatch.delenv("FLOWCORE_DEFAULT_CHECKPOINT", raising=False)
    return tiny


def ran_cleanly(at: AppTest) -> None:
    """The run raised nothing *and* showed no error: every page turns its failures into one ``st.error`` line
    (app/guard.py), so a page that broke shows an error, not an exception."""
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def start() -> AppTest:
    at = AppTest.from_file(str(HOME), default_timeout=TIMEOUT)
    at.run()
    ran_cleanly(at)
    return at


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "title", "subheader") for e in at.get(kind)]
    return "\n".join(str(p) for p in parts)


def test_home_shows_model_picker_card_and_histogram(env: tuple[Path, Path]) -> None:
    at = start()
    picker = at.sidebar.selectbox(key=state.CHECKPOINT_KEY)
    assert picker.value == "fashion_realnvp"
    assert set(picker.options) >= {"fashion_realnvp (fashion_mnist, realnvp)", "noref (fashion_mnist, realnvp)"}
    card = "\n".join(m.value for m in at.sidebar.markdown)
    assert "RealNVP" in card and "Parameters" in card and "Test bpd" in card
    assert at.sidebar.get("file_uploader")
    assert at.title[0].value == "Score"
    assert len(at.get("plotly_chart")) >= 1
    assert at.table, "AUROC table missing"
    # the table shows this checkpoint's own stored AUROCs, in %
    stored = json.loads((env[0] / "fashion_realnvp" / "config.json").read_text())["reference"]["auroc"]
    shown = at.table[0].value
    assert shown.loc["likelihood", "mnist"] == f"{100 * stored['likelihood']['mnist']:.1f}"
    assert not at.error


def test_upload_scores_and_corrupt_file_gives_clear_error(env: tuple[Path, Path]) -> None:
    at = start()
    good = png_bytes((np.random.default_rng(1).random((40, 30)) * 255).astype(np.uint8))
    at.file_uploader(key=state.UPLOAD_KEY).set_value(
        [("shirt.png", good, "image/png"), ("broken.png", b"this is not an image", "image/png")]
    )
    at.run()
    assert not at.exception, at.exception  # an error line is expected here: checked below
    errors = [e.value for e in at.error]
    assert any(e.startswith("broken.png:") and "not a PNG, JPEG" in e for e in errors), errors
    assert not any("Traceback" in e for e in errors)
    labels = [m.label for m in at.metric]
    assert "bits/dim" in labels and "log-likelihood (nats)" in labels
    assert any(m.value in ("OOD", "in-distribution") for m in at.metric)
    tables = [d.value for d in at.dataframe if "image" in d.value.columns]
    assert len(tables) == 1 and list(tables[0]["image"]) == ["shirt.png"]
    assert at.get("download_button")
    assert len(at.get("plotly_chart")) >= 1


def test_app_score_equals_cli_score_and_twins_score_alike(env: tuple[Path, Path], tmp_path: Path) -> None:
    from flowcore.ood.scoring import score_files

    ckpts, _ = env
    rng = np.random.default_rng(4)
    shirts = [png_bytes((rng.random((40, 30)) * 255).astype(np.uint8)) for _ in range(3)]
    at = start()
    at.file_uploader(key=state.UPLOAD_KEY).set_value(
        [("a.png", shirts[0], "image/png"), ("b.png", shirts[1], "image/png"), ("twin.png", shirts[0], "image/png"),
         ("c.png", shirts[2], "image/png")]
    )
    at.run()
    ran_cleanly(at)
    table = next(d.value for d in at.dataframe if "image" in d.value.columns)
    app_ll = dict(zip(table["image"], table["log-likelihood (nats)"], strict=True))
    assert app_ll["a.png"] == app_ll["twin.png"]
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        (tmp_path / name).write_bytes(shirts[i])
    files = [tmp_path / n for n in ("c.png", "b.png", "a.png")]  # another order and company than in the app
    rows, failures = score_files(ckpts / "fashion_realnvp", files)
    assert not failures
    for row in rows:
        assert abs(row["log_likelihood_nats"] - app_ll[Path(row["path"]).name]) < 1e-3, row


def test_app_csv_equals_cli_csv(env: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowcore.ood.scores import result_rows
    from flowcore.ood.scoring import score_files, write_rows

    ckpts, _ = env
    rng = np.random.default_rng(6)
    files = {f"{c}.png": png_bytes((rng.random((30, 30)) * 255).astype(np.uint8)) for c in "abc"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    rows, failures = score_files(ckpts / "fashion_realnvp", list(files), score="typicality", fpr=0.1)
    assert not failures
    cli = io.StringIO()
    write_rows(rows, "csv", cli)

    # what the Score page's download holds for the same uploads, score and false-positive rate
    good = [(item, state.prepare(item.data, service.image_shape("fashion_realnvp")))
            for item in (state.InputImage(name, data) for name, data in files.items())]
    kept, results, bad = service.finite_scores("fashion_realnvp", good)
    app = io.StringIO()
    ref = service.reference("fashion_realnvp")
    write_rows(result_rows([item.name for item, _ in kept], results, "typicality", ref, 0.1), "csv", app)
    assert not bad and app.getvalue() == cli.getvalue()
    assert cli.getvalue().splitlines()[0] == "path,log_likelihood_nats,bpd,score,value,percentile,ood"


def test_non_finite_score_is_an_error_in_the_app(env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    real = service.scores

    def nan_for_first(name: str, arrays: list) -> dict:
        out = real(name, arrays)
        return {k: np.where(np.arange(len(v)) == 0, np.nan, v) for k, v in out.items()}

    monkeypatch.setattr(service, "scores", nan_for_first)
    at = start()
    rng = np.random.default_rng(5)
    at.file_uploader(key=state.UPLOAD_KEY).set_value(
        [("nan.png", png_bytes((rng.random((20, 20)) * 255).astype(np.uint8)), "image/png"),
         ("fine.png", png_bytes((rng.random((20, 20)) * 255).astype(np.uint8)), "image/png")]
    )
    at.run()
    assert not at.exception, at.exception  # an error line is expected here: checked below
    assert any(e.value.startswith("nan.png:") and "non-finite" in e.value for e in at.error)
    table = next(d.value for d in at.dataframe if "image" in d.value.columns)
    assert list(table["image"]) == ["fine.png"]


VIEWS = {
    "score": 1,
    "inputs": 0,
    "compare": 2,
    "perturb": 2,
    "latents": 1,
    "couplings": 1,
    "receptive_field": 2,
    "resampling": 1,
    "samples": 1,
    "guide": 0,
    "tour": 0,
    "train_own": 0,
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_each_view_runs_with_an_input(env: tuple[Path, Path], view: str) -> None:
    at = start()
    x = (np.random.default_rng(2).random((28, 28)) * 255).astype(np.uint8)
    at.session_state[state.ADDED_KEY] = [state.InputImage("noise.png", png_bytes(x), "upload")]
    at.switch_page(f"views/{view}.py").run()
    ran_cleanly(at)
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) >= VIEWS[view]
    assert at.title, "every view has a title"
    if view == "guide":
        assert "Kirichenko" in texts(at)
        assert "`fashion_realnvp`: the default" in texts(at)  # the zoo tour lists the shipped models only
        assert "fashion_glow" not in texts(at)
    if view == "inputs":
        captions = [c for img in at.get("image") for c in img.captions]
        assert any(c.startswith("original: PNG") for c in captions), captions
        assert "final 28x28x1 uint8" in captions
    import flowcore

    model = flowcore.load(env[0] / "fashion_realnvp")
    if view == "couplings":  # the per-layer log-determinants are the flow's own, computed here independently
        table = next(d.value for d in at.dataframe if "log|det| (nats)" in d.value.columns)
        want = [round(float(r.log_det[0]), 3) for r in flowcore.coupling_trace(model, x)]
        assert list(table["log|det| (nats)"]) == pytest.approx(want, abs=2e-3)
    if view == "compare":  # the shown bits/dim of the input under model A is the model's own
        table = next(t.value for t in at.table if t.value.index.name == "image")
        n_draws = json.loads((env[0] / "fashion_realnvp" / "config.json").read_text())["reference"]["n_draws"]
        want = flowcore.bits_per_dim(model, x[None], n_draws=n_draws)[0]
        assert float(table["bpd fashion_realnvp"].iloc[0]) == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("view", [v for v in VIEWS if v != "guide"])
def test_each_view_runs_on_an_rgb_model_with_gray_and_colour_inputs(
    env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, view: str
) -> None:
    monkeypatch.setenv("FLOWCORE_DEFAULT_CHECKPOINT", "rgb_realnvp")
    at = start()
    assert at.sidebar.selectbox(key=state.CHECKPOINT_KEY).value == "rgb_realnvp"
    rng = np.random.default_rng(3)
    gray = (rng.random((28, 28)) * 255).astype(np.uint8)  # a grayscale digit-sized upload: cross-domain rule
    colour = (rng.random((50, 40, 3)) * 255).astype(np.uint8)
    at.session_state[state.ADDED_KEY] = [
        state.InputImage("gray.png", png_bytes(gray), "upload"),
        state.InputImage("colour.png", png_bytes(colour), "upload"),
    ]
    at.switch_page(f"views/{view}.py").run()
    ran_cleanly(at)
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) >= VIEWS[view]
    if view == "inputs":
        captions = [c for img in at.get("image") for c in img.captions]
        assert "final 32x32x3 uint8" in captions, captions


def test_views_without_inputs_use_a_test_image(env: tuple[Path, Path]) -> None:
    at = start()
    for view in ("latents", "resampling"):
        at.switch_page(f"views/{view}.py").run()
        ran_cleanly(at)
        assert "test image 0" in texts(at)


def test_gallery_button_adds_inputs(env: tuple[Path, Path]) -> None:
    at = start()
    at.switch_page("views/inputs.py").run()
    buttons = [b for b in at.button if b.label.startswith("Add these")]
    assert buttons, "gallery has an add button per available set"
    buttons[0].click().run()
    ran_cleanly(at)
    added = at.session_state[state.ADDED_KEY]
    assert len(added) == 8 and all(i.as_is for i in added)
    current = at.sidebar.selectbox(key=state.CURRENT_KEY)
    assert len(current.options) == 8


def test_receptive_field_number_inputs(env: tuple[Path, Path]) -> None:
    at = start()
    at.switch_page("views/receptive_field.py").run()
    at.number_input(key="rf_h").set_value(3)
    at.number_input(key="rf_w").set_value(25)
    at.run()
    ran_cleanly(at)
    assert "row 3, column 25" in texts(at)


def test_batchnorm_toggle_and_score_selector(env: tuple[Path, Path]) -> None:
    at = start()
    at.switch_page("views/latents.py").run()
    at.toggle(key="latent_bn").set_value(True).run()
    ran_cleanly(at)
    at.switch_page("views/score.py").run()
    assert "complexity_png" in " ".join(at.selectbox(key="score_choice").options)
    at.selectbox(key="score_choice").set_value("complexity_png")
    at.radio(key="score_units").set_value("nats")
    at.run()
    ran_cleanly(at)
    assert len(at.get("plotly_chart")) == 2


def test_checkpoint_without_reference_says_how_to_evaluate(
    env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWCORE_DEFAULT_CHECKPOINT", "noref")
    at = start()
    assert at.sidebar.selectbox(key=state.CHECKPOINT_KEY).value == "noref"
    assert any("flowcore evaluate noref" in w.value for w in at.warning)
    at.switch_page("views/compare.py").run()
    ran_cleanly(at)


def test_no_checkpoint_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCORE_CHECKPOINTS", str(tmp_path / "empty"))
    monkeypatch.delenv("FLOWCORE_DEFAULT_CHECKPOINT", raising=False)
    at = start()
    warnings = " ".join(w.value for w in at.warning)
    assert "flowcore train" in warnings and "flowcore evaluate" in warnings
    at.switch_page("views/latents.py").run()
    ran_cleanly(at)
    assert at.warning


# ---------------------------------------------------------------------------------------- figures


def test_histogram_traces() -> None:
    sets = {"train": np.arange(10.0), "test": np.arange(5.0), "mnist": np.arange(7.0) + 3}
    fig = figures.histogram(sets, [("a.png", 2.5), ("nan.png", float("nan"))], xlabel="bpd")
    assert isinstance(fig, go.Figure)
    hists = [t for t in fig.data if isinstance(t, go.Histogram)]
    lines = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert [h.name.split(" ")[0] for h in hists] == ["train", "test", "mnist"]
    assert "median" in hists[0].name
    assert len(lines) == 1 and lines[0].name == "a.png" and lines[0].yaxis == "y2"
    assert tuple(lines[0].x) == (2.5, 2.5)
    assert len(fig.layout.shapes) == 3  # median lines
    assert hists[0].xbins.size == hists[2].xbins.size  # shared bins


def test_histogram_legend_below_axis_title_whatever_its_length() -> None:
    """More legend entries grow the figure, not shrink the plot: the legend never slides onto the axis title."""
    plot_heights, gaps = set(), set()
    for n in (1, 4, 12):
        sets = {f"set{i}": np.arange(10.0) + i for i in range(n)}
        fig = figures.histogram(sets, [(f"img{i}.png", 3.0) for i in range(n)], xlabel="bpd", height=300)
        layout = fig.layout
        plot_heights.add(layout.height - layout.margin.t - layout.margin.b)
        assert layout.legend.yref == "container" and layout.legend.yanchor == "top"
        gaps.add(round(layout.margin.b - layout.legend.y * layout.height, 6))  # px from plot bottom to legend top
    assert plot_heights == {300 - 10} and len(gaps) == 1 and gaps.pop() >= 50


def test_image_panels() -> None:
    gray = [np.zeros((28, 28), np.uint8), np.ones((1, 28, 28)) * 0.5]
    fig = figures.image_grid(gray, ["a", "b"], cols=2, box=(9, 9, 9, 9))
    assert [type(t) for t in fig.data] == [go.Heatmap, go.Heatmap]
    assert fig.data[0].zmax == 255 and fig.data[1].zmax == 1.0
    assert len(fig.layout.shapes) == 2
    rgb = figures.image_grid([np.zeros((32, 32, 3), np.uint8), np.zeros((3, 32, 32))])
    assert [type(t) for t in rgb.data] == [go.Image, go.Image]
    assert figures.to_display(np.zeros((3, 8, 8))).shape == (8, 8, 3)
    assert figures.to_display(np.zeros((1, 8, 8))).shape == (8, 8)


def test_panel_grid_puts_each_trace_box_and_marker_on_its_own_square_axes() -> None:
    """The grid is built in one layout update (fast); each panel must still own its axes: its image, its box
    outline and its marker on the same x/y pair, pixels square (y anchored to x) and rows top-down."""
    panels = [figures.Panel(np.full((6, 5), float(i)), f"p{i}", colorbar=i == 1) for i in range(5)]
    fig = figures.panels_figure(panels, cols=2, box=(1, 2, 3, 2), marker=(4, 1))
    images = [t for t in fig.data if isinstance(t, go.Heatmap)]
    markers = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert len(images) == len(markers) == len(fig.layout.shapes) == 5
    for i, (img, mark, shape) in enumerate(zip(images, markers, fig.layout.shapes, strict=True)):
        x_ref, y_ref = ("x", "y") if i == 0 else (f"x{i + 1}", f"y{i + 1}")
        assert float(np.asarray(img.z)[0, 0]) == i and (img.xaxis, img.yaxis) == (x_ref, y_ref)
        assert (mark.xaxis, mark.yaxis) == (x_ref, y_ref) and (mark.x[0], mark.y[0]) == (1, 4)
        assert (shape.xref, shape.yref) == (x_ref, y_ref) and (shape.x0, shape.y0) == (1.5, 0.5)
        y_axis = fig.layout[f"yaxis{'' if i == 0 else i + 1}"]
        assert y_axis.scaleanchor == x_ref and y_axis.autorange == "reversed" and y_axis.showticklabels is False
    assert images[1].showscale and images[1].colorbar.x == fig.layout.xaxis2.domain[1]
    assert not images[0].showscale


def test_latent_and_coupling_figures() -> None:
    z = np.random.default_rng(0).normal(size=(1, 8, 8))
    fig = figures.latent_figure(np.zeros((8, 8), np.uint8), z)
    assert len(fig.data) == 2 and fig.data[1].colorscale is not None and fig.data[1].zmin == -fig.data[1].zmax
    half = np.where(np.indices((8, 8)).sum(0) % 2 == 0, np.nan, 1.0)
    records = [(f"layer{i}", {"input": z[0], "log_s": half, "t": half, "output": z[0]}) for i in range(3)]
    grid = figures.coupling_grid(records)
    assert len(grid.data) == 12 and all(isinstance(t, go.Heatmap) for t in grid.data)
    assert np.isnan(np.asarray(grid.data[1].z, dtype=float)).sum() == 32
    titles = [a.text for a in grid.layout.annotations]
    assert titles[:4] == ["layer0 · input", "layer0 · log_s", "layer0 · t", "layer0 · output"]


def test_picker_jacobian_and_curve() -> None:
    z = np.zeros((6, 5))
    pick = figures.latent_picker(z, position=(2, 3))
    assert isinstance(pick.data[0], go.Heatmap)
    assert len(pick.data[1].x) == 30  # one clickable point per latent
    assert tuple(pick.data[2].x) == (3,) and tuple(pick.data[2].y) == (2,)
    jac = figures.jacobian_figure(np.zeros((6, 5), np.uint8), np.ones((6, 5)), (2, 3), np.ones((6, 5)))
    assert sum(isinstance(t, go.Heatmap) for t in jac.data) == 3
    assert sum(isinstance(t, go.Scatter) for t in jac.data) == 3  # the marker on each panel
    assert jac.data[2].zmin == 0.0 and jac.data[2].zmax == 1.0
    assert [t.showscale for t in jac.data if isinstance(t, go.Heatmap)] == [False, True, True]  # scales shown
    logged = figures.jacobian_figure(np.zeros((6, 5), np.uint8), np.full((6, 5), 100.0), log=True)
    assert np.allclose(np.asarray(logged.data[1].z, dtype=float), 2.0) and logged.data[1].zmax == 2.0
    c = figures.curve([0, 1, 2], [3.0, 2.0, 1.0], "noise", "bpd", current=1, hlines=[("test median", 2.0)])
    assert len(c.data) == 1 and list(c.data[0].y) == [3.0, 2.0, 1.0]
    assert len(c.layout.shapes) == 2


def test_perturb_and_helpers() -> None:
    x = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)
    assert np.array_equal(images.perturb(x), x)
    assert np.array_equal(images.perturb(x, invert=True), 255 - x)
    bright = images.perturb(x, brightness=300)
    assert bright.dtype == np.uint8 and bright.min() == 255
    flat = images.perturb(x, contrast=0.0)
    assert np.all(flat == 128)
    noisy = images.perturb(x, noise=10, seed=3)
    assert np.array_equal(noisy, images.perturb(x, noise=10, seed=3)) and not np.array_equal(noisy, x)
    assert images.perturb(x, blur=2.0).std() < x.std()
    with pytest.raises(ValueError):
        images.perturb(x.astype(np.float32))
    assert "RealNVP, 2 scales" in describe_architecture(TINY)
    assert "Glow" in describe_architecture({"arch": "glow", "image_shape": [3, 32, 32], "scales": 3, "steps": 8})
    assert images.thumbnail(np.zeros((28, 28), np.uint8)).shape == (112, 112)
    assert max(images.thumbnail(np.zeros((1000, 500, 3), np.uint8)).shape[:2]) == 256


def test_gallery_works_without_data_dir_from_bundled_examples(
    tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Straight after set-up (no FLOWCORE_DATA_DIR) the gallery offers the bundled examples."""
    from flowcore.data.datasets import EXAMPLE_SETS, load_examples

    ckpts, _ = tiny
    monkeypatch.setenv("FLOWCORE_CHECKPOINTS", str(ckpts))
    monkeypatch.delenv("FLOWCORE_DATA_DIR", raising=False)
    monkeypatch.setenv("FLOWCORE_DEFAULT_CHECKPOINT", "rgb_realnvp")
    assert set(EXAMPLE_SETS) >= {"fashion_mnist", "mnist", "cifar10"}
    assert load_examples("cifar10", (1, 28, 28)).shape == (16, 28, 28)
    at = AppTest.from_file(str(ROOT / "app" / "views" / "inputs.py"), default_timeout=TIMEOUT)
    at.run()
    ran_cleanly(at)
    shown = "\n".join(m.value for m in at.markdown)
    assert "**mnist** (OOD, bundled examples)" in shown, shown
    add = next(b for b in at.button if b.key == "add_mnist")
    add.click().run()
    ran_cleanly(at)
    assert any(item.source == "gallery: mnist" for item in at.session_state[state.ADDED_KEY])


def test_score_caption_states_this_models_own_aurocs(env: tuple[Path, Path]) -> None:
    from flowcore.dashboard.measure import likelihood_finding

    row = next(r for r in service.auroc_rows("rgb_realnvp") if r["score"] == "likelihood")
    text = likelihood_finding("rgb_realnvp")
    for s, v in row.items():
        if s != "score":
            assert f"{s} ({100 * v:.1f} %)" in text
    assert "Fashion-MNIST" not in text and "`rgb_realnvp`" in text
    assert "no OOD AUROCs" in likelihood_finding("noref")


def test_perturbation_sentence_is_measured_on_the_current_model(env: tuple[Path, Path]) -> None:
    import flowcore
    from flowcore.dashboard.measure import PROBES, measured_edits

    image = (np.random.default_rng(7).random((28, 28)) * 255).astype(np.uint8)
    text = measured_edits("fashion_realnvp", image)
    model = service.model("fashion_realnvp")
    summary = service.config("fashion_realnvp")["reference"]
    kw = {"n_draws": summary["n_draws"], "seed": summary["seed"]}
    base = flowcore.bits_per_dim(model, image[None], **kw)[0]
    for words, settings in PROBES:
        delta = flowcore.bits_per_dim(model, images.perturb(image, **settings)[None], **kw)[0] - base
        effect = "more likely" if delta < 0 else "less likely"
        assert f"{words} makes it {effect} ({delta:+.3f} bits/dim)" in text, text


def test_batchnorm_train_mode_latents_use_a_real_batch(env: tuple[Path, Path]) -> None:
    import flowcore

    image = (np.random.default_rng(8).random((28, 28)) * 255).astype(np.uint8)
    z = service.latent_map("fashion_realnvp", image, n_draws=2, batchnorm="train")
    companions, what = service.batchnorm_companions("fashion_realnvp")
    assert len(companions) > 1 and "test images" in what
    batch = np.concatenate([image[None], companions])
    model = service.model("fashion_realnvp")
    want = flowcore.latents(model, batch, n_draws=2, batchnorm="train", batch_size=len(batch))[0]
    np.testing.assert_allclose(z, want, atol=1e-6)
    alone = flowcore.latents(model, image[None], n_draws=2, batchnorm="train")[0]
    assert not np.allclose(z, alone, atol=1e-3)  # a batch of one would normalise by the image itself


def test_tour_walks_every_step_with_measured_sentences(env: tuple[Path, Path]) -> None:
    from flowcore.dashboard.views import tour

    at = AppTest.from_file(str(ROOT / "app" / "views" / "tour.py"), default_timeout=TIMEOUT)
    at.run()
    seen = []
    for step in range(len(tour.STEPS)):
        assert not at.exception, (step, at.exception)
        assert at.subheader[0].value == tour.STEPS[step][0]
        seen.append("\n".join(m.value for m in at.markdown))
        if step < len(tour.STEPS) - 1:
            at.button(key="tour_next").click().run()
    assert at.button(key="tour_next").disabled
    assert "Measured" in seen[1] and "Measured" in seen[2] and "Measured here" in seen[3]
    assert "AUROC" in seen[5]
    assert "no such flow with reference statistics is installed here" in seen[6]  # the tiny zoo has none
    at.button(key="tour_back").click().run()
    assert at.subheader[0].value == tour.STEPS[-2][0]


def test_score_page_says_when_auto_invert_flipped_an_upload(env: tuple[Path, Path]) -> None:
    at = start()
    light = np.full((40, 40), 230, np.uint8)
    light[15:25, 15:25] = 20  # a dark square on a light background: auto-invert flips it
    at.file_uploader(key=state.UPLOAD_KEY).set_value([("light.png", png_bytes(light), "image/png")])
    at.run()
    ran_cleanly(at)
    assert any("Inverted before scoring" in i.value and "light.png" in i.value for i in at.info)


def test_unreadable_upload_is_not_offered_as_image_to_inspect(env: tuple[Path, Path]) -> None:
    at = start()
    good = png_bytes((np.random.default_rng(9).random((20, 20)) * 255).astype(np.uint8))
    at.file_uploader(key=state.UPLOAD_KEY).set_value(
        [("broken.png", b"not an image", "image/png"), ("good.png", good, "image/png")]
    )
    at.run()
    assert not at.exception, at.exception  # an error line is expected here: checked below
    assert [e.value.split(":")[0] for e in at.error] == ["broken.png"], [e.value for e in at.error]
    picker = at.sidebar.selectbox(key=state.CURRENT_KEY)
    assert [picker.format_func(k) for k in picker.options] == ["good.png (upload)"]


def test_every_marker_of_a_full_score_page_has_its_own_colour() -> None:
    from flowcore.dashboard.views.score import MAX_MARKERS

    markers = [(f"img{i}", float(i)) for i in range(MAX_MARKERS + 2)]
    fig = figures.histogram({"test": np.arange(10.0)}, markers)
    lines = [t for t in fig.data if isinstance(t, go.Scatter) and t.name.startswith("img")]
    styles = [(t.line.color, t.line.dash) for t in lines]
    assert len({c for c, _ in styles[:MAX_MARKERS]}) == MAX_MARKERS
    assert len(set(styles)) == len(styles)


def test_influence_maps_draw_zero_as_black() -> None:
    """A named scale's first stop was swapped for a theme colour in the browser: the stops are spelled out."""
    jac = figures.jacobian_figure(np.zeros((6, 5), np.uint8), np.ones((6, 5)))
    scale = next(t for t in jac.data if isinstance(t, go.Heatmap) and t.showscale).colorscale
    assert scale[0][0] == 0 and scale[0][1] == "rgb(0, 0, 4)" and scale[-1][1].startswith("rgb(")


@pytest.fixture
def feature_env(tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The tiny pixel checkpoints plus ``rgb_embeddings``: a flow on (fake) image features of the same npz data
    as ``rgb_realnvp``, evaluated against MNIST-like digits."""
    from conftest import fake_extract

    import flowcore
    from flowcore.data import embeddings
    from flowcore.ood.evaluate import evaluate
    from flowcore.ood.vectors import dataset_features

    ckpts, data = tiny
    mine = tmp_path / "checkpoints"
    shutil.copytree(ckpts, mine)
    monkeypatch.setattr(embeddings, "extract", fake_extract)
    monkeypatch.setattr(embeddings, "load_extractor", lambda: None)
    monkeypatch.setattr(embeddings, "extractor_installed", lambda: True)
    monkeypatch.setenv("FLOWCORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLOWCORE_CHECKPOINTS", str(mine))
    monkeypatch.setenv("FLOWCORE_DATA_DIR", str(data))
    monkeypatch.delenv("FLOWCORE_DEFAULT_CHECKPOINT", raising=False)
    rgb = f"npz:{data / 'rgb.npz'}"
    from flowcore.ood.vectors import knn_bank, write_knn_bank

    flow = flowcore.build({"arch": "realnvp_tabular", "dim": embeddings.FEATURE_DIM, "hidden": 8, "blocks": 1,
                           "couplings": 2, "whiten": True, "flow_dims": 8})
    train = dataset_features(rgb, "train")
    flow.standardize.fit(torch.from_numpy(train))
    bank, knn = knn_bank(train)
    flowcore.save(flow, mine / "rgb_embeddings", name="rgb_embeddings", dataset=rgb, features=embeddings.EXTRACTOR,
                  input_shape=[3, 32, 32], ood=["mnist"], knn=knn)
    write_knn_bank(mine / "rgb_embeddings", bank)
    evaluate(mine / "rgb_embeddings", data_dir=str(data), ood=[f"npz:{data / 'mnist.npz'}"], train_subset=16)
    return mine, data


def test_features_page_scores_inputs_and_examples_under_both_flows(feature_env: tuple[Path, Path]) -> None:
    from conftest import fake_extract

    import flowcore
    from flowcore.ood.scores import ood_threshold, percentile_of
    from flowcore.ood.vectors import image_log_likelihood

    ckpts, data = feature_env
    at = start()
    # the pixel pages never offer a flow on features (they could not draw it)
    assert not any("rgb_embeddings" in o for o in at.sidebar.selectbox(key=state.CHECKPOINT_KEY).options)
    faces = np.load(data / "rgb.npz")["x_test"]
    at.session_state[state.ADDED_KEY] = [state.InputImage("face.png", png_bytes(faces[0]), "upload")]
    at.switch_page("views/features.py").run()
    ran_cleanly(at)
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="features_flow").value == "rgb_embeddings"
    # the flow and its two baselines side by side; the verdicts start on the best of them by mean AUROC
    cfg = json.loads((ckpts / "rgb_embeddings" / "config.json").read_text())
    table = cfg["reference"]["auroc"]
    assert set(table) == {"likelihood", "embedding_gaussian", "embedding_knn"}
    aurocs = next(d.value for d in at.table if d.value.index.name == "OOD set")
    for score, column in (("embedding_gaussian", "Gaussian on features (Ledoit-Wolf)"),
                          ("embedding_knn", f"k-NN on features (k = {cfg['knn']['k']})")):
        assert float(aurocs.loc["mnist", column]) == pytest.approx(100 * table[score]["mnist"], abs=0.05)
    best = max(table, key=lambda s: table[s]["mnist"])
    assert at.radio(key="features_score").value == best
    sentence = next(m.value for m in at.markdown if "against its baselines" in m.value)
    assert f"flow {100 * table['likelihood']['mnist']:.1f} %" in sentence
    assert f"Gaussian {100 * table['embedding_gaussian']['mnist']:.1f} %" in sentence
    assert (" a Gaussian of the same features separates better than the flow" in sentence) == \
        (table["embedding_gaussian"]["mnist"] > table["likelihood"]["mnist"])
    # the k-NN verdicts on the bundled examples, recomputed here from the stored bank
    from flowcore.data.datasets import EXAMPLE_SETS, load_examples
    from flowcore.ood.scores import knn_score
    from flowcore.ood.vectors import load_feature_scorer

    at.radio(key="features_score").set_value("embedding_knn").run()
    scorer = load_feature_scorer(ckpts / "rgb_embeddings")
    knn_ref = np.load(ckpts / "rgb_embeddings" / "reference.npz")["test__embedding_knn"]
    examples = next(d.value for d in at.table if d.value.index.name == "set")
    for name in EXAMPLE_SETS:
        values = knn_score(fake_extract(load_examples(name)), scorer.knn_bank, scorer.knn_k)
        assert examples.loc[name, "flagged OOD (features)"] == int((values < np.quantile(knn_ref, 0.05)).sum())
    at.radio(key="features_score").set_value("likelihood").run()
    assert at.selectbox(key="features_pixel").value == "rgb_realnvp"  # the pixel flow on the same data
    ours = cfg["reference"]["auroc"]["likelihood"]["mnist"]
    assert float(aurocs.loc["mnist", "rgb_embeddings (flow on features)"]) == pytest.approx(100 * ours, abs=0.05)
    assert f"mnist ({100 * ours:.1f} %)" in texts(at)  # the sentence quotes this flow's own AUROC

    model = flowcore.load(ckpts / "rgb_embeddings")
    reference = np.load(ckpts / "rgb_embeddings" / "reference.npz")["test__likelihood"]
    yours = next(d.value for d in at.table if d.value.index.name == "image")
    expected = percentile_of(image_log_likelihood(model, faces[:1])[0], reference)
    assert yours.loc["face.png", "features: percentile"] == pytest.approx(float(expected), abs=0.01)
    assert "pixels: verdict" in yours.columns

    # the upload is a star on the 2-D view, at its features' projection on the stored principal directions
    from flowcore.ood.vectors import project

    with np.load(ckpts / "rgb_embeddings" / "projection.npz") as d:
        projection = {k: d[k] for k in d.files}
    want = project(fake_extract(faces[:1]), projection)[0]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    stars = [t for spec in specs for t in spec["data"] if t.get("name") == "face.png" and t.get("mode") == "markers"]
    assert len(stars) == 1 and stars[0]["x"][0] == pytest.approx(float(want[0]), rel=1e-4)
    assert any(t.get("name") == "face.png" and t.get("mode") == "lines" for spec in specs for t in spec["data"])

    threshold = ood_threshold(reference, 0.05)
    examples = next(d.value for d in at.table if d.value.index.name == "set")
    for name in EXAMPLE_SETS:
        flagged = int((image_log_likelihood(model, load_examples(name)) < threshold).sum())
        assert examples.loc[name, "flagged OOD (features)"] == flagged, name


def test_score_page_offers_the_paired_feature_flows_likelihood(feature_env: tuple[Path, Path]) -> None:
    """Where a flow on features was trained on the pixel flow's data, its likelihood is one more score on the
    Score page: percentile and verdict against that flow's own test images, its AUROC row beside the others."""
    import flowcore
    from flowcore.ood.scores import ood_threshold, percentile_of, verdict
    from flowcore.ood.vectors import image_log_likelihood

    ckpts, data = feature_env
    at = start()
    def offered(at: AppTest) -> list[str]:
        return [o.split(":")[0] for o in at.selectbox(key="score_choice").options]

    assert "likelihood" in offered(at) and "embedding_likelihood" not in offered(at)  # fashion_realnvp: no pair
    at.sidebar.selectbox(key=state.CHECKPOINT_KEY).set_value("rgb_realnvp").run()
    faces = np.load(data / "rgb.npz")["x_test"]
    at.session_state[state.ADDED_KEY] = [state.InputImage("face.png", png_bytes(faces[0]), "upload")]
    at.run()
    assert "embedding_likelihood" in offered(at)
    at.selectbox(key="score_choice").set_value("embedding_likelihood").run()
    ran_cleanly(at)
    reference = np.load(ckpts / "rgb_embeddings" / "reference.npz")["test__likelihood"]
    value = float(image_log_likelihood(flowcore.load(ckpts / "rgb_embeddings"), faces[:1])[0])
    shown = next(m for m in at.metric if m.label.startswith("verdict at"))
    assert shown.label.endswith("(embedding_likelihood)")
    assert shown.value == verdict(value, ood_threshold(reference, 0.05))
    assert f"embedding_likelihood = {value:.4g}, percentile {float(percentile_of(value, reference)):.2f} %" in texts(at)
    pair_auroc = json.loads((ckpts / "rgb_embeddings" / "config.json").read_text())["reference"]["auroc"]
    rows = {r["score"]: r for r in service.auroc_rows("rgb_realnvp")}
    assert rows["embedding_likelihood"]["mnist"] == pytest.approx(pair_auroc["likelihood"]["mnist"])


def test_study_variants_are_not_offered_as_the_feature_flows_pixel_counterparts(feature_env: tuple[Path, Path]) -> None:
    """A fine-tune or a negative-training variant of a pixel flow is a study, not "the pixel flow on the same
    data": the features page and the tour compare the feature flow with plain pixel flows only."""
    ckpts, _ = feature_env
    for variant, key in (("rgb_realnvp_finetune", "init_from"), ("rgb_realnvp_negative", "negative")):
        shutil.copytree(ckpts / "rgb_realnvp", ckpts / variant)
        cfg = json.loads((ckpts / variant / "config.json").read_text())
        cfg.setdefault("training", {})[key] = "rgb_realnvp" if key == "init_from" else {"dataset": "mnist"}
        (ckpts / variant / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(ckpts / "rgb_realnvp", ckpts / "rgb_realnvp_horizontal")  # a Sec. 7 mask study
    cfg = json.loads((ckpts / "rgb_realnvp_horizontal" / "config.json").read_text())
    cfg["model"]["mask"] = "horizontal"
    cfg["reference"]["bpd_mean"] -= 1.0  # better fitted, still a study
    (ckpts / "rgb_realnvp_horizontal" / "config.json").write_text(json.dumps(cfg))
    assert {"rgb_realnvp_finetune", "rgb_realnvp_negative"} <= set(service.checkpoint_options())
    assert service.pixel_counterparts("rgb_embeddings") == ["rgb_realnvp"]
    # a continuation (more epochs from its weights, same objective) that fits better takes the plain model's place
    shutil.copytree(ckpts / "rgb_realnvp", ckpts / "rgb_realnvp_long")
    cfg = json.loads((ckpts / "rgb_realnvp_long" / "config.json").read_text())
    cfg.setdefault("training", {})["init_from"] = {"checkpoint": "rgb_realnvp"}
    cfg["reference"]["bpd_mean"] -= 0.1
    (ckpts / "rgb_realnvp_long" / "config.json").write_text(json.dumps(cfg))
    assert service.pixel_counterparts("rgb_embeddings") == ["rgb_realnvp_long"]


def test_tour_ends_on_the_feature_flow_measured_beside_the_pixel_flow(feature_env: tuple[Path, Path]) -> None:
    from flowcore.dashboard.views import tour

    at = start()  # through the entry point: the step links to other pages, which only st.navigation knows
    at.session_state[tour.STEP_KEY] = len(tour.STEPS) - 1
    at.switch_page("views/tour.py").run()
    ran_cleanly(at)
    text = "\n".join(m.value for m in at.markdown)
    ckpts, _ = feature_env
    table = json.loads((ckpts / "rgb_embeddings" / "config.json").read_text())["reference"]["auroc"]
    best = max(["likelihood", "embedding_gaussian", "embedding_knn"], key=lambda s: table[s]["mnist"])
    assert f"mnist ({100 * table[best]['mnist']:.1f} %) ({best} AUROC)" in text and "`rgb_realnvp` mnist" in text


def test_one_cache_decorator_keys_by_function_checkpoint_files_and_arguments(env: tuple[Path, Path]) -> None:
    ckpts, _ = env
    folder = ckpts / "fashion_copy"
    cfg = service.config("fashion_copy")
    assert "test__likelihood" in service.reference("fashion_copy")  # same arguments, another function: no collision
    calls = []

    @service.per_checkpoint()
    def probe(name: str, a: np.ndarray, k: int = 2) -> float:
        calls.append(k)
        return float(a.sum() * k)

    x = np.arange(6.0).reshape(2, 3)
    assert probe("fashion_copy", x) == probe("fashion_copy", x, 2) == probe("fashion_copy", np.asfortranarray(x))
    assert calls == [2]  # defaults bound and arrays made contiguous: one entry
    assert probe("fashion_copy", x, k=3) == 45.0 and calls == [2, 3]
    # a re-exported checkpoint (new files) is read again, not served from the cache
    text = (folder / "config.json").read_text()
    try:
        changed = json.loads(text)
        changed["name"] = "renamed"
        (folder / "config.json").write_text(json.dumps(changed))
        os.utime(folder / "config.json", ns=(1, 10**18))
        assert service.config("fashion_copy")["name"] == "renamed" != cfg.get("name")
    finally:
        (folder / "config.json").write_text(text)


def test_the_service_below_the_pages_runs_without_streamlit_and_serves_results_no_caller_can_alter(
    env: tuple[Path, Path],
) -> None:
    # Streamlit-free: the service imports, lists and computes with no Streamlit module loaded
    code = ("import sys; from flowcore.dashboard import service; "
            "name = service.default_checkpoint(service.checkpoint_options()); "
            "print(name, service.scores(name, service.first_image(name)[1][None])['bpd'][0], "
            "'streamlit' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "fashion_realnvp" and np.isfinite(float(out[1])) and out[2] == "False"

    # the spinner hook runs when a result is computed, not when it is served
    shown = []

    @contextlib.contextmanager
    def spy(message: str):
        shown.append(message)
        yield

    service.set_busy(spy)
    try:
        first = service.samples("fashion_realnvp", 2, 0.5, 123)
        computed = list(shown)
        again = service.samples("fashion_realnvp", 2, 0.5, 123)
    finally:
        service.set_busy(lambda message: contextlib.nullcontext())
    assert "Sampling..." in computed and shown == computed and np.array_equal(first, again)
    # a served array is read-only, a served mapping a copy: one page cannot change what the next is shown
    with pytest.raises(ValueError, match="read-only"):
        again[0, 0, 0, 0] = 7
    ref = service.reference("fashion_realnvp")
    ref["test__likelihood"] = np.zeros(1)
    assert len(service.reference("fashion_realnvp")["test__likelihood"]) > 1


def test_latents_page_shows_each_scales_latents_with_its_own_correlation(env: tuple[Path, Path]) -> None:
    from flowcore.flows.models import latent_scale_map
    from flowcore.inspection.probes import latent_image_correlation

    at = start()
    at.switch_page("views/latents.py").run()
    ran_cleanly(at)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    titles = [a["text"] for spec in specs for a in spec["layout"].get("annotations", []) if "scale" in a["text"]]
    assert [t.split(" (")[0] for t in titles] == ["scale 1", "scale 2"]  # the tiny model has two scales
    # scale 1's r is the correlation of the latents factored out first with their own pixels
    import flowcore

    model = flowcore.load(env[0] / "fashion_realnvp")
    labels = latent_scale_map(model).numpy()
    name, image = state.current_image("fashion_realnvp")
    z = service.latent_map("fashion_realnvp", image, 40, "eval")
    r = latent_image_correlation(image, np.where(labels == 0, z, np.nan))
    assert titles[0].endswith(f"r = {r:.2f}")


def test_train_own_page_refuses_an_empty_request_and_draws_a_real_job(env: tuple[Path, Path]) -> None:
    """The page submits nothing without images (one line, no job), then draws a job trained for real in its own
    process: state, progress, the live histogram, the AUROC and bpd curves, the measured sentence, and a button
    that opens the new model in the sidebar's picker."""
    import time

    from flowcore.ood import jobs

    at = start()
    at.switch_page("views/train_own.py").run()
    ran_cleanly(at)
    submit = next(b for b in at.get("button") if "Start training" in str(b.proto.label))
    submit.click().run()
    assert not at.exception, at.exception  # an error line is expected here: checked below
    assert [e.value for e in at.error] == ["0 image files uploaded; at least 50 are needed to train and keep a "
                                           "test set (a zip of a folder works too)"]
    assert jobs.list_jobs() == []
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    blobs = [(f"{i}.png", png_bytes((255 * np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / 18)).astype(np.uint8)))
             for i, c in enumerate(rng.uniform(9, 19, (60, 2)))]
    noise = [(f"n{i}.png", png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8))) for i in range(25)]
    job = jobs.submit("page_blobs", blobs, {"noise": noise}, gray=True, max_minutes=0.3)
    deadline = time.time() + 240
    while jobs.read_status(job).get("state") not in ("done", "failed") and time.time() < deadline:
        time.sleep(0.5)
    assert jobs.read_status(job)["state"] == "done", jobs.read_status(job)
    at = start()
    at.switch_page("views/train_own.py").run()  # no job of this tab: the page finds none active, shows the list
    assert "page_blobs" in str([t.value for t in at.table])
    at.session_state["own_data_job"] = job
    at.run()
    ran_cleanly(at)
    assert any("page_blobs" in s.value and "done" in s.value for s in at.success)
    assert len(at.get("plotly_chart")) == 3  # live histogram, AUROC over training, held-out bpd
    status = jobs.read_status(job)
    if len(status["epochs"]) >= 2:  # the sentence quotes the recorded medians
        first, last = status["epochs"][0], status["epochs"][-1]
        change = last["median_log_likelihood"]["test"] - first["median_log_likelihood"]["test"]
        assert f"held-out {'rose' if change > 0 else 'fell'} by {abs(change):,.1f} nats" in texts(at)
    opener = next(b for b in at.get("button") if "Open it" in str(b.proto.label))
    opener.click().run()
    assert at.sidebar.selectbox(key=state.CHECKPOINT_KEY).value == "page_blobs"
    at.switch_page("views/score.py").run()
    ran_cleanly(at)
    assert not at.error, [e.value for e in at.error]
