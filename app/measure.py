"""The measured sentences of the dashboard: each page's claim about the current model, written from a number
computed for that model and image (never a hard-coded statement the model could contradict)."""

from __future__ import annotations

import numpy as np

from flowcore.dashboard import service
from flowcore.data import images
from flowcore.flows.likelihood import as_image_tensor
from flowcore.inspection.probes import box_change_shares, influence_concentration, latent_image_correlation

# Receptive field: "the fewest pixels holding 90 % of a latent's influence", and its 5x5 neighbourhood.
MASS, RADIUS = 0.9, 2
# Patch resampling: a pixel "changed" when it moved by more than this (0-1 range); the outside counts as kept
# when at most KEPT_OUTSIDE of its pixels changed.
CHANGE, KEPT_OUTSIDE = 0.05, 0.05

# Three edits whose effect the page states for the current model and image: (words, perturb settings).
PROBES = [("pixel noise of std 10", {"noise": 10.0}), ("a blur of radius 1", {"blur": 1.0}),
          ("half the contrast", {"contrast": 0.5})]


def likelihood_finding(name: str) -> str:
    """The paper's starting point (Fig. 1, 8), stated for this model from its own likelihood AUROCs."""
    row = next((r for r in service.auroc_rows(name) if r["score"] == "likelihood"), None)
    if not row or len(row) < 2:
        return "This model has no OOD AUROCs yet (run `flowcore evaluate`): nothing to say about how it ranks OOD sets."
    sets = {k: v for k, v in row.items() if k != "score"}
    higher = [f"{s} ({100 * v:.1f} %)" for s, v in sets.items() if v < 0.5]
    lower = [f"{s} ({100 * v:.1f} %)" for s, v in sets.items() if v >= 0.5]
    parts = []
    if higher:
        parts.append(f"gives {', '.join(higher)} a *higher* likelihood than its own test images on average "
                     "(likelihood AUROC below 50 %), so likelihood alone cannot flag them")
    if lower:
        parts.append(f"ranks {', '.join(lower)} below its test images (AUROC at or above 50 %; 100 % = fully "
                     "separated)")
    return (f"`{name}` " + "; it ".join(parts) + ". The paper's starting point (Fig. 1, 8) is the first kind.")


def measured_edits(name: str, image: np.ndarray) -> str:
    """One sentence, from scores computed now, on what each probe edit does to this image's bits/dim."""
    batch = np.stack([image] + [images.perturb(image, **settings) for _, settings in PROBES])
    bpd = service.scores(name, batch)["bpd"]
    parts = []
    for (words, _), value in zip(PROBES, bpd[1:], strict=True):
        delta = value - bpd[0]
        effect = "more likely" if delta < 0 else "less likely" if delta > 0 else "unchanged"
        parts.append(f"{words} makes it {effect} ({delta:+.3f} bits/dim)")
    return f"Measured on this image under `{name}`: " + "; ".join(parts) + "."


def latent_sentence(image: np.ndarray, z: np.ndarray) -> str:
    """Fig. 10's claim (z still looks like the image), measured as the correlation of z with the pixels."""
    r = latent_image_correlation(image, z)
    if abs(r) >= 0.5:
        verdict = "z clearly follows the image, as in Fig. 10"
    elif abs(r) >= 0.25:
        verdict = "z follows the image only weakly"
    else:
        verdict = "z looks little like the image here, unlike the paper's larger models in Fig. 10"
    return f"Measured: the correlation of z with the image's pixels is **r = {r:.2f}**: {verdict}."


def locality_sentence(influence: np.ndarray, position: tuple[int, int]) -> str:
    """Fig. 12's claim (a latent depends on a small neighbourhood), measured on one influence map (H, W)."""
    h, w = np.asarray(influence).shape
    needed, near = influence_concentration(influence, position, MASS, RADIUS)
    if not needed:
        return "Measured: this latent does not depend on any pixel here (the Jacobian row is zero)."
    share = needed / (h * w)
    kind = "local, as in Fig. 12" if share <= 0.1 else "spread wider than Fig. 12's" if share > 0.25 else "fairly local"
    side = 2 * RADIUS + 1
    return (f"Measured: {100 * MASS:.0f} % of this latent's total influence sits in **{needed} of {h * w} pixels** "
            f"({100 * share:.1f} %), and {100 * near:.0f} % of it within the {side}x{side} pixels around its own "
            f"position: {kind}.")


def resampling_sentence(image: np.ndarray, draws: np.ndarray, box: tuple[int, int, int, int]) -> tuple[str, float]:
    """Fig. 17's claim (only the box changes), measured on resampled ``draws``; returns the text and the share
    of outside pixels that changed."""
    original = as_image_tensor(np.asarray(image)[None])[0].numpy()
    inside, outside = box_change_shares(original, draws, box, CHANGE)
    text = (f"Measured here: {100 * inside:.0f} % of the pixels inside the box and {100 * outside:.0f} % of those "
            f"outside changed by more than {CHANGE:g} (of the 0-1 range) over the {len(draws)} draws.")
    if outside > KEPT_OUTSIDE:
        text += (" Unlike Fig. 17, this model does not keep the outside: in a multi-scale flow the latents at a "
                 "pixel of a coarser scale were computed from a squeezed, wider neighbourhood, so redrawing them "
                 "moves pixels beyond the box.")
    else:
        text += " The outside is kept, as in Fig. 17."
    return text, outside


