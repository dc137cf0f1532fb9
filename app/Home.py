"""flowcore dashboard entry point: ``streamlit run app/Home.py`` (or ``flowcore app``).

The sidebar holds what every page shares: the model picker with its card, the image uploader, the
preprocessing options and the image the single-image views inspect. Pages live in ``app/views/``, not
``pages/``: with ``st.navigation``, a ``pages/`` folder beside the entry script makes AppTest's reruns
fall back to Streamlit's legacy multipage mode, which runs a page without this file.
"""

from __future__ import annotations

import os

import streamlit as st

from flowcore.dashboard import service, state
from flowcore.data.datasets import set_label
from flowcore.flows.config import describe_architecture
from flowcore.flows.models import count_parameters
from flowcore.zoo.checkpoints import describe_stop

PAGES = {
    "Likelihood and OOD": [
        st.Page("views/score.py", title="Score", icon=":material/leaderboard:", default=True),
        st.Page("views/inputs.py", title="Inputs", icon=":material/add_photo_alternate:"),
        st.Page("views/compare.py", title="Compare models", icon=":material/compare:"),
        st.Page("views/perturb.py", title="Perturbation explorer", icon=":material/tune:"),
        st.Page("views/features.py", title="What works: flows on features", icon=":material/verified:"),
        st.Page("views/train_own.py", title="Train on your images", icon=":material/model_training:"),
    ],
    "Inside the flow": [
        st.Page("views/latents.py", title="Latents", icon=":material/grid_on:"),
        st.Page("views/couplings.py", title="Coupling layers", icon=":material/layers:"),
        st.Page("views/receptive_field.py", title="Receptive field", icon=":material/filter_center_focus:"),
        st.Page("views/resampling.py", title="Patch resampling", icon=":material/auto_fix_high:"),
        st.Page("views/samples.py", title="Samples", icon=":material/casino:"),
    ],
    "Help": [
        st.Page("views/tour.py", title="The paper in ten minutes", icon=":material/slideshow:"),
        st.Page("views/guide.py", title="Guide", icon=":material/school:"),
    ],
}


def model_card(name: str) -> None:
    """Data, architecture, parameters, test bpd and the AUROC table of one checkpoint."""
    cfg = service.config(name)
    ref = cfg.get("reference") or {}
    ood = ", ".join(set_label(str(s)) for s in cfg.get("ood") or []) or "-"
    lines = [
        f"**Data**: {set_label(str(cfg.get('dataset', 'unknown')))}; OOD sets: {ood}",
        f"**Architecture**: {describe_architecture(cfg['model'])}",
        f"**Parameters**: {count_parameters(service.model(name)):,}",
    ]
    if ref:
        counts = ref.get("counts") or {}
        lines.append(
            f"**Test bpd**: mean {ref.get('bpd_mean')}, median {ref.get('bpd_median')} "
            f"({counts.get('test', '?')} test images)"
        )
    elif (cfg.get("metrics") or {}).get("test_bpd_subset") is not None:
        lines.append(f"**Test bpd** (training subset): {cfg['metrics']['test_bpd_subset']}")
    training = cfg.get("training") or {}
    if training:
        lines.append(
            f"**Training**: {training.get('epochs_completed', '?')} epochs, "
            f"{training.get('cpu_minutes', '?')} CPU min, {describe_stop(training)}"
        )
    if cfg.get("background"):
        lines.append(f"**Background model**: {cfg['background']}")
    st.markdown("  \n".join(lines))
    table = service.auroc_percent_table(name)
    if table is not None:
        st.caption("AUROC % (in-distribution = positive; 50 = chance, below 50 = OOD looks *more* likely)")
        st.table(table)
    else:
        st.caption(f"No reference statistics yet: run `flowcore evaluate {name}`.")


def sidebar() -> None:
    options = service.checkpoint_options()
    if not options:
        st.warning(service.no_checkpoint_message())
        return
    if st.session_state.get(state.CHECKPOINT_KEY) not in options:
        st.session_state[state.CHECKPOINT_KEY] = service.default_checkpoint(options)
    wanted = os.environ.get("FLOWCORE_DEFAULT_CHECKPOINT")
    if wanted and wanted not in options:
        st.warning(f"Checkpoint {wanted!r} not found; showing {st.session_state[state.CHECKPOINT_KEY]}.")

    def label(n: str) -> str:
        try:
            cfg = service.config(n)
            return f"{n} ({set_label(str(cfg.get('dataset', '?')))}, {cfg['model'].get('arch', '?')})"
        except Exception:  # an unreadable checkpoint is still listed; picking it shows the reason
            return f"{n} (unreadable)"

    name = st.selectbox("Model", options, key=state.CHECKPOINT_KEY, format_func=label)
    with st.expander("Model card", expanded=False):
        state.run_page(lambda: model_card(name))

    st.file_uploader(
        "Add images (PNG, JPEG, GIF, BMP, WebP, TIFF)",
        type=state.IMAGE_TYPES,
        accept_multiple_files=True,
        key=state.UPLOAD_KEY,
        help="Upload one image or many; a batch gets a sortable table and a CSV on the Score page.",
    )
    c1, c2 = st.columns(2)
    c1.radio("Invert", ["auto", "yes", "no"], key=state.INVERT_KEY, help="auto: dark-on-light gray images")
    c2.radio("Fit", ["crop", "pad"], key=state.FIT_KEY, help="centre-crop or pad to the model's size")
    # only inputs this model can read: an unreadable upload must not stay selected while a page shows another
    inputs = [item for item, _ in state.prepared_inputs(service.image_shape(name))[0]] if state.all_inputs() else []
    if inputs:
        keys = [i.key for i in inputs]
        names = {i.key: f"{i.name} ({i.source})" for i in inputs}
        if st.session_state.get(state.CURRENT_KEY) not in keys:
            st.session_state[state.CURRENT_KEY] = keys[0]
        st.selectbox("Image to inspect", keys, key=state.CURRENT_KEY, format_func=lambda k: names.get(k, k))
    else:
        st.caption("No image yet: single-image views use the first test image. Add some on the Inputs page.")


st.set_page_config(page_title="flowcore: why flows fail at OOD detection", page_icon="🌀", layout="wide")
page = st.navigation(PAGES)
with st.sidebar:
    state.run_page(sidebar)
page.run()
