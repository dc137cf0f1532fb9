"""Train on your images: a flow on the user's own images, trained in a separate process (flowcore.ood.jobs) while
this page redraws every few seconds: progress and time left, the held-out bpd, and the live histogram of held-out
against OOD log-likelihoods with the AUROC over time (the paper's Sec. 6: the OOD likelihood rising together with
the in-distribution one). The page only draws and submits; the job folder on disk is the truth, so a reload or a
second tab finds the training where it is."""

from __future__ import annotations

import os

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from flowcore.dashboard import figures, service, state
from flowcore.data.datasets import DatasetNotFound, load_images
from flowcore.data.images import encode_png
from flowcore.ood import jobs
from flowcore.ood.own_data import MIN_IMAGES, PRESETS

JOB_KEY = "own_data_job"
REFRESH_SECONDS = 2.0
BUNDLED = {"in": ("mnist", 600), "ood": ("fashion_mnist", 300)}  # the demo: digits against clothes
PRESET_HELP = {"quick": "a small RealNVP, about 2 minutes", "standard": "a wider one, up to 50 CPU minutes"}


def _png_files(images: np.ndarray, prefix: str) -> list[tuple[str, bytes]]:
    return [(f"{prefix}_{i}.png", encode_png(image)) for i, image in enumerate(images)]


@service.memo(busy="Preparing the bundled example ...", max_entries=1)
def bundled_files(data_dir: str | None) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """600 MNIST test digits and 300 Fashion-MNIST test images as PNG files, as a user would upload them."""
    (ind, n_in), (ood, n_ood) = BUNDLED["in"], BUNDLED["ood"]
    return (_png_files(load_images(ind, "test", data_dir)[:n_in], ind),
            _png_files(load_images(ood, "test", data_dir)[:n_ood], ood))


def bundled_available(data_dir: str | None) -> bool:
    try:
        for dataset, _ in BUNDLED.values():
            load_images(dataset, "test", data_dir)
    except (DatasetNotFound, OSError, ValueError):
        return False
    return True


def request_form() -> None:
    data_dir = os.environ.get("FLOWCORE_DATA_DIR")
    with st.form("own_data_request"):
        name = st.text_input("Name of your model", value="my_images", max_chars=64,
                             help="Letters, digits, '_', '-', '.'; it appears under this name in the Model picker.")
        source = "upload"
        if bundled_available(data_dir):
            source = st.radio("Images", ["upload", "bundled"], horizontal=True, format_func=lambda s: {
                "upload": "my uploads (below)",
                "bundled": "the example: 600 MNIST digits, 300 Fashion-MNIST images as OOD"}[s])
        uploads = st.file_uploader(f"In-distribution images: several images or a zip of a folder (at least "
                                   f"{MIN_IMAGES})", type=[*state.IMAGE_TYPES, "zip"], accept_multiple_files=True)
        ood_uploads = st.file_uploader("OOD images (optional): what the model should find unlikely",
                                       type=[*state.IMAGE_TYPES, "zip"], accept_multiple_files=True)
        c1, c2, c3 = st.columns(3)
        preset = c1.radio("Preset", list(PRESETS), format_func=lambda p: f"{p}: {PRESET_HELP.get(p, '')}")
        size = c2.radio("Size (pixels)", [28, 32])
        channels = c3.radio("Channels", ["auto", "grayscale", "colour"],
                            help="auto: grayscale when every image is grayscale, else colour")
        replace = st.checkbox("Replace my model of this name if it exists")
        start = st.form_submit_button("Start training", type="primary")
    if not start:
        return
    if source == "bundled":
        images, ood_files = bundled_files(data_dir)
        ood = {"fashion_mnist": ood_files}
    else:
        images = [(f.name, f.getvalue()) for f in uploads or []]
        ood = {"ood": [(f.name, f.getvalue()) for f in ood_uploads]} if ood_uploads else {}
    gray = {"auto": None, "grayscale": True, "colour": False}[channels]
    try:
        job = jobs.submit(name.strip(), images, ood, preset=preset, size=size, gray=gray, replace=replace)
    except (ValueError, OSError) as e:  # JobError, a bad or taken name, a full disk: one line, nothing started
        st.error(state.one_line(e))
        return
    st.session_state[JOB_KEY] = job
    st.query_params["job"] = job  # a reload finds it
    st.rerun()  # the job's view is drawn above the form: draw the page again with it