# Sec. 8's claim is that features separate what pixels cannot: an AUROC of at least this counts as "separates".
SEPARATES = 0.95


def likelihood_aurocs(name: str) -> dict[str, float]:
    """``{ood set: likelihood AUROC}`` of one checkpoint ({} before ``flowcore evaluate``)."""
    row = next((r for r in service.auroc_rows(name) if r["score"] == "likelihood"), None) or {}
    return {k: float(v) for k, v in row.items() if k != "score"}


def features_finding(name: str, pixel_flows: list[str], score: str = "likelihood") -> str:
    """Sec. 8's positive result, stated from the AUROCs of this feature flow's ``score`` (its likelihood or a
    baseline stored with it) beside the likelihood AUROCs of the pixel flows trained on the same images (and the
    sets where it does not hold, if any)."""
    ours = feature_score_aurocs(name).get(score, {}) if score != "likelihood" else likelihood_aurocs(name)
    if not ours:
        return f"`{name}` has no OOD AUROCs yet (run `flowcore evaluate {name}`): nothing measured to say."
    good = {s: v for s, v in ours.items() if v >= SEPARATES}
    weak = {s: v for s, v in ours.items() if v < SEPARATES}
    what = {"likelihood": "a flow on EfficientNet-Lite0 features",
            "embedding_gaussian": "the Ledoit-Wolf Gaussian of its EfficientNet-Lite0 training features",
            "embedding_knn": "the k-NN score on its EfficientNet-Lite0 training features"}[score]
    text = f"Measured for `{name}` ({what}): "
    if good:
        text += ("it ranks its own test images above " +
                 ", ".join(f"{s} ({100 * v:.1f} %)" for s, v in good.items()) + f" ({score} AUROC)")
    if weak:
        text += ("; " if good else "") + "it does **not** separate " + ", ".join(
            f"{s} ({100 * v:.1f} %)" for s, v in weak.items()) + f" (below {100 * SEPARATES:.0f} %)"
    theirs = {p: likelihood_aurocs(p) for p in pixel_flows}
    compared = []
    for pixel, aurocs in theirs.items():
        shared = [s for s in ours if s in aurocs]
        if shared:
            compared.append(f"`{pixel}` " + ", ".join(f"{s} {100 * aurocs[s]:.1f} %" for s in shared))
    if compared:
        text += ". The pixel flows on the same images: " + "; ".join(compared)
        better = all(ours[s] > aurocs[s] for aurocs in theirs.values() for s in ours if s in aurocs)
        text += (". Features beat pixels on every shared set, as in Sec. 8 (the paper: 99.99 % CIFAR-10 vs "
                 "CelebA with EfficientNet-B4 features)." if better else
                 ". Features do not beat pixels on every shared set here.")
    else:
        text += "."
    return text


# A flow on features and the baselines stored with it, as the features page names them.
FEATURE_SCORES = {"likelihood": "flow", "embedding_gaussian": "Gaussian", "embedding_knn": "k-NN"}


def feature_score_aurocs(name: str) -> dict[str, dict[str, float]]:
    """``{score: {ood set: AUROC}}`` of a flow on features and of each baseline stored with it."""
    rows = {r["score"]: {k: float(v) for k, v in r.items() if k != "score"} for r in service.auroc_rows(name)}
    return {score: rows[score] for score in FEATURE_SCORES if rows.get(score)}


def best_feature_score(name: str) -> str:
    """The feature score with the highest mean AUROC over the OOD sets all of them were measured on (the flow's
    ``likelihood`` when nothing else is stored)."""
    table = feature_score_aurocs(name)
    if len(table) < 2:
        return "likelihood"
    shared = set.intersection(*(set(row) for row in table.values()))
    return max(table, key=lambda s: float(np.mean([table[s][k] for k in shared])) if shared else 0.0)


def baselines_finding(name: str) -> str:
    """Per OOD set, which of the flow, the Gaussian and the k-NN score separates it best and by how much: the
    flow earns its place only where it beats the two baselines a practitioner tries first."""
    table = feature_score_aurocs(name)
    if "likelihood" not in table or len(table) < 2:
        return (f"`{name}` stores no baseline beside the flow (trained before they were stored with it): nothing "
                "measured to compare it with.")
    words = {s: FEATURE_SCORES[s] for s in table}
    parts, gaussian_wins = [], []
    for ood in table["likelihood"]:
        values = {s: table[s][ood] for s in table if ood in table[s]}
        ranked = sorted(values, key=values.get, reverse=True)
        best, runner = ranked[0], ranked[1]
        listed = ", ".join(f"{words[s]} {100 * values[s]:.1f} %" for s in values)
        margin = 100 * (values[best] - values[runner])
        parts.append(f"{ood}: {listed} (the {words[best]} wins by {margin:.1f} points over the {words[runner]})")
        if "embedding_gaussian" in values and values["embedding_gaussian"] > values["likelihood"]:
            gaussian_wins.append(ood)
    best = best_feature_score(name)
    text = f"Measured for `{name}` against its baselines on the same features: " + "; ".join(parts) + "."
    text += f" Best on average over these sets: the {words[best]}."
    if gaussian_wins:
        text += (f" On {', '.join(gaussian_wins)} a Gaussian of the same features separates better than the flow: "
                 "there the flow is the worse model of the features' density, a finding this page does not hide.")
    return text
