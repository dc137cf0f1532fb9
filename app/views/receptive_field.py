"""Receptive field: which input pixels one latent depends on, |dz_i/dx| (paper Fig. 12)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from flowcore.dashboard import figures, measure, service, state

H_KEY, W_KEY, C_KEY = "rf_h", "rf_w", "rf_c"


def picked_point(event: object) -> tuple[int, int] | None:
    """(row, col) of the first clicked point of a plotly selection event, if any."""
    try:
        points = event["selection"]["points"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    for p in points or []:
        if "x" in p and "y" in p:
            return int(round(float(p["y"]))), int(round(float(p["x"])))
    return None


def main() -> None:
    name = state.need_checkpoint()
    st.title("Receptive field")
    st.caption(
        "Click a latent (or type its position) to see how strongly it depends on each input pixel. The paper's "
        "Fig. 12 finds that a latent depends mostly on a small neighbourhood of its own pixel, even after many "
        "layers, so the likelihood is dominated by local structure (smoothness, edges) that in- and "
        "out-of-distribution images share. The line under the figure measures how local it is in this model."
    )
    label, image = state.current_image(name)
    c, h, w = service.image_shape(name)
    for key, default in ((H_KEY, h // 2), (W_KEY, w // 2), (C_KEY, 0)):
        st.session_state.setdefault(key, default)

    z = service.latent_map(name, image, 1, "eval")
    left, right = st.columns([2, 3])
    with left:
        channel = int(st.session_state[C_KEY])
        fig = figures.latent_picker(
            z[min(channel, c - 1)],
            (int(st.session_state[H_KEY]), int(st.session_state[W_KEY])),
            title="latents z: click one",
        )
        event = st.plotly_chart(fig, key="rf_pick", on_select="rerun", selection_mode="points")
        point = picked_point(event)
        if point is not None and point != st.session_state.get("rf_last_pick"):
            st.session_state["rf_last_pick"] = point
            st.session_state[H_KEY] = min(max(point[0], 0), h - 1)
            st.session_state[W_KEY] = min(max(point[1], 0), w - 1)
            st.rerun()
        n1, n2, n3 = st.columns(3)
        n1.number_input("row", 0, h - 1, key=H_KEY)
        n2.number_input("column", 0, w - 1, key=W_KEY)
        n3.number_input("channel", 0, c - 1, key=C_KEY)
    index = (int(st.session_state[C_KEY]), int(st.session_state[H_KEY]), int(st.session_state[W_KEY]))
    with right:
        t1, t2 = st.columns(2)
        show_footprint = t1.toggle("Mean footprint", value=True, key="rf_show_fp",
                                   help="Also draw the mean |dz/dx| over the sampled latent positions")
        log = t2.toggle("Log colour scale", value=False, key="rf_log", help="log10 over six decades below the peak")
        n_positions = st.slider(
            "Latent positions sampled for the footprint", 8, 256, 48, 8, key="rf_positions", disabled=not show_footprint
        )
        jac = np.abs(service.jacobian(name, image, index)).max(axis=0)
        fp = np.abs(service.footprint(name, image, n_positions)).max(axis=0) if show_footprint else None
        st.markdown(measure.locality_sentence(jac, index[1:]))
    # The maps span the page's width below both columns: in the right column alone they were a few dozen
    # pixels wide at 1024x768, with colour bars three times their height.
    # theme=None: Streamlit's theme would swap the colour scale for one that draws zero pink, not black
    st.plotly_chart(figures.jacobian_figure(image, jac, index[1:], fp, log=log, cell_height=220), key="rf_fig",
                    theme=None)
    st.caption(
        f"{label}; latent (channel {index[0]}, row {index[1]}, column {index[2]}). Colours run from 0 (black) "
        f"to this map's largest |dz/dx| (yellow). The footprint is the mean |dz/dx| over {n_positions} latents "
        "drawn at random (max over channels)."
    )


state.run_page(main)
