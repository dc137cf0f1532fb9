"""Latents: the input next to its latent representation z in image layout (paper Fig. 10)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from flowcore.dashboard import figures, measure, service, state
from flowcore.inspection.probes import latent_image_correlation


def main() -> None:
    name = state.need_checkpoint()
    st.title("Latents")
    st.caption(
        "The flow maps an image x to latents z of the same size, laid out here at the pixel each latent "
        "belongs to. The paper's Fig. 10 finds that z still looks like the image: the flow has not abstracted "
        "away from pixels but models local pixel correlations, which every natural image shares, and that is why "
        "OOD images can get a high likelihood; with BatchNorm in train mode (statistics of a batch instead of "
        "the training set) the structure is clearer. The line under the figure measures it for this model."
    )
    label, image = state.current_image(name)
    m = service.model(name)
    c1, c2 = st.columns(2)
    n_draws = c1.slider("Dequantization draws averaged", 1, 100, 40, key="latent_draws")
    bn = service.has_batchnorm(m)
    train_mode = c2.toggle(
        "BatchNorm in train mode",
        value=False,
        key="latent_bn",
        disabled=not bn,
        help="Normalise the st-networks with the statistics of a batch (this image and the model's test images) "
        "instead of the running ones, as Fig. 10 does." if bn
        else "This model has no BatchNorm (Glow uses ActNorm).",
    )
    z = service.latent_map(name, image, n_draws, "train" if train_mode and bn else "eval")
    st.plotly_chart(figures.latent_figure(image, z), key="latent_fig")
    finite = z[np.isfinite(z)]
    batch_note = ""
    if train_mode and bn:
        batch_note = f" BatchNorm statistics from a batch of this image and {service.batchnorm_companions(name)[1]}."
    st.caption(
        f"{label}. z averaged over {n_draws} draws of dequantization noise; "
        f"mean {finite.mean():.3f}, std {finite.std():.3f} (a standard normal has 0 and 1). "
        f"Blue negative, red positive; hover for values.{batch_note}"
    )
    st.markdown(measure.latent_sentence(image, z))
    labels = service.latent_scales(name)
    if len(np.unique(labels)) > 1:
        st.markdown("**Each scale's factored-out latents**")
        correlations = [latent_image_correlation(image, np.where(labels == s, z, np.nan)) for s in np.unique(labels)]
        st.plotly_chart(figures.scale_latents_figure(z, labels, correlations), key="latent_scales")
        st.caption("A multi-scale flow factors out half of its latents after each scale: scale 1's were computed "
                   "from the image after the fewest layers. Each panel shows only the latents of one scale, at the "
                   "pixels they belong to (averaged over channels); r is their correlation with those pixels.")


state.run_page(main)
