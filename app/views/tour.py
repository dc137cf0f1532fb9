"""The paper in ten minutes: a guided tour of the argument, one live figure and one measured sentence a step."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import streamlit as st

from flowcore.dashboard import figures, measure, service, state

STEP_KEY = "tour_step"
TOUR_MODEL = "fashion_realnvp"  # the default model; the tour uses the one in the sidebar if it is absent
# The Sec. 7 and App. B variants of the default model (step 5): (variant, its control of the same size and
# budget, what the variant changes).
VARIANTS = [
    ("fashion_realnvp_horizontal", "fashion_realnvp_checkerboard", "horizontal masks, single scale (Fig. 15b)"),
    ("fashion_realnvp_cycle", "fashion_realnvp_checkerboard", "cycle masks, single scale (Fig. 15c)"),
    ("fashion_realnvp_bottleneck10", "fashion_realnvp_bottleneck_control", "st-net bottleneck l = 10 (Fig. 16)"),
    ("fashion_realnvp_bottleneck50", "fashion_realnvp_bottleneck_control", "st-net bottleneck l = 50 (Fig. 16)"),
    ("fashion_realnvp_bottleneck100", "fashion_realnvp_bottleneck_control", "st-net bottleneck l = 100 (Fig. 16)"),
    ("fashion_realnvp_negative", "fashion_realnvp_finetune", "negative training by eq. 7, MNIST pushed down (App. B)"),
]


def tour_model() -> str:
    options = service.checkpoint_options()
    return TOUR_MODEL if TOUR_MODEL in options else state.need_checkpoint()


def _ood_set(name: str) -> str | None:
    """The OOD set the tour follows: MNIST for a Fashion-MNIST model, else the model's first OOD set."""
    sets = [s for s in service.reference_sets(name) if s not in ("train", "test")]
    return "mnist" if "mnist" in sets else (sets[0] if sets else None)


def step_likelihood(name: str, image: np.ndarray) -> None:
    st.markdown("Does a flow's likelihood flag images unlike the ones it was trained on? "
                + measure.likelihood_finding(name))
    if not service.reference(name):
        return
    bpd = float(service.scores(name, image[None])["bpd"][0])
    fig = figures.histogram(service.score_values(name, "likelihood", "bpd"), markers=[("this image", bpd)],
                            xlabel="bits/dim (lower = more likely)")
    st.plotly_chart(fig, key="tour_hist")


def step_latents(name: str, image: np.ndarray) -> None:
    z = service.latent_map(name, image, 10, "eval")
    st.markdown("Why? A flow maps an image to latents z of the same size. " + measure.latent_sentence(image, z))
    st.plotly_chart(figures.latent_figure(image, z), key="tour_latents")


