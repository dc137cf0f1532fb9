"""Patch resampling: redraw the latents inside a box and invert (paper Fig. 17)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from flowcore.dashboard import figures, measure, service, state

# A shipped single-scale model, whose latents each belong to one pixel: resampling keeps the outside there.
SINGLE_SCALE = "fashion_realnvp_horizontal"


def main() -> None:
    name = state.need_checkpoint()
    st.title("Patch resampling")
    st.caption(
        "Replace the latents inside a box by fresh Gaussian draws, keep all the others, and map back to an "
        "image. The paper's Fig. 17 shows the pixels of the box redrawn to match their surroundings and the rest "
        "kept: latents encode local pixel information, not the global content of the image. The line under the "
        "figure measures how far this model keeps the outside."
    )
    label, image = state.current_image(name)
    c, h, w = service.image_shape(name)
    top0, left0, bh0, bw0 = service.box_default((c, h, w))
    cols = st.columns(4)
    top = int(cols[0].number_input("Top", 0, h - 1, top0, key="rs_top"))
    left = int(cols[1].number_input("Left", 0, w - 1, left0, key="rs_left"))
    bh = int(cols[2].number_input("Height", 1, h, bh0, key="rs_h"))
    bw = int(cols[3].number_input("Width", 1, w, bw0, key="rs_w"))
    asked = (bh, bw)
    bh, bw = min(bh, h - top), min(bw, w - left)
    if (bh, bw) != asked:
        st.info(f"The box is cut at the image's edge: {bh}x{bw} pixels are used (asked {asked[0]}x{asked[1]}).")
    s1, s2, s3 = st.columns(3)
    temperature = s1.slider("Temperature", 0.0, 1.5, 1.0, 0.05, key="rs_temperature")
    n = s2.slider("Draws", 1, 16, 8, key="rs_n")
    seed = int(s3.number_input("Seed", 0, 10_000, 0, key="rs_seed"))
    box = (top, left, bh, bw)
    out = service.resampled(name, image, box, n, temperature, seed)
    images = [np.asarray(image, dtype=np.float64) / 255.0] + [figures.to_display(x) for x in out]
    titles = ["original"] + [f"draw {i + 1}" for i in range(len(out))]
    # at most five a row: nine in a row were 50 pixels wide each on a 1024x768 projector
    st.plotly_chart(figures.image_grid(images, titles, cols=min(5, len(images)), box=box), key="rs_fig")
    st.caption(f"{label}; box top {top}, left {left}, {bh}x{bw} pixels (cyan), temperature {temperature:g}.")
    text, outside = measure.resampling_sentence(image, out, box)
    st.markdown(text)
    if outside > measure.KEPT_OUTSIDE and SINGLE_SCALE in service.checkpoint_options() and name != SINGLE_SCALE:
        st.button(f"Try the single-scale `{SINGLE_SCALE}`", key="rs_single",
                  on_click=st.session_state.__setitem__, args=(state.CHECKPOINT_KEY, SINGLE_SCALE))


state.run_page(main)
