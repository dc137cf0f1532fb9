"""Guide: what each view shows and which finding of Kirichenko et al. (2020) it demonstrates."""

from __future__ import annotations

import streamlit as st

from flowcore.dashboard import service, state

GUIDE = """
A **normalizing flow** turns an image *x* into latents *z* of the same size through a chain of invertible
layers, and so can compute the exact likelihood of *x*. One would expect a flow trained on clothing
(Fashion-MNIST) to give handwritten digits (MNIST) a *low* likelihood, and so to detect them as
out-of-distribution (OOD). It does not: digits get a *higher* likelihood. Kirichenko, Izmailov and Wilson
(2020), *Why Normalizing Flows Fail to Detect Out-of-Distribution Data*, explain why: flows learn **local
pixel correlations and generic image transformations**, which every natural image shares, rather than the
meaning of the images they were trained on. Each view of this dashboard shows one piece of that story.

**The paper in ten minutes**. A guided tour of the argument in seven steps, each with one live figure or table
and a sentence measured on the shipped default model: a ready-made class demo.

**Score** (paper Fig. 1, 8). Histograms of the model's likelihood (bits/dim or nats) on its train and test
images and on OOD sets, with your images as vertical lines; the percentile among test images and a verdict
at a chosen false-positive rate. Look for: the OOD sets sitting at *lower* bits/dim (higher likelihood)
than the test set, and AUROC values below 0.5. Other scores (input complexity, typicality, likelihood
ratio, last-scale density) try to fix this; compare their AUROC with raw likelihood. A model with a flow on
features trained on the same data (e.g. `cifar10_realnvp`) also offers that flow's likelihood,
`embedding_likelihood` (Sec. 8).

**What works: flows on features** (Sec. 8). The paper's positive result: the same kind of flow, trained on the
features an ImageNet classifier computes for each image (EfficientNet-Lite0 here), ranks OOD images lower.
Its AUROCs beside the pixel flows' on the same data, your images with both verdicts, the reference
likelihoods and a 2-D view of the features with your images marked.

**Train on your images** (Sec. 6). Does *your* data fail the same way? Upload images of one kind (several
files or a zip) and, optionally, images the model should find unlikely; a RealNVP trains on them in its own
process (a reload does not stop it; one training at a time per server, a second one is queued and told so).
Every few seconds the page redraws the held-out bpd, the histogram of held-out against OOD log-likelihoods
under the model of that moment, and the AUROC per epoch, with a sentence computed from the recorded medians:
the paper's observation is that the OOD likelihood rises together with the in-distribution one. The finished
model appears in the Model picker, so every other page can inspect it. `flowcore train --images DIR` does the
same from the command line.

**Inputs**. What the model is really given: each preprocessing step of your upload (mode, size, inversion),
dataset examples, the model's own samples and a drawing canvas. Everything added here is used by every page.

**Compare models**. The same inputs under two checkpoints (e.g. RealNVP and Glow): the failure is shared by
both families.

**Perturbation explorer**. Noise, brightness, contrast, blur and inversion with a live likelihood curve.
The paper's reading: noise makes an image much less likely while smoothing can make it *more* likely, because
the likelihood measures local smoothness, not content; the page measures what the current model does.

**Latents** (Fig. 10). The input next to its latents *z*, pixel by pixel. The paper finds that *z* still
looks like the image (the flow has not abstracted away from pixels), more clearly with BatchNorm in train mode;
the page measures the correlation of *z* with the image for the current model.

**Coupling layers** (Fig. 11, 13). Each coupling's input, scale *s*, shift *t* and output. Look for: *s* and
*t* are edge maps or shifted copies of the image: the layers predict a pixel from its neighbours
("coupling layer co-adaptation"), whatever the image shows.

**Receptive field** (Fig. 12). Click a latent to see which input pixels it depends on. The paper finds a small
neighbourhood around the same pixel; the page measures how many pixels hold 90 % of the influence.

**Patch resampling** (Fig. 17). Redraw the latents inside a box and invert. In the paper only the
box changes, filled in to match its surroundings; the page measures how many pixels change inside and outside
the box (multi-scale models mix a wider area).

**Samples** (Fig. 18). Images drawn from the model at a temperature, with their likelihood.

*Bits per dimension* (bpd) = -log2 P(x) divided by the number of pixel values; lower means more likely.
*AUROC* = the probability that a random in-distribution test image scores higher than a random OOD image:
1 is perfect detection, 0.5 is chance, below 0.5 means the OOD images look *more* in-distribution.
"""


