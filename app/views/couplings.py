"""Coupling layers: every affine coupling's input, s, t and output in image layout (paper Fig. 11, 13)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from flowcore.dashboard import figures, service, state


@service.per_checkpoint(max_entries=16)
def _figure(name: str, image: np.ndarray, layers: tuple[str, ...], scale_field: str, channel: int) -> go.Figure:
    """The coupling grid of the chosen layers, built once per choice: a 10-layer grid has 40 heatmaps and
    plotly takes a few hundred milliseconds to build it, the largest part of a revisit. Kept as the object
    itself (never pickled): unpickling a plotly figure validates it all again."""
    fields = ("input", scale_field, "t", "output")
    rows = [(r["name"], {f: r[f][channel] for f in fields}) for r in service.trace(name, image) if r["name"] in layers]
    return figures.coupling_grid(rows, fields=fields)


def main() -> None:
    name = state.need_checkpoint()
    st.title("Coupling layers")
    st.caption(
        "Each affine coupling keeps half of the values, and from them predicts a scale s and shift t for the "
        "other half: output = input x exp(log s) + t. The paper's Fig. 11 and 13: s and t look like the image "
        "itself (its edges, a shifted copy), so each coupling predicts pixels from their neighbours: the flow "
        "learns local pixel correlations and 'copies' the image between layers (coupling co-adaptation), not "
        "what the object is. Values are in the flow's logit space; blank cells are positions a layer leaves "
        "unchanged."
    )
    label, image = state.current_image(name)
    records = service.trace(name, image)
    shape = service.image_shape(name)
    c1, c2, c3 = st.columns([3, 1, 1])
    names = [r["name"] for r in records]
    chosen = c1.multiselect("Layers", names, default=names, key="coupling_layers")
    scale_field = c2.radio("Scale as", ["log_s", "scale"], horizontal=True, key="coupling_scale")
    channel = 0
    if shape[0] > 1:
        channel = int(c3.selectbox("Channel", list(range(shape[0])), key="coupling_channel"))
    picked = [r for r in records if r["name"] in chosen]
    if not picked:
        st.info("Pick at least one layer.")
        return
    st.plotly_chart(_figure(name, image, tuple(chosen), scale_field, channel), key="coupling_fig")
    st.caption(f"{label}; {len(picked)} of {len(records)} couplings, channel {channel}. Hover for values.")
    with st.expander("Per-layer summary"):
        st.dataframe(
            pd.DataFrame(
                {
                    "layer": [r["name"] for r in records],
                    "scale": [r["scale_index"] for r in records],
                    "mask": [r["mask"] for r in records],
                    "layer shape (C, H, W)": [str(r["layer_shape"]) for r in records],
                    "log|det| (nats)": [round(r["log_det"], 3) for r in records],
                    "positions changed": [int(r["transformed"].sum()) for r in records],
                }
            ),
            hide_index=True,
        )


state.run_page(main)
