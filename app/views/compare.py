"""Compare models: two checkpoints on the same inputs, histograms and AUROC side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from flowcore.dashboard import figures, service, state
from flowcore.data.datasets import set_label
from flowcore.flows.config import describe_architecture
from flowcore.ood.verdicts import judge_for


def overview(options: list[str]) -> pd.DataFrame:
    rows = []
    for n in options:
        try:
            cfg = service.config(n)
        except Exception as e:  # list every checkpoint, even a broken one
            rows.append({"checkpoint": n, "architecture": f"unreadable: {state.one_line(e)[:80]}"})
            continue
        ref = cfg.get("reference") or {}
        row = {
            "checkpoint": n,
            "dataset": set_label(str(cfg.get("dataset", "?"))),
            "architecture": describe_architecture(cfg["model"]),
            "test bpd (mean)": ref.get("bpd_mean"),
        }
        for ood, value in ((ref.get("auroc") or {}).get("likelihood") or {}).items():
            row[f"AUROC likelihood vs {ood}"] = value
        rows.append(row)
    return pd.DataFrame(rows)


def column(name: str, units: str, key: str) -> dict[str, np.ndarray]:
    shape = service.image_shape(name)
    dims = int(np.prod(shape))
    cfg = service.config(name)
    st.markdown(f"**{name}**: {set_label(str(cfg.get('dataset', '?')))}; {describe_architecture(cfg['model'])}")
    good, _ = state.prepared_inputs(shape)
    res = service.scores(name, [p.array for _, p in good]) if good else {}
    ref = service.reference(name)
    if not ref:
        st.warning(f"No reference statistics: run `flowcore evaluate {name}`.")
        return {}
    markers = [
        (item.name, float(service.to_units(v, "likelihood", units, dims)))
        for (item, _), v in zip(good, res.get("likelihood", []), strict=False)
    ][:12]
    xlabel = "bits/dim (lower = more likely)" if units == "bpd" else "log-likelihood, nats"
    st.plotly_chart(
        figures.histogram(service.score_values(name, "likelihood", units), markers, xlabel), key=f"cmp_hist_{key}"
    )
    out: dict = {"auroc": service.auroc_percent_table(name)}  # drawn full width below both columns
    if good:
        out.update(names=np.array([item.name for item, _ in good]), bpd=res["bpd"],
                   percentile=judge_for(ref, "likelihood").percentile(res["likelihood"]))
    return out


def main() -> None:
    state.need_checkpoint()
    st.title("Compare models")
    st.caption(
        "The same inputs under two checkpoints, e.g. RealNVP against Glow, or a model against one trained on "
        "another dataset. The paper's point is general: flows of either family rank OOD images above their "
        "own test images in the same way, because both mostly model local pixel statistics. Bits/dim "
        "compare models of different input sizes."
    )
    options = service.checkpoint_options()
    current = state.selected_checkpoint()
    c1, c2, c3 = st.columns([2, 2, 1])
    a = c1.selectbox("Model A", options, index=options.index(current) if current in options else 0, key="cmp_a")
    others = [o for o in options if o != a] or options
    b = c2.selectbox("Model B", others, key="cmp_b")
    units = c3.radio("Units", ["bpd", "nats"], horizontal=True, key="cmp_units")
    if len(options) < 2:
        st.info("Only one checkpoint is available; train or export another to compare.")
    left, right = st.columns(2)
    with left:
        ra = {}
        state.run_page(lambda: ra.update(column(a, units, "a")))
    with right:
        rb = {}
        if b != a:
            state.run_page(lambda: rb.update(column(b, units, "b")))
    # tables below both columns, full width: half a 1024x768 page cut a four-set AUROC table
    tables = [(n, r["auroc"]) for n, r in ((a, ra), (b, rb)) if r.get("auroc") is not None]
    if tables:
        st.subheader("AUROC % of every score")
        for n, table in tables:
            st.markdown(f"**{n}** (in-distribution test vs each OOD set)")
            st.table(table)
    if "names" in ra and "names" in rb and len(ra["names"]) == len(rb["names"]):
        st.subheader("Your inputs under both models")
        df = pd.DataFrame(
            {
                "image": ra["names"],
                f"bpd {a}": [f"{v:.4f}" for v in ra["bpd"]],
                f"bpd {b}": [f"{v:.4f}" for v in rb["bpd"]],
                f"percentile {a}": [f"{v:.1f}" for v in ra["percentile"]],
                f"percentile {b}": [f"{v:.1f}" for v in rb["percentile"]],
            }
        )
        st.table(df.set_index("image"))
    with st.expander("Every checkpoint"):
        st.dataframe(overview(options), hide_index=True)


state.run_page(main)