def current_job() -> dict | None:
    """The job this page shows: the one this tab started (or its URL names), else the server's active one."""
    for job_id in (st.session_state.get(JOB_KEY), st.query_params.get("job")):
        if job_id and all(c.isalnum() or c == "-" for c in job_id):
            status = jobs.read_status(job_id)
            if status:
                return status
    return jobs.active_job()


def _open_model(name: str) -> None:
    st.session_state[state.CHECKPOINT_KEY] = name  # a callback: runs before the sidebar's picker is drawn


def _cancel(job_id: str) -> None:
    jobs.cancel(job_id)


def _retry(job_id: str) -> None:
    try:
        jobs.retry(job_id)
    except (ValueError, OSError) as e:
        st.session_state["own_data_error"] = state.one_line(e)


def progress_line(status: dict) -> None:
    value = float(status.get("progress") or 0.0)
    eta = status.get("eta_s")
    text = f"{100 * value:.0f} %"
    if status.get("state") == "running" and eta is not None:
        text += f", about {eta / 60:.1f} min left" if eta >= 60 else f", about {eta:.0f} s left"
    st.progress(min(max(value, 0.0), 1.0), text=text)


def auroc_figure(epochs: list[dict]) -> go.Figure:
    fig = go.Figure()
    labels = sorted({k for e in epochs for k in e.get("auroc", {})})
    for j, label in enumerate(labels):
        fig.add_trace(go.Scatter(x=[e["epoch"] for e in epochs], y=[100 * e["auroc"].get(label, np.nan)
                                                                   for e in epochs],
                                 mode="lines+markers", name=label, line_color=figures.set_colour(label, j)))
    fig.add_hline(y=50, line_dash="dot", line_color="#888", annotation_text="chance")
    fig.update_layout(xaxis_title="epoch", yaxis_title="AUROC % (held-out vs OOD)", height=320,
                      margin={"l": 50, "r": 10, "t": 10, "b": 40}, yaxis_range=[0, 100])
    return fig


def trend_sentence(epochs: list[dict]) -> str | None:
    """What the numbers say: how the held-out and each OOD set's median log-likelihood moved from the first
    recorded epoch to the last, and where the AUROC ended."""
    if len(epochs) < 2:
        return None
    first, last = epochs[0]["median_log_likelihood"], epochs[-1]["median_log_likelihood"]
    parts = []
    for label in last:
        change = last[label] - first.get(label, np.nan)
        if np.isfinite(change):
            parts.append(f"{'held-out' if label == 'test' else label} {'rose' if change > 0 else 'fell'} by "
                         f"{abs(change):,.1f} nats")
    text = (f"From epoch {epochs[0]['epoch']} to epoch {epochs[-1]['epoch']} the median log-likelihood of the "
            + "; ".join(parts) + ".")
    ood = [k for k in last if k != "test"]
    if ood and "test" in last:
        rising = [k for k in ood if last[k] - first.get(k, np.nan) > 0]
        if not last["test"] > first.get("test", np.nan):
            text += " The held-out likelihood has not risen over these epochs, so there is no rise to compare yet."
        elif rising:
            text += (" The OOD likelihood rose together with the in-distribution one, as the paper's Sec. 6 "
                     "describes: training makes the flow better at images in general, not only at yours.")
        else:
            text += " Here the OOD likelihood did not rise with the in-distribution one."
        aurocs = epochs[-1].get("auroc", {})
        text += " Last AUROC: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in aurocs.items()) + "."
    return text


