"""Inputs: your images and how each is preprocessed, a gallery of examples, the model's samples, a canvas."""

from __future__ import annotations

import os

import streamlit as st

from flowcore.dashboard import service, state
from flowcore.data import images
from flowcore.data.datasets import DatasetNotFound, set_label

GALLERY_N = 8
DETAILED = 24


def your_images(name: str) -> None:
    good, bad = state.prepared_inputs(service.image_shape(name))
    state.show_input_errors(bad)
    if not good and not bad:
        st.info("No images yet. Upload in the sidebar, or add examples from the gallery below.")
        return
    invert, fit = state.preprocessing_options()
    st.caption(
        f"Each image is decoded, converted to the model's channels, fitted ({fit}) to its size and, for "
        f"gray models, inverted when it is dark-on-light (invert: {invert}; gallery images and samples are "
        "taken as they are). The last step is exactly what the model is given."
    )
    current = st.session_state.get(state.CURRENT_KEY)
    for item, p in good[:DETAILED]:
        title = f"{item.name} ({item.source})" + (" - inverted" if p.inverted else "")
        with st.expander(title, expanded=item.key == current or len(good) == 1):
            cols = st.columns(len(p.steps) + (0 if item.source == "upload" else 1))
            for col, (label, img) in zip(cols, p.steps, strict=False):
                col.image(img, caption=label)
            if item.source != "upload":
                cols[-1].button("Remove", key=f"remove_{item.key}", on_click=state.remove_input, args=(item.key,))
    if len(good) > DETAILED:
        st.caption(f"... and {len(good) - DETAILED} more (all of them are scored on the Score page).")
    if any(item.source != "upload" for item, _ in good):
        st.button("Remove all added images", on_click=state.clear_added, key="clear_added")


def gallery(name: str) -> None:
    shape = service.image_shape(name)
    st.caption(
        "The first test images of the model's own dataset and of its OOD sets, fitted to the model's input by "
        "the project's cross-domain rule: from `FLOWCORE_DATA_DIR` when it holds the set, else the 16 examples "
        "bundled with flowcore."
    )
    data_dir = os.environ.get("FLOWCORE_DATA_DIR")
    dataset = service.config(name).get("dataset")
    for ds in service.gallery_sets(name):
        label = set_label(ds)
        kind = "in-distribution" if ds == dataset else "OOD"
        try:
            examples, bundled = service.gallery_images(ds, shape, GALLERY_N, data_dir)
        except (DatasetNotFound, ValueError, OSError) as e:
            st.markdown(f"**{label}** ({kind}): not available.")
            st.caption(state.one_line(e))
            continue
        st.markdown(f"**{label}** ({kind}{', bundled examples' if bundled else ''})")
        cols = st.columns([6, 1])
        cols[0].image([images.thumbnail(x, 84) for x in examples], width=84)
        items = [
            state.InputImage(f"{label} #{i}", images.encode_png(x), f"gallery: {label}", as_is=True)
            for i, x in enumerate(examples)
        ]
        cols[1].button(f"Add these {len(items)}", key=f"add_{label}", on_click=state.add_inputs, args=(items,))

    st.markdown("**The model's own samples**")
    c1, c2 = st.columns(2)
    temperature = c1.slider("Temperature", 0.0, 1.2, 0.7, 0.05, key="gallery_temperature")
    seed = int(c2.number_input("Seed", 0, 10_000, 0, key="gallery_seed"))
    x = service.samples(name, GALLERY_N, temperature, seed)
    cols = st.columns([6, 1])
    cols[0].image([images.thumbnail(s, 84) for s in x], width=84)
    items = [
        state.InputImage(f"sample T={temperature:g} seed={seed} #{i}", images.encode_png(s), "sample", as_is=True)
        for i, s in enumerate(x)
    ]
    cols[1].button("Add samples", key="add_samples", on_click=state.add_inputs, args=(items,))


def canvas(name: str) -> None:
    shape = service.image_shape(name)
    if tuple(shape[1:]) != (28, 28):
        st.caption("The drawing canvas is offered for 28x28 models.")
        return
    try:
        from streamlit_drawable_canvas import st_canvas  # registers its component: import inside the page only
    except Exception:
        st.info("Install `streamlit-drawable-canvas` to draw a digit or a garment here.")
        return
    st.caption("Draw light on dark, as in MNIST; the drawing is scaled down to 28x28 like any upload.")
    result = st_canvas(
        stroke_width=22,
        stroke_color="#FFFFFF",
        background_color="#000000",
        height=280,
        width=280,
        drawing_mode="freedraw",
        return_image_data=True,
        key="canvas",
    )
    drawn = result is not None and bool((result.json_data or {}).get("objects"))
    data = result.image_bytes if drawn else None
    n = sum(1 for i in state.all_inputs() if i.source == "drawing")
    item = state.InputImage(f"drawing {n + 1}", data, "drawing") if data else None
    st.button("Use this drawing", disabled=item is None, on_click=state.add_inputs, args=([item] if item else [],))


def main() -> None:
    name = state.need_checkpoint()
    st.title("Inputs")
    st.caption(
        "Everything you add here is shared by every page. Upload files in the sidebar; add dataset examples "
        "or the model's own samples from the gallery; draw on the canvas."
    )
    n = len(state.all_inputs())
    mine, examples, draw = st.tabs([f"Your images ({n})", "Gallery", "Draw"])
    with mine:
        state.run_page(lambda: your_images(name))
    with examples:
        state.run_page(lambda: gallery(name))
    with draw:
        state.run_page(lambda: canvas(name))


state.run_page(main)
