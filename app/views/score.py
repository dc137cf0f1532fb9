"""Score: each input's log-likelihood, bpd, percentile and OOD verdict against the checkpoint's reference."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import streamlit as st

from flowcore.dashboard import figures, measure, service, state
from flowcore.data import images
from flowcore.ood.scores import SCORE_DESCRIPTIONS, result_rows, typicality_batch_test
from flowcore.ood.scoring import write_rows
from flowcore.ood.verdicts import judge_for

MAX_MARKERS = 12


def main() -> None:
    name = state.need_checkpoint()
    st.title("Score")
    st.caption("Where do your images land among the model's own images and the OOD sets? "
               + measure.likelihood_finding(name))
    shape = service.image_shape(name)
    dims = int(np.prod(shape))
    ref = service.reference(name)
    good, bad = state.prepared_inputs(shape)
    # NaN or inf is an error for that image, never a percentile or a verdict (NaN < threshold is False)
    good, results, not_finite = service.finite_scores(name, good)
    state.show_input_errors([*bad, *not_finite])
    flipped = [item.name for item, p in good if p.inverted]
    if flipped and state.preprocessing_options()[0] == "auto":
        st.info(f"Inverted before scoring (the sidebar's Invert is 'auto': a light border reads as dark-on-light, "
                f"like a scanned digit): {', '.join(flipped)}. Set Invert to 'no' to score them as they are.")

    c1, c2, c3 = st.columns([1, 2, 2])
    units = c1.radio("Units", ["bpd", "nats"], horizontal=True, key="score_units")
    fpr = c2.slider(
        "False-positive rate of the OOD verdict",
        0.01,
        0.5,
        0.05,
        0.01,
        key="score_fpr",
        help="The threshold flags this fraction of the in-distribution test images as OOD.",
    )
    available = service.reference_scores(name) or ["likelihood"]
    score = c3.selectbox(
        "Score",
        available,
        format_func=lambda s: f"{s}: {SCORE_DESCRIPTIONS.get(s, s)}",
        key="score_choice",
    )
    unit_label = "bits/dim (lower = more likely)" if units == "bpd" else "log-likelihood, nats (higher = more likely)"

    if not ref:
        st.warning(
            f"{name} has no reference statistics yet, so there are no histograms, percentiles or verdicts: "
            f"run `flowcore evaluate {name}`."
        )
        if good:
            st.dataframe(
                pd.DataFrame(
                    {
                        "image": [i.name for i, _ in good],
                        "log-likelihood (nats)": results["likelihood"],
                        "bpd": results["bpd"],
                    }
                ),
                hide_index=True,
            )
        return

    # the verdicts of this page and of its CSV come from the same two judges (flowcore.ood.verdicts)
    ll_judge = judge_for(ref, "likelihood", fpr)
    score_judge = judge_for(ref, score, fpr)

    if good:
        ll = results["likelihood"]
        pct = ll_judge.percentile(ll)
        chosen = results.get(score, ll)
        score_pct = score_judge.percentile(chosen)
        current_key = st.session_state.get(state.CURRENT_KEY)
        i = next((k for k, (item, _) in enumerate(good) if item.key == current_key), 0)
        item, prepared = good[i]
        st.subheader(f"{item.name}")
        left, right = st.columns([1, 4])
        left.image(images.thumbnail(prepared.array, 160), caption="what the model sees")
        # three numbers in a row, the verdict on its own: "in-distribution" must not be cut on a 1024x768 projector
        m = [*right.columns(3), right.container()]
        m[0].metric("log-likelihood (nats)", f"{ll[i]:,.1f}")
        m[1].metric("bits/dim", f"{results['bpd'][i]:.4f}")
        m[2].metric(
            "percentile",
            f"{pct[i]:.2f} %",  # the table's precision: 0.03 % must not read as 0.0 %
            help="Percentile among the model's in-distribution test images: the share of them with a lower "
            "likelihood (0 % = less likely than every test image).",
        )
        m[3].metric(f"verdict at {fpr:.0%} FPR ({score})", score_judge.judge(chosen[i]).words)
        if score != "likelihood":
            right.caption(
                f"{score} = {chosen[i]:.4g}, percentile {score_pct[i]:.2f} % among test images; "
                f"by likelihood alone: {ll_judge.judge(ll[i]).words}."
            )

    markers: list[tuple[str, float]] = []
    if good:
        markers = [
            (item.name, float(service.to_units(v, "likelihood", units, dims)))
            for (item, _), v in zip(good, ll, strict=False)
        ]
        markers = markers[:MAX_MARKERS]
    left, right = st.columns(2)
    with left:
        st.markdown("**Likelihood of reference images and yours**")
        fig = figures.histogram(service.score_values(name, "likelihood", units), markers, xlabel=unit_label)
        st.plotly_chart(fig, key="hist_likelihood")
        st.caption("Dashed lines: medians. Solid lines: your images (first twelve).")
    with right:
        if score == "likelihood":
            st.markdown("**AUROC % of every score** (in-distribution test vs each OOD set)")
            show_auroc_table(name)
            st.caption(
                "50 = chance; below 50 = the OOD set looks *more* in-distribution than the test set. "
                "Pick another score above to see its histogram."
            )
        else:
            st.markdown(f"**{score}**: {SCORE_DESCRIPTIONS.get(score, '')}")
            smarkers = [(item.name, float(v)) for (item, _), v in zip(good, results.get(score, []), strict=False)][
                :MAX_MARKERS
            ]
            fig = figures.histogram(
                service.score_values(name, score), smarkers, xlabel=f"{score} (higher = more in-dist.)"
            )
            st.plotly_chart(fig, key="hist_score")
            rows = {r["score"]: r for r in service.auroc_rows(name)}
            cols = st.columns(max(1, len(rows.get(score, {})) - 1) or 1)
            for col, (ood, value) in zip(
                cols, [(k, v) for k, v in rows.get(score, {}).items() if k != "score"], strict=False
            ):
                base = rows.get("likelihood", {}).get(ood)
                delta = f"{value - base:+.3f} vs likelihood" if base is not None else None
                col.metric(f"AUROC vs {ood}", f"{value:.3f}", delta)

    if score != "likelihood":
        with st.expander("AUROC table, every score"):
            show_auroc_table(name)

    if good:
        st.subheader("All inputs")
        table = {
            "image": [item.name for item, _ in good],
            "source": [item.source for item, _ in good],
            "log-likelihood (nats)": np.round(ll, 3),
            "bpd": np.round(results["bpd"], 5),
            "percentile (likelihood)": np.round(pct, 2),
            f"verdict (likelihood, {fpr:.0%} FPR)": [ll_judge.judge(v).words for v in ll],
        }
        if score != "likelihood":
            table[score] = np.round(chosen, 5)
            table[f"percentile ({score})"] = np.round(score_pct, 2)
            table[f"verdict ({score}, {fpr:.0%} FPR)"] = [score_judge.judge(v).words for v in chosen]
        df = pd.DataFrame(table)
        st.dataframe(df, hide_index=True, key="score_table")
        csv_text = io.StringIO()  # the schema and values of `flowcore score NAME FILES --score S --fpr F`
        write_rows(result_rows([item.name for item, _ in good], results, score, ref, fpr), "csv", csv_text)
        st.download_button(
            "Download CSV (as flowcore score writes it)",
            csv_text.getvalue().encode(),
            file_name=f"scores_{name}.csv",
            mime="text/csv",
            key="score_csv",
        )
        if len(good) >= 2 and "train__likelihood" in ref:
            stat, p = typicality_batch_test(ll, ref["train__likelihood"], ref["test__likelihood"])
            st.metric(
                "Typicality test of the whole batch (p-value)",
                f"{p:.3g}",
                help="Nalisnick et al. 2019: is the batch's mean log-likelihood as far from the training "
                "mean as in-distribution batches of the same size? Small p = atypical batch.",
            )
            st.caption(f"|mean log P(batch) - mean log P(train)| = {stat:.2f} nats over {len(good)} images.")
    else:
        st.info("Add images in the sidebar (upload) or on the Inputs page (gallery, samples, drawing) to score them.")


def show_auroc_table(name: str) -> None:
    table = service.auroc_percent_table(name)
    if table is not None:
        st.table(table)
    else:
        st.caption("No AUROC table: the reference has no OOD sets.")


state.run_page(main)