def step_locality(name: str, image: np.ndarray) -> None:
    _, h, w = service.image_shape(name)
    jac = np.abs(service.jacobian(name, image, (0, h // 2, w // 2))).max(axis=0)
    st.markdown("Which pixels does the centre latent depend on? " + measure.locality_sentence(jac, (h // 2, w // 2)))
    st.plotly_chart(figures.jacobian_figure(image, jac, (h // 2, w // 2)), key="tour_jac", theme=None)


def step_resampling(name: str, image: np.ndarray) -> None:
    box = service.box_default(service.image_shape(name))
    draws = service.resampled(name, image, box, 4, 1.0, 0)
    text, _ = measure.resampling_sentence(image, draws, box)
    st.markdown("Redraw the latents inside a box and invert: what do they store? " + text)
    images = [np.asarray(image, dtype=np.float64) / 255.0] + [figures.to_display(x) for x in draws]
    titles = ["original"] + [f"draw {i + 1}" for i in range(len(draws))]
    st.plotly_chart(figures.image_grid(images, titles, cols=5, box=box), key="tour_resample")


def step_changes(name: str, image: np.ndarray) -> None:
    ood = _ood_set(name)
    options = set(service.checkpoint_options())
    rows = []
    for variant, control, what in VARIANTS:
        if variant not in options or control not in options:
            continue
        ours, theirs = measure.likelihood_aurocs(variant).get(ood), measure.likelihood_aurocs(control).get(ood)
        if ours is not None and theirs is not None:
            rows.append({"model": variant, "change": what, "AUROC (%)": round(100 * ours, 1), "control": control,
                         "control AUROC (%)": round(100 * theirs, 1)})
    if not rows:
        st.markdown("What changes the failure? The shipped Sec. 7 / App. B variants and their controls are not "
                    "installed here.")
        return
    better = [r["model"] for r in rows if r["AUROC (%)"] > r["control AUROC (%)"]]
    st.markdown(
        f"What changes the failure? Each variant beside its control (same size, same CPU minutes), likelihood "
        f"AUROC against {ood}: "
        + (f"{', '.join(f'`{m}`' for m in better)} rank {ood} lower than their controls"
           if better else "no variant ranks it lower than its control")
        + f" ({len(better)} of {len(rows)})."
    )
    variants = pd.DataFrame(rows)
    st.table(variants.set_index(variants.columns[0]))  # tables wrap to the column: readable on a 1024x768 projector


def step_scores(name: str, image: np.ndarray) -> None:
    ood = _ood_set(name)
    table = [r for r in service.auroc_rows(name) if ood in r]
    if not table:
        st.markdown("What works instead? This model has no AUROC table yet.")
        return
    best = max(table, key=lambda r: r[ood])
    like = next((r[ood] for r in table if r["score"] == "likelihood"), None)
    st.markdown(
        f"What works instead? Scores that correct for what the flow really measures: here `{best['score']}` "
        f"separates {ood} with AUROC {100 * best[ood]:.1f} %"
        + (f", against {100 * like:.1f} % for the likelihood itself." if like is not None else ".")
    )
    df = pd.DataFrame([{"score": r["score"], f"AUROC vs {ood} (%)": round(100 * r[ood], 1)} for r in table])
    st.table(df.set_index("score"))


def step_features(name: str, image: np.ndarray) -> None:
    flows = [f for f in service.feature_checkpoints() if measure.likelihood_aurocs(f)]
    if not flows:
        st.markdown("The paper's positive answer (Sec. 8) is a flow on the features of an ImageNet-trained "
                    "classifier; no such flow with reference statistics is installed here.")
        return
    st.markdown("The paper's positive answer (Sec. 8): the same kind of flow, trained on the features an "
                "ImageNet classifier computes for each image rather than on its pixels.")
    for flow in flows:
        pixels = service.pixel_counterparts(flow)
        best = measure.best_feature_score(flow)  # the flow or a baseline on its features, whichever is best
        st.markdown(measure.features_finding(flow, pixels, best))
        rows = {f"{flow}: {measure.FEATURE_SCORES[s]}": row for s, row in measure.feature_score_aurocs(flow).items()}
        rows.update({f"{p} (pixels)": measure.likelihood_aurocs(p) for p in pixels})
        st.table((pd.DataFrame(rows) * 100).round(1))
        if best != "likelihood":
            st.caption(measure.baselines_finding(flow))
    st.page_link("views/features.py", label="Score your own images with both", icon=":material/verified:")
    st.page_link("views/train_own.py", label="Or train a flow on your own images and watch it happen",
                 icon=":material/model_training:")


STEPS: list[tuple[str, Callable[[str, np.ndarray], None]]] = [
    ("1. The likelihood fails (Fig. 1, 8)", step_likelihood),
    ("2. The latents still look like the image (Fig. 10)", step_latents),
    ("3. Each latent depends on a neighbourhood (Fig. 12)", step_locality),
    ("4. Latents store local, not global, information (Fig. 17)", step_resampling),
    ("5. What changes it: masks, bottleneck, negative training (Sec. 7, App. B)", step_changes),
    ("6. What helps: scores that correct the likelihood", step_scores),
    ("7. What works: a flow on features (Sec. 8)", step_features),
]


def main() -> None:
    st.title("The paper in ten minutes")
    name = tour_model()
    step = min(max(int(st.session_state.get(STEP_KEY, 0)), 0), len(STEPS) - 1)
    st.caption(
        f"Kirichenko, Izmailov and Wilson (2020), step by step, on `{name}`. Every sentence below is computed "
        f"now for this model; where it does not show the paper's effect, the sentence says so. Step {step + 1} "
        f"of {len(STEPS)}."
    )
    back, _, forward = st.columns([1, 4, 1])
    back.button("Back", key="tour_back", disabled=step == 0, on_click=st.session_state.__setitem__,
                args=(STEP_KEY, step - 1))
    forward.button("Next", key="tour_next", disabled=step == len(STEPS) - 1, on_click=st.session_state.__setitem__,
                   args=(STEP_KEY, step + 1))
    title, draw = STEPS[step]
    st.subheader(title)
    label, image = state.current_image(name)
    draw(name, image)
    st.caption(f"Image: {label}. Pick another model in the sidebar or add images on the Inputs page.")


state.run_page(main)
