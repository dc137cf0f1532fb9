"""Scoring image files with a checkpoint: the workflow behind ``flowcore score`` (files, progress, processes).

The maths (scores, percentiles, verdicts, the row schema) lives in :mod:`flowcore.ood.scores`; this module reads
files, runs the model over them (sharded under torchrun) and writes the rows as CSV or JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..training.distributed import float32_work
from .scores import CSV_FIELDS, EMBEDDING_SCORES, SCORE_NAMES, compute_scores, result_rows, with_embedding_reference

__all__ = ["score_files", "write_rows", "csv_cell"]


@float32_work
def score_files(
    checkpoint,
    paths,
    score: str = "likelihood",
    fpr: float = 0.05,
    invert: str = "auto",
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Score image files and folders with a checkpoint: one row per readable image, in input order.

    Each row: path, log-likelihood (nats), bpd, the chosen score, its percentile among the
    checkpoint's in-distribution test images and an OOD flag at false-positive rate ``fpr``.
    Unreadable files are returned separately as ``(path, reason)``; they never stop the batch.

    Under torchrun each process scores a contiguous run of whole batches and the rows are gathered
    back in input order: every rank returns exactly the rows of a single-process run.
    """
    from tqdm.auto import tqdm

    from ..data.images import ImageError, display_path, find_image_files, load_image_file
    from ..training import distributed as dist
    from ..zoo.checkpoints import load, paired_feature_flow, read_config
    from .evaluate import load_reference
    from .vectors import load_feature_scorer

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be between 0 and 1 (exclusive), got {fpr!r}")
    device = dist.init(device)
    model = load(checkpoint, device=device)
    reference = load_reference(checkpoint)
    background = None
    cfg = read_config(checkpoint)
    if score == "likelihood_ratio":
        if not cfg.get("background"):
            raise ValueError(f"{checkpoint} has no background model, so no likelihood_ratio score")
        background = load(cfg["background"], device=device)
    feature_flow = None
    if score in EMBEDDING_SCORES and not cfg.get("features"):
        pair = paired_feature_flow(checkpoint)
        if pair is None:
            raise ValueError(f"{checkpoint} has no paired flow on image features (one trained on "
                             f"{cfg.get('dataset')} at its input size), so no {score} score")
        feature_flow = load_feature_scorer(pair, device=device)
        _check_feature_score(feature_flow, score, pair)
        reference = with_embedding_reference(reference, load_reference(pair))
    scorer = None
    if cfg.get("features") and cfg.get("features") != "tabular":
        scorer = load_feature_scorer(checkpoint, device=device)
        _check_feature_score(scorer, "embedding_likelihood" if score == "likelihood" else score, checkpoint)
    ref_key = f"test__{score}"
    if ref_key not in reference:
        raise ValueError(
            f"checkpoint has no reference statistics for score {score!r}; run `flowcore evaluate {checkpoint}`"
        )
    # the reference's own draws and seed, so that a file scores exactly as the same image does in the app
    summary = cfg.get("reference") or {}
    n_draws, seed = int(summary.get("n_draws", 1)), int(summary.get("seed", 0))
    inv = {"auto": "auto", "yes": True, "no": False}[invert]
    files, problems = find_image_files(paths)
    if not files:
        where = ", ".join(display_path(p) for p in paths)
        raise ValueError(f"no image files found in {where}" + (f" ({problems[0][1]})" if problems else ""))
    if cfg.get("features") == "tabular":
        raise ValueError(f"{checkpoint} is a flow on the rows of a tabular set, not on images: score rows with "
                         "flowcore.load(NAME).log_prob(rows)")
    if scorer is not None:
        return _score_feature_files(scorer, score, cfg.get("input_shape"), files, problems, reference, fpr, progress)
    good, arrays, failures = [], [], list(problems)
    for f in files:
        try:
            arrays.append(load_image_file(f, model.config.image_shape, invert=inv).array)
            good.append(display_path(f))
        except (ImageError, OSError) as e:
            failures.append((display_path(f), str(e)))
    lo, hi = dist.batch_range(len(good), batch_size)
    bar = tqdm(total=hi - lo, disable=not progress or not dist.is_main(), unit="img", desc="score")

    def score_range(first: int, stop: int) -> list[dict]:
        rows: list[dict] = []
        for start in range(first, stop, batch_size):
            batch = np.stack(arrays[start : start + batch_size])
            # the model sees one image at a time: float32 convolutions round differently with the batch size
            # (1e-4 nats), and a file's score must be bitwise the same alone, in any company and in the app
            s = compute_scores(model, batch, reference, background, n_draws, seed, 1, device,
                               feature_flow=feature_flow)
            if score not in s:
                raise ValueError(f"unknown score {score!r}; available: {', '.join(SCORE_NAMES)}")
            rows += result_rows(good[start : start + batch_size], s, score, reference, fpr)
            bar.update(len(batch))
        return rows

    scored = dist.map_batches(score_range, len(good), batch_size)
    bar.close()
    rows = [r for r in scored if "error" not in r]
    failures += [(r["path"], r["error"]) for r in scored if "error" in r]
    return rows, failures


