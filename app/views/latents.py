"""Latents: the input next to its latent representation z in image layout (paper Fig. 10)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import figures, state
from flowcore.likelihood import as_image_tensor


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
    m = state.model(name)
    c1, c2 = st.columns(2)
    n_draws = c1.slider("Dequantization draws averaged", 1, 100, 40, key="latent_draws")
    bn = state.has_batchnorm(m)
    train_mode = c2.toggle(
        "BatchNorm in train mode",
        value=False,
        key="latent_bn",
        disabled=not bn,
        help="Normalise the st-networks with the statistics of a batch (this image and the model's test images) "
        "instead of the running ones, as Fig. 10 does." if bn
        else "This model has no BatchNorm (Glow uses ActNorm).",
    )
    z = state.latent_map(name, image, n_draws, "train" if train_mode and bn else "eval")
    st.plotly_chart(figures.latent_figure(image, z), key="latent_fig")
    finite = z[np.isfinite(z)]
    batch_note = ""
    if train_mode and bn:
        batch_note = f" BatchNorm statistics from a batch of this image and {state.batchnorm_companions(name)[1]}."
    st.caption(
        f"{label}. z averaged over {n_draws} draws of dequantization noise; "
        f"mean {finite.mean():.3f}, std {finite.std():.3f} (a standard normal has 0 and 1). "
        f"Blue negative, red positive; hover for values.{batch_note}"
    )
    r = image_correlation(image, z)
    if abs(r) >= 0.5:
        verdict = "z clearly follows the image, as in Fig. 10"
    elif abs(r) >= 0.25:
        verdict = "z follows the image only weakly"
    else:
        verdict = "z looks little like the image here, unlike the paper's larger models in Fig. 10"
    st.markdown(f"Measured: the correlation of z with the image's pixels is **r = {r:.2f}**: {verdict}.")


def image_correlation(image: np.ndarray, z: np.ndarray) -> float:
    """Pearson correlation of the latents ``(C, H, W)`` with the uint8 image's pixels in the same layout."""
    x = as_image_tensor(np.asarray(image)[None])[0].numpy().astype(np.float64).ravel()
    zz = np.asarray(z, dtype=np.float64).ravel()
    ok = np.isfinite(zz)
    if ok.sum() < 2 or x[ok].std() == 0 or zz[ok].std() == 0:
        return 0.0
    return float(np.corrcoef(x[ok], zz[ok])[0, 1])


state.run_page(main)