# Which shipped checkpoint to pick (sidebar) for which finding; only those present are listed.
ZOO_TOUR = {
    "fashion_realnvp": "the default: trained on Fashion-MNIST, it gives MNIST digits a higher likelihood (Fig. 1).",
    "fashion_glow": "the same failure in a Glow: it is not specific to one architecture (Table 1).",
    "mnist_realnvp": "the other direction: trained on MNIST, it does separate Fashion-MNIST and notMNIST.",
    "mnist_glow": "the same direction in a Glow, for the Glow column of Table 1.",
    "fashion_realnvp_checkerboard": "single scale, checkerboard masks: the same-size control of the horizontal"
    " and cycle models (Fig. 15), trained for the same minutes.",
    "fashion_realnvp_horizontal": "horizontal masks (App. G): same failure; the coupling views are easy to read.",
    "fashion_realnvp_cycle": "cycle-mask (App. I, Sec. 7): pixels cannot see their neighbours; compare it with the"
    " checkerboard and horizontal ones, which have the same size and budget.",
    "fashion_realnvp_bottleneck10": "every st-net squeezed through 10 numbers (Sec. 7, Fig. 16): less room for"
    " generic pixel prediction; compare it with fashion_realnvp_bottleneck_control.",
    "fashion_realnvp_bottleneck50": "the same with a bottleneck of 50 numbers.",
    "fashion_realnvp_bottleneck100": "the same with a bottleneck of 100 numbers.",
    "fashion_realnvp_bottleneck_control": "the bottleneck models' control: same st-nets without the bottleneck,"
    " trained for the same minutes.",
    "fashion_realnvp_negative": "negative training by eq. 7 (App. B): MNIST was pushed down in training; compare"
    " notMNIST, which it never saw, and the control fashion_realnvp_finetune (docs/results.md has the numbers).",
    "fashion_realnvp_finetune": "the negative model's control: the same fine-tune of fashion_realnvp without the"
    " OOD term.",
    "mnist_realnvp_negative": "negative training the other way: Fashion-MNIST pushed down under an MNIST model.",
    "mnist_realnvp_finetune": "its control: the same fine-tune of mnist_realnvp without the OOD term.",
    "fashion_realnvp_background": "a background model trained on noised images, for the likelihood-ratio score.",
    "cifar10_realnvp": "RGB 32x32, trained on exact CIFAR-10: Table 1's CIFAR-10 row (CelebA, and the grayscale"
    " sets under the cross-domain rule); its card has the numbers.",
    "cifar10_glow": "a Glow on CIFAR-10, for the Glow column of Table 1 (its card says which data it was trained on).",
    "celeba_realnvp": "RGB 32x32, trained on CelebA faces.",
    "celeba_glow": "a Glow on CelebA faces, for the Glow column of Table 1.",
}


def main() -> None:
    st.title("Guide")
    st.caption("A short classroom tour: what each view shows and which finding of the paper it demonstrates.")
    st.markdown(GUIDE)
    shipped = [name for name in ZOO_TOUR if name in service.checkpoint_options()]
    if shipped:
        st.subheader("Which model shows what")
        st.markdown("\n".join(f"- `{name}`: {ZOO_TOUR[name]}" for name in shipped))
        st.caption("Pick a model in the sidebar; docs/results.md has every model's numbers.")


state.run_page(main)