def _check_feature_score(scorer, score: str, name) -> None:
    """Refuse a feature score the feature flow ``name`` cannot give, with the reason."""
    if score not in EMBEDDING_SCORES:
        raise ValueError(f"{name} is a flow on image features: its scores are likelihood, "
                         f"{', '.join(EMBEDDING_SCORES[1:])}")
    if score != "embedding_likelihood" and score not in scorer.names:
        raise ValueError(f"the flow on features {name} stores no {score} baseline (trained before baselines "
                         "were stored with it): retrain it")


def _score_feature_files(
    scorer, score, shape, files, problems, reference, fpr, progress
) -> tuple[list[dict], list[tuple[str, str]]]:
    """``score_files`` for a flow on image features (Sec. 8): each file is brought to the size of the training
    images (``shape``, centre crop, never inverted; a checkpoint without it: decoded in colour at its own size),
    embedded alone (so its score never depends on the other files) and scored by the feature flow or one of the
    baselines stored with it."""
    from tqdm.auto import tqdm

    from ..data.images import ImageError, decode_image, display_path, load_image_file

    rows: list[dict] = []
    failures = list(problems)
    for f in tqdm(files, disable=not progress, unit="img", desc="score"):
        try:
            if shape:
                rgb = load_image_file(f, shape, invert=False).array
            else:
                rgb = np.asarray(decode_image(f).convert("RGB"))
        except (ImageError, OSError) as e:
            failures.append((display_path(f), str(e)))
            continue
        rows += result_rows([display_path(f)], scorer.score_images(rgb[None]), score, reference, fpr)
    return [r for r in rows if "error" not in r], failures + [(r["path"], r["error"]) for r in rows if "error" in r]


# A spreadsheet reads a cell starting with one of these as a formula (=HYPERLINK(...), +cmd|..., @SUM(...)); a
# tab or CR at the start is how the same payload hides from a first look. File names are chosen by whoever sent
# the files, so such a cell gets a leading ' (shown as text, the usual OWASP neutralisation).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: strings starting like a formula get a leading ``'``. Numbers
    are left alone (a negative log-likelihood is a number, not a formula)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_rows(rows: list[dict], fmt: str, stream) -> None:
    """CSV (header + one line per image) or JSON (one array): ``flowcore score``'s output and the dashboard's CSV
    download, one writer for both. CSV cells are neutralised by :func:`csv_cell`."""
    import csv
    import json

    if fmt == "json":
        json.dump(rows, stream, indent=1)
        stream.write("\n")
        return
    # With lineterminator "\n" the csv module quotes a field holding LF but not one holding a bare CR, which a
    # spreadsheet takes for the end of the row: a crafted file name would forge rows. Such a row is written with
    # every field quoted (mixing quoted and unquoted rows is valid CSV); the others stay as they were.
    plain = csv.DictWriter(stream, fieldnames=CSV_FIELDS, lineterminator="\n")
    quoted = csv.DictWriter(stream, fieldnames=CSV_FIELDS, lineterminator="\n", quoting=csv.QUOTE_ALL)
    plain.writeheader()
    for row in rows:
        safe = {k: csv_cell(v) for k, v in row.items()}
        breaks = any(isinstance(v, str) and ("\r" in v or "\n" in v) for v in safe.values())
        (quoted if breaks else plain).writerow(safe)
