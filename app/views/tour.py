"""The paper in ten minutes: a guided tour of the argument, one live figure and one measured sentence a step."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import streamlit as st

from app import figures, measure, state

STEP_KEY = "tour_step"
TOUR_MODEL = "fashion_realnvp"  # the default model; the tour uses the one in the sidebar if it is absent
# The Sec. 7 and App. B variants of the default model, with what each changes (step 5).
VARIANTS = {
    "fashion_realnvp": "baseline (checkerboard masks, multi-scale)",
    "fashion_realnvp_horizontal": "single scale, horizontal masks (Fig. 15b)",
    "fashion_realnvp_cycle": "single scale, cycle masks (Fig. 15c)",
    "fashion_realnvp_bottleneck": "st-net bottleneck l = 10 (Fig. 16)",
    "fashion_realnvp_negative": "negative training, MNIST pushed down (App. B)",
}


def tour_model() -> str:
    options = state.checkpoint_options()
    return TOUR_MODEL if TOUR_MODEL in options else state.need_checkpoint()


def _ood_set(name: str) -> str | None:
    """The OOD set the tour follows: MNIST for a Fashion-MNIST model, else the model's first OOD set."""
    sets = [s for s in state.reference_sets(name) if s not in ("train", "test")]
    return "mnist" if "mnist" in sets else (sets[0] if sets else None)


def step_likelihood(name: str, image: np.ndarray) -> None:
    st.markdown(measure.likelihood_finding(name))
    if not state.reference(name):
        return
    fig = figures.histogram(state.score_values(name, "likelihood", "bpd"), xlabel="bits/dim (lower = more likely)")
    st.plotly_chart(fig, key="tour_hist")


def step_latents(name: str, image: np.ndarray) -> None:
    z = state.latent_map(name, image, 10, "eval")
    st.markdown("Why? A flow maps an image to latents z of the same size. " + measure.latent_sentence(image, z))
    st.plotly_chart(figures.latent_figure(image, z), key="tour_latents")


def step_locality(name: str, image: np.ndarray) -> None:
    _, h, w = state.image_shape(name)
    jac = np.abs(state.jacobian(name, image, (0, h // 2, w // 2))).max(axis=0)
    st.markdown("Which pixels does the centre latent depend on? " + measure.locality_sentence(jac, (h // 2, w // 2)))
    st.plotly_chart(figures.jacobian_figure(image, jac, (h // 2, w // 2)), key="tour_jac", theme=None)


def step_resampling(name: str, image: np.ndarray) -> None:
    box = state.box_default(state.image_shape(name))
    draws = state.resampled(name, image, box, 4, 1.0, 0)
    text, _ = measure.resampling_sentence(image, draws, box)
    st.markdown("Redraw the latents inside a box and invert: what do they store? " + text)
    images = [np.asarray(image, dtype=np.float64) / 255.0] + [figures.to_display(x) for x in draws]
    titles = ["original"] + [f"draw {i + 1}" for i in range(len(draws))]
    st.plotly_chart(figures.image_grid(images, titles, cols=5, box=box), key="tour_resample")


def step_changes(name: str, image: np.ndarray) -> None:
    ood = _ood_set(name)
    rows = []
    for variant, what in VARIANTS.items():
        if variant not in state.checkpoint_options():
            continue
        auroc = ((state.config(variant).get("reference") or {}).get("auroc") or {}).get("likelihood", {})
        if ood in auroc:
            column = f"likelihood AUROC vs {ood} (%)"
            rows.append({"model": variant, "change": what, column: round(100 * auroc[ood], 1)})
    if len(rows) < 2:
        st.markdown("What changes the failure? The shipped Sec. 7 / App. B variants are not installed here.")
        return
    base = rows[0][f"likelihood AUROC vs {ood} (%)"]
    better = [r["model"] for r in rows[1:] if r[f"likelihood AUROC vs {ood} (%)"] > base]
    st.markdown(
        f"What changes the failure? Against the baseline's {base:.1f} %, "
        + (f"{', '.join(f'`{m}`' for m in better)} rank {ood} lower (higher AUROC)" if better else "no variant helps")
        + ". Their sizes and budgets differ (see each card): compare horizontal with cycle, which share both."
    )
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="tour_variants")


def step_scores(name: str, image: np.ndarray) -> None:
    ood = _ood_set(name)
    table = [r for r in state.auroc_rows(name) if ood in r]
    if not table:
        st.markdown("What works instead? This model has no AUROC table yet.")
        return
    best = max(table, key=lambda r: r[ood])
    like = next((r[ood] for r in table if r["score"] == "likelihood"), None)
    st.markdown(
        f"What works instead? Scores that correct for what the flow really measures: here `{best['score']}` "
        f"separates {ood} with AUROC {100 * best[ood]:.1f} %"
        + (f", against {100 * like:.1f} % for the likelihood itself." if like is not None else ".")
        + " The paper's positive answer (Sec. 8) is a flow on features of a pretrained classifier."
    )
    df = pd.DataFrame([{"score": r["score"], f"AUROC vs {ood} (%)": round(100 * r[ood], 1)} for r in table])
    st.dataframe(df, hide_index=True, key="tour_scores")


STEPS: list[tuple[str, Callable[[str, np.ndarray], None]]] = [
    ("1. The likelihood fails (Fig. 1, 8)", step_likelihood),
    ("2. The latents still look like the image (Fig. 10)", step_latents),
    ("3. Each latent depends on a neighbourhood (Fig. 12)", step_locality),
    ("4. Latents store local, not global, information (Fig. 17)", step_resampling),
    ("5. What changes it: masks, bottleneck, negative training (Sec. 7, App. B)", step_changes),
    ("6. What works: other scores (and Sec. 8)", step_scores),
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
