"""Perturbation explorer: edit the current image and watch its likelihood move."""

from __future__ import annotations

import numpy as np
import streamlit as st

from flowcore.dashboard import figures, measure, service, state
from flowcore.data import images
from flowcore.ood.verdicts import DEFAULT_FPR, judge_for

LEVELS = {
    "noise": [0.0, 2.0, 5.0, 10.0, 20.0, 40.0, 70.0, 100.0],
    "brightness": [-96.0, -64.0, -32.0, 0.0, 32.0, 64.0, 96.0],
    "contrast": [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0],
    "blur": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0],
}


def main() -> None:
    name = state.need_checkpoint()
    st.title("Perturbation explorer")
    st.caption(
        "Edit the image and watch the likelihood. The paper's explanation of why simple OOD images get high "
        "likelihoods is that a flow's likelihood tracks local smoothness more than content; the line below "
        "measures how this model answers three edits of the current image."
    )
    label, image = state.current_image(name)
    st.caption(measure.measured_edits(name, image))
    shape = service.image_shape(name)
    dims = int(np.prod(shape))
    c = st.columns(6)
    settings = {
        "noise": c[0].slider("Noise (std, grey levels)", 0.0, 100.0, 0.0, 1.0, key="pt_noise"),
        "brightness": c[1].slider("Brightness", -128.0, 128.0, 0.0, 4.0, key="pt_brightness"),
        "contrast": c[2].slider("Contrast", 0.0, 3.0, 1.0, 0.05, key="pt_contrast"),
        "blur": c[3].slider("Blur radius (pixels)", 0.0, 4.0, 0.0, 0.25, key="pt_blur"),
    }
    invert = c[4].checkbox("Invert", key="pt_invert")
    seed = int(c[5].number_input("Noise seed", 0, 10_000, 0, key="pt_seed"))
    edited = images.perturb(image, **settings, invert=invert, seed=seed)

    vary = st.radio("Likelihood curve against", list(LEVELS), horizontal=True, key="pt_vary")
    levels = LEVELS[vary]
    batch = [image, edited] + [images.perturb(image, **{**settings, vary: v}, invert=invert, seed=seed) for v in levels]
    s = service.scores(name, np.stack(batch))
    bpd = s["bpd"]
    ref = service.reference(name)
    judge = judge_for(ref, "likelihood", DEFAULT_FPR) if ref else None  # the CLI's default false-positive rate

    left, right = st.columns([2, 3])
    with left:
        st.plotly_chart(
            figures.image_grid([image, edited], ["original", "edited"], cols=2, cell_height=260), key="pt_img"
        )
        m1, m2 = st.columns(2)
        m1.metric("bits/dim, original", f"{bpd[0]:.4f}")
        change = f"{bpd[1] - bpd[0]:+.4f}"
        unchanged = change in ("+0.0000", "-0.0000")  # no arrow, no colour for an edit that changes nothing
        m2.metric("bits/dim, edited", f"{bpd[1]:.4f}", None if unchanged else change, delta_color="inverse")
        if judge is not None:
            edited_verdict = judge.judge(s["likelihood"][1])
            st.caption(f"Edited image: percentile {edited_verdict.percentile:.2f} % among test images; at "
                       f"{100 * judge.fpr:.0f} % FPR: {edited_verdict.words}.")
    with right:
        hlines = []
        if judge is not None:
            test_bpd = service.to_units(ref["test__likelihood"], "likelihood", "bpd", dims)
            hlines.append(("test median", float(np.median(test_bpd))))
            thr_bpd = float(service.to_units(judge.threshold, "likelihood", "bpd", dims))
            hlines.append((f"OOD threshold, {100 * judge.fpr:.0f} % FPR", thr_bpd))
        fig = figures.curve(levels, bpd[2:], vary, "bits/dim", current=settings[vary], hlines=hlines)
        st.plotly_chart(fig, key="pt_curve")
        st.caption(f"{label}; bits/dim as {vary} varies, the other settings as chosen (lower = more likely).")
    item = state.InputImage(
        f"{label} edited (n{settings['noise']:g} b{settings['brightness']:g} c{settings['contrast']:g} "
        f"blur{settings['blur']:g}{' inv' if invert else ''})",
        images.encode_png(edited),
        "perturbed",
        as_is=True,
    )
    st.button("Add the edited image to the inputs", key="pt_add", on_click=state.add_inputs, args=([item],))


state.run_page(main)
