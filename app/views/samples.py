"""Samples: images drawn from the model at a temperature (paper Fig. 18)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from flowcore.dashboard import figures, service, state
from flowcore.data import images


def main() -> None:
    name = state.need_checkpoint()
    st.title("Samples")
    st.caption(
        "Draw z from a Gaussian with standard deviation T (the temperature) and invert the flow. Samples show "
        "what the model has learned; lower temperatures give smoother, more 'typical' images. Their "
        "likelihood is compared with the test images below."
    )
    c1, c2, c3 = st.columns(3)
    temperature = c1.slider("Temperature", 0.0, 1.5, 0.7, 0.05, key="samples_temperature")
    seed = int(c2.number_input("Seed", 0, 10_000, 0, key="samples_seed"))
    n = c3.slider("Number", 4, 32, 16, 4, key="samples_n")
    x = service.samples(name, n, temperature, seed)
    # rows about as tall as an image is wide on a laptop or projector: 150 px rows left wide gaps at 1024x768
    st.plotly_chart(figures.image_grid(list(x), cols=8, cell_height=110), key="samples_fig")
    s = service.scores(name, x)
    ref = service.reference(name)
    text = f"Median bits/dim of these samples: {np.median(s['bpd']):.3f}"
    if "test__bpd" in ref:
        text += f"; of the test images: {np.median(ref['test__bpd']):.3f}."
    st.caption(text)
    items = [
        state.InputImage(f"sample T={temperature:g} seed={seed} #{i}", images.encode_png(a), "sample", as_is=True)
        for i, a in enumerate(x)
    ]
    st.button("Add these samples to the inputs", key="samples_add", on_click=state.add_inputs, args=(items,))


state.run_page(main)