def job_view(status: dict) -> None:
    job_id, job_state = status["job"], status.get("state")
    title = f"**{status.get('name', '?')}** ({status.get('preset', '?')} preset): {job_state}"
    if job_state == "queued":
        ahead = [s for s in jobs.list_jobs() if s.get("state") in ("queued", "running")
                 and s.get("submitted", 0) < status.get("submitted", 0)]
        st.info(f"{title}. One training runs at a time on this server; {len(ahead)} ahead of yours. It starts by "
                "itself: you may close this tab.")
    elif job_state == "running":
        st.info(f"{title}: {status.get('message', '')}. It runs in its own process: reloading or closing this tab "
                "does not stop it.")
    elif job_state == "done":
        st.success(f"{title}. {status.get('message', '')}.")
    else:
        st.error(f"{title}: {status.get('message', '')}")
    if status.get("read"):
        st.caption(f"Read: {status['read']}. {status.get('train_images', '?')} images train, "
                   f"{status.get('test_images', '?')} are held out.")
    progress_line(status)
    c1, c2, _ = st.columns([2, 1, 3])
    if job_state in ("queued", "running"):
        c1.button("Cancel", key="own_cancel", on_click=_cancel, args=(job_id,))
    if job_state in ("failed", "cancelled"):
        c1.button("Retry", key="own_retry", on_click=_retry, args=(job_id,),
                  help="starts again; a saved run resumes where it stopped")
    if job_state == "done" and status.get("checkpoint") in service.checkpoint_options():
        c1.button("Open it in the Model picker", key="own_open", on_click=_open_model, args=(status["checkpoint"],))
        c2.page_link("views/score.py", label="Score page", icon=":material/leaderboard:")
    epochs = status.get("epochs") or []
    if not epochs:
        if job_state == "running":
            st.caption("The charts appear after the first epoch.")
        return
    live = jobs.read_live(job_id)
    left, right = st.columns(2)
    with left:
        st.markdown(f"**Live histogram** (after epoch {epochs[-1]['epoch']}): log-likelihood of held-out and OOD "
                    "images under the model of that moment")
        if live:
            named = {("test" if k == "test" else k): v for k, v in live.items()}
            st.plotly_chart(figures.histogram(named, xlabel="log-likelihood (nats)", nbins=40, height=320),
                            key="own_histogram")
    with right:
        if any(e.get("auroc") for e in epochs):
            st.markdown("**AUROC over training** (likelihood as the score; 50 % = chance, below = OOD looks likelier)")
            st.plotly_chart(auroc_figure(epochs), key="own_auroc")
        st.markdown("**Held-out bits per dimension**")
        st.plotly_chart(figures.curve([e["epoch"] for e in epochs], [e["test_bpd"] for e in epochs], "epoch",
                                      "held-out bpd", height=240), key="own_bpd")
    sentence = trend_sentence(epochs)
    if sentence:
        st.markdown(sentence)


@st.fragment(run_every=REFRESH_SECONDS)
def live_job_view(job_id: str) -> None:
    status = jobs.read_status(job_id)
    if status.get("state") not in ("queued", "running"):
        st.rerun()  # ended: redraw the whole page once, so the sidebar lists the new model and the refresh stops
    job_view(status)


def page() -> None:
    st.title("Train on your images")
    st.markdown(
        "Does *your* data fail the way the paper says? Upload images of one kind (and, optionally, images the "
        "model should find unlikely), and a RealNVP is trained on them in the background. Every image is read the "
        "way the Score page reads it (grayscale or colour, scaled and centre-cropped), a seeded tenth is held out, "
        "and the model lands in your zoo, where every page finds it. While it trains, watch the held-out and OOD "
        "log-likelihoods move together.")
    error = st.session_state.pop("own_data_error", None)
    if error:
        st.error(error)
    status = current_job()
    if status:
        if status.get("state") in ("queued", "running"):
            live_job_view(status["job"])
        else:
            job_view(status)
        st.divider()
    request_form()
    recent = jobs.list_jobs()[:10]
    if recent:
        with st.expander(f"Recent trainings on this server ({len(recent)})"):
            st.table([{"name": s.get("name"), "state": s.get("state"), "job": s.get("job"),
                       "message": s.get("message", "")} for s in recent])


state.run_page(page)
