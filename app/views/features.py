"""What works: flows on image features (paper Sec. 8). A flow trained on an ImageNet classifier's features of
the in-distribution images, beside the pixel flows trained on the same images: AUROCs, the user's images and
the bundled examples, each scored by both."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from flowcore.dashboard import figures, measure, service, state
from flowcore.data.datasets import EXAMPLE_SETS, load_examples, set_label
from flowcore.data.embeddings import ExtractorMissing, load_extractor
from flowcore.ood.vectors import PROJECTION, project
from flowcore.ood.verdicts import Judge, judge_for
from flowcore.zoo.checkpoints import checkpoints_dir

# the paper's headline case (Table 2a: CIFAR-10 -> CelebA), shown when the sidebar's model has no feature flow
DEFAULT_FLOW = "cifar10_embeddings"


def score_label(name: str, score: str) -> str:
    """How the page names one score of the feature flow ``name``."""
    if score == "embedding_knn":
        k = (service.config(name).get("knn") or {}).get("k")
        return f"k-NN on features (k = {k})"
    if score == "embedding_gaussian":
        return "Gaussian on features (Ledoit-Wolf)"
    return f"{name} (flow on features)"


def auroc_frame(name: str, pixel_flows: list[str]) -> pd.DataFrame:
    """AUROC (%) per OOD set: the feature flow and the baselines stored with it, then each pixel flow's likelihood
    on the same data."""
    columns = {score_label(name, s): row for s, row in measure.feature_score_aurocs(name).items()}
    columns.update({f"{p} (pixels)": measure.likelihood_aurocs(p) for p in pixel_flows})
    frame = pd.DataFrame(columns) * 100
    frame.index.name = "OOD set"
    return frame.round(1).map(lambda v: "–" if pd.isna(v) else f"{v:.1f}")  # one decimal, as on every page


def flagged(values: np.ndarray, judge: Judge) -> int:
    """How many of ``values`` ``judge`` calls OOD (non-finite ones, which have no verdict, left out)."""
    return sum(judge.is_ood(v) for v in values if np.isfinite(v))


def verdict_sentence(row: dict, pixel: str | None, judge: str = "the flow on features") -> str:
    """One image's two verdicts in words, and which model is right when they differ (the lesson of Sec. 8)."""
    text = (f"**{row['image']}**: {judge} says **{row['features: verdict']}** (percentile "
            f"{row['features: percentile']:.2f} %)")
    if "pixels: verdict" not in row:
        return text + "."
    text += (f"; the pixel flow `{pixel}` says **{row['pixels: verdict']}** (percentile "
             f"{row['pixels: percentile']:.2f} %)")
    if row["features: verdict"] == "OOD" and row["pixels: verdict"] == "in-distribution":
        text += ": only the features flag it (the pixel flow's failure, and Sec. 8's answer)"
    elif row["features: verdict"] != row["pixels: verdict"]:
        text += ": they disagree"
    return text + "."


def draw_reference(name: str, ref: dict[str, np.ndarray], marks: list[tuple[str, float]],
                   arrays: list[np.ndarray], score: str = "likelihood") -> None:
    """The reference sets' values of ``score`` with each image marked, and the 2-D view of their features."""
    sets = {s: ref[f"{s}__{score}"] for s in service.reference_sets(name) if f"{s}__{score}" in ref}
    left, right = st.columns(2)
    with left:
        st.markdown(f"**{score_label(name, score)}** (higher = more in-distribution)")
        # OOD features can be millions of nats below the test set: the axis is cut at the 1st percentile of the
        # pooled reference values, and values below it are drawn at the cut (stated in the caption)
        cut = float(np.percentile(np.concatenate(list(sets.values())), 1))
        clipped = {k: np.maximum(v, cut) for k, v in sets.items()}
        unit = "minus distance" if score == "embedding_knn" else "log-likelihood, nats"
        fig = figures.histogram(clipped, [(m, max(v, cut)) for m, v in marks[:12]], xlabel=unit)
        st.plotly_chart(fig, key="features_hist")
        st.caption(f"Values below {cut:.4g} (the lowest 1 % of the reference values) are drawn at it.")
    with right:
        folder = service.resolve(name)
        if not (folder / PROJECTION).is_file():
            st.caption(f"No 2-D view stored: run `flowcore evaluate {name}`.")
            return
        with np.load(folder / PROJECTION, allow_pickle=False) as d:
            projection = {k: d[k] for k in d.files}
        points = {k[len("set__"):]: v for k, v in projection.items() if k.startswith("set__")}
        stars = []
        if arrays:
            features = service.features(name, arrays)
            stars = [(m, tuple(float(c) for c in xy)) for (m, _), xy in zip(marks[:12], project(features, projection),
                                                                            strict=False)]
        st.markdown("**Features on their two main directions** (PCA of the training features)")
        st.plotly_chart(figures.projection_figure(points, stars), key="features_pca")


def main() -> None:
    st.title("What works: flows on features")
    names = service.feature_checkpoints()
    if not names:
        st.info(f"No flow on image features in `{checkpoints_dir()}`. Train one with "
                "`flowcore train configs/cifar10_embeddings.json`, then `flowcore evaluate cifar10_embeddings`.")
        return
    try:
        load_extractor()
    except ExtractorMissing as e:
        st.info(f"This page needs the image feature extractor: {e}.")
        return
    c1, c2, c3 = st.columns([3, 2, 2])  # the flow's name and data set must fit at 1024x768
    if st.session_state.get("features_flow") not in names:  # start on the flow trained on the sidebar model's data
        shown = state.selected_checkpoint()
        dataset = service.config(shown).get("dataset") if shown else None
        fallback = DEFAULT_FLOW if DEFAULT_FLOW in names else names[0]
        st.session_state["features_flow"] = next(
            (n for n in names if service.config(n).get("dataset") == dataset), fallback)
    name = c1.selectbox("Flow on features", names, key="features_flow",
                        format_func=lambda n: f"{n} ({set_label(str(service.config(n).get('dataset', '?')))})")
    pixel_flows = service.pixel_counterparts(name)
    st.markdown(
        "Sec. 8 of the paper: the same flow that fails on pixels detects OOD images when it models the features of "
        "an ImageNet-trained classifier instead, because those features describe *what* is in the image rather "
        "than its local pixel correlations. Here the flow models the 1280-d EfficientNet-Lite0 features.")
    st.caption(measure.features_finding(name, pixel_flows))
    ref = service.reference(name)
    if "test__likelihood" not in ref:
        st.warning(f"No reference statistics: run `flowcore evaluate {name}`.")
        return
    fpr = c2.slider("False-positive rate of the OOD verdict", 0.01, 0.5, 0.05, 0.01, key="features_fpr",
                    help="Each threshold flags this fraction of its model's in-distribution test images as OOD.")
    pixel = c3.selectbox("Pixel flow beside it", pixel_flows, key="features_pixel") if pixel_flows else None
    offered = [s for s in measure.FEATURE_SCORES if f"test__{s}" in ref]
    if st.session_state.get("features_score") not in offered:
        best = measure.best_feature_score(name)
        st.session_state["features_score"] = best if best in offered else "likelihood"
    score = st.radio("Score of the verdicts on features", offered, key="features_score", horizontal=True,
                     format_func=lambda s: score_label(name, s),
                     help="The flow's log-likelihood of the features, or one of the two baselines stored with it. "
                          "It starts on the one with the best mean AUROC over the OOD sets below.")
    features_judge = judge_for(ref, score, fpr)
    pixel_ref = service.reference(pixel) if pixel else {}
    pixel_judge = judge_for(pixel_ref, "likelihood", fpr) if "test__likelihood" in pixel_ref else None

    st.subheader("AUROC (%): the flow, its baselines and the pixel flows")
    st.table(auroc_frame(name, pixel_flows))  # a table wraps to its column: a dataframe was cut at 1024x768
    st.markdown(measure.baselines_finding(name))
    st.caption("100 % = the score ranks every in-distribution test image above every OOD image; 50 % = chance; "
               "below 50 % = the OOD images look *more* in-distribution. The Gaussian is fitted with Ledoit-Wolf "
               "shrinkage to the same training features as the flow (it is the flow's own first layer); the k-NN "
               "score is minus the distance of the unit-length features to the k-th nearest of a bank of unit-"
               "length training features (Sun et al., ICML 2022).")

    st.subheader("Your images")
    shape = tuple(service.config(name).get("input_shape") or (3, 32, 32))
    good, bad = state.prepared_inputs(shape)
    state.show_input_errors(bad)
    if good:
        arrays = [p.array for _, p in good]
        ll = service.feature_scores(name, arrays)[score]
        rows = []
        pixel_ll = None
        if pixel_judge is not None:
            pixel_good, _ = state.prepared_inputs(service.image_shape(pixel), [item for item, _ in good])
            pixel_ll = service.scores(pixel, [p.array for _, p in pixel_good])["likelihood"]
        for i, ((item, _), value) in enumerate(zip(good, ll, strict=True)):
            if not np.isfinite(value):
                st.warning(f"{item.name}: its features get a non-finite score (NaN or inf); no verdict")
                continue
            on_features = features_judge.judge(value)
            row = {"image": item.name, "features: percentile": round(on_features.percentile, 2),
                   "features: verdict": on_features.words}
            if pixel_ll is not None and np.isfinite(pixel_ll[i]):
                on_pixels = pixel_judge.judge(pixel_ll[i])
                row["pixels: percentile"] = round(on_pixels.percentile, 2)
                row["pixels: verdict"] = on_pixels.words
            rows.append(row)
        if rows:
            st.table(pd.DataFrame(rows).set_index("image").style.format(precision=2))  # not a float's 4 decimals
            for row in rows[:12]:
                judge = {"likelihood": "the flow on features", "embedding_gaussian": "the Gaussian on features",
                         "embedding_knn": "the k-NN score on features"}[score]
                st.markdown(verdict_sentence(row, pixel, judge))
        draw_reference(name, ref, [(item.name, float(v)) for (item, _), v in zip(good, ll, strict=True)],
                       [p.array for _, p in good], score)
        st.caption(f"Each image is first brought to {shape[1]}x{shape[2]} (centre crop), like the training images, "
                   "then embedded on its own. Percentile: share of the model's test images with a lower likelihood.")
    else:
        st.caption("No image yet: upload some in the sidebar or add them on the Inputs page.")
        draw_reference(name, ref, [], [], score)

    st.subheader("The bundled examples")
    rows = []
    for dataset in EXAMPLE_SETS:
        x = load_examples(dataset)
        row = {"set": set_label(dataset), "images": len(x),
               "flagged OOD (features)": flagged(service.feature_scores(name, x)[score], features_judge)}
        if pixel_judge is not None:
            px = service.scores(pixel, load_examples(dataset, service.image_shape(pixel)))["likelihood"]
            row["flagged OOD (pixels)"] = flagged(px[np.isfinite(px)], pixel_judge)
        rows.append(row)
    st.table(pd.DataFrame(rows).set_index("set"))
    dataset = set_label(str(service.config(name).get("dataset", "")))
    st.caption(f"The first test images of each set bundled with the package, at a false-positive rate of "
               f"{100 * fpr:.0f} % on {dataset}'s test images: a good detector flags about that share of "
               f"{dataset} and all of every other set.")


state.run_page(main)
