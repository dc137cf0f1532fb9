"""Two-class tabular data for flows (paper App. K.3, Table 2b, Fig. 19): train on one class, the other is OOD.

A tabular set is named ``SOURCE:CLASS`` (``miniboone:signal``, ``hepmass:background``, ...); its ``train`` and
``test`` splits are that class's own, and the OOD set of a flow trained on one class is the other class's test
split. Sources:

- ``miniboone``: UCI MiniBooNE particle identification, ``ROOT/miniboone/MiniBooNE_PID.txt`` (official file:
  a first line with the signal and background counts, then one event of 50 values per line, signal first).
  Events holding the file's missing-value marker (-999) are dropped, as Papamakarios et al. (2017) do; a seeded
  random 10 % of each class is its test split (App. K.3). ``flowcore data download miniboone`` fetches it
  (91 MB, sha256 pinned).
- ``hepmass``: UCI HEPMASS, the "1000" mass subset, ``ROOT/hepmass/1000_{train,test}.csv[.gz]`` (a header line,
  then ``label, 27 features, mass`` per line; label 1 = signal). The mass column is dropped and so are features
  with too many repeated values (App. K.3, after Papamakarios et al.: a feature whose most frequent value occurs
  more than :data:`MAX_REPEATS` times in the training file). Its official files' digests are not pinned here
  (no copy was reachable to take them from), so it is not downloadable: place the files yourself.
- ``breast_cancer``: the Wisconsin diagnostic breast-cancer set (UCI), as scikit-learn ships it (569 x 30,
  ``benign`` / ``malignant``): a small real two-class set that installs with a package, our stand-in for the
  physics sets that are not reachable here. Needs scikit-learn; a seeded random 20 % of each class is its test
  split.

Values are float32, unstandardised: the flow's first layer standardises with the training split's statistics.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .datasets import OFFICIAL_FILES, DatasetNotFound, data_dir

__all__ = ["SOURCES", "CLASSES", "is_tabular", "load_tabular", "other_class", "MINIBOONE_FILE", "MAX_REPEATS"]

CLASSES = {"miniboone": ("signal", "background"), "hepmass": ("signal", "background"),
           "breast_cancer": ("benign", "malignant")}
SOURCES = tuple(CLASSES)
MISSING = -999.0  # MiniBooNE's marker of a missing value
MAX_REPEATS = 5  # HEPMASS: a feature with a value repeated more often than this is dropped
TEST_SHARE = {"miniboone": 0.1, "breast_cancer": 0.2}
SPLIT_SEED = 0
MINIBOONE_FILE = OFFICIAL_FILES["miniboone"][0]


def is_tabular(name: str) -> bool:
    """Whether ``name`` names a tabular set (``SOURCE:CLASS``)."""
    source, _, cls = name.partition(":")
    return source in CLASSES and cls in CLASSES[source]


def other_class(name: str) -> str:
    """The OOD set of a flow trained on ``name``: the same source's other class."""
    source, _, cls = _parse(name)
    a, b = CLASSES[source]
    return f"{source}:{b if cls == a else a}"


def _parse(name: str) -> tuple[str, str, str]:
    source, sep, cls = name.partition(":")
    if source not in CLASSES or cls not in CLASSES[source]:
        known = ", ".join(f"{s}:{c}" for s, cs in CLASSES.items() for c in cs)
        raise DatasetNotFound(f"unknown tabular set {name!r}; known: {known}")
    return source, sep, cls


def load_tabular(name: str, split: str = "train", data_dir_: str | os.PathLike | None = None) -> np.ndarray:
    """``(N, D)`` float32 rows of one class's ``split`` of a tabular set (see the module docstring)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source, _, cls = _parse(name)
    if source == "hepmass":
        return _hepmass(cls, split, data_dir_)
    classes = _miniboone(data_dir_) if source == "miniboone" else _breast_cancer()
    rows = classes[cls]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    n_test = int(round(TEST_SHARE[source] * len(rows)))
    return np.ascontiguousarray(rows[order[n_test:]] if split == "train" else rows[order[:n_test]])


def _folder(source: str, data_dir_: str | os.PathLike | None) -> Path:
    root = data_dir(data_dir_)
    if root is None:
        raise DatasetNotFound(f"{source}: no data folder; set FLOWCORE_DATA_DIR (looked for ROOT/{source}/)")
    return root / source


def _miniboone(data_dir_: str | os.PathLike | None) -> dict[str, np.ndarray]:
    path = _folder("miniboone", data_dir_) / MINIBOONE_FILE.filename
    if not path.is_file():
        raise DatasetNotFound(f"miniboone: {path} not found (flowcore data download miniboone)")
    return parse_miniboone(path.read_text())


def parse_miniboone(text: str) -> dict[str, np.ndarray]:
    """``{"signal": (n, 50), "background": (m, 50)}`` from the official file's text, events with a missing value
    dropped. The counts line must match the events that follow."""
    lines = text.splitlines()
    try:
        n_signal, n_background = (int(v) for v in lines[0].split())
        rows = np.array([[float(v) for v in line.split()] for line in lines[1:] if line.strip()], dtype=np.float64)
    except (IndexError, ValueError) as e:
        raise ValueError(f"not a MiniBooNE_PID.txt file: {e}") from None
    if rows.ndim != 2 or len(rows) != n_signal + n_background:
        raise ValueError(f"MiniBooNE_PID.txt: its first line announces {n_signal} + {n_background} events, "
                         f"{len(rows)} follow")
    keep = ~(rows == MISSING).any(axis=1)
    return {"signal": rows[:n_signal][keep[:n_signal]].astype(np.float32),
            "background": rows[n_signal:][keep[n_signal:]].astype(np.float32)}


def _hepmass(cls: str, split: str, data_dir_: str | os.PathLike | None) -> np.ndarray:
    folder = _folder("hepmass", data_dir_)
    candidates = {s: [folder / f"1000_{s}.csv{ext}" for ext in ("", ".gz")] for s in ("train", "test")}
    files = {s: next((f for f in paths if f.is_file()), None) for s, paths in candidates.items()}
    if files[split] is None or files["train"] is None:
        raise DatasetNotFound(f"hepmass: {folder}/1000_{split}.csv[.gz] not found (the official 1000 subset; its "
                              "digests are not pinned here, so flowcore does not download it: place the files)")
    train_labels, train = parse_hepmass(_read(files["train"]))
    keep = kept_features(train)
    labels, rows = (train_labels, train) if split == "train" else parse_hepmass(_read(files[split]))
    return np.ascontiguousarray(rows[labels == (1 if cls == "signal" else 0)][:, keep].astype(np.float32))


def _read(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()


def parse_hepmass(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(N,)`` and features ``(N, 27)`` (the mass column dropped) of a HEPMASS csv file."""
    lines = [line for line in text.splitlines()[1:] if line.strip()]
    try:
        table = np.array([[float(v) for v in line.split(",")] for line in lines], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"not a HEPMASS csv file: {e}") from None
    if table.ndim != 2 or table.shape[1] != 29:
        raise ValueError(f"HEPMASS csv: expected 29 columns (label, 27 features, mass), got {table.shape}")
    return table[:, 0].astype(np.int64), table[:, 1:-1]


def kept_features(train: np.ndarray, max_repeats: int = MAX_REPEATS) -> np.ndarray:
    """Indices of the features whose most frequent training value occurs at most ``max_repeats`` times."""
    keep = []
    for j in range(train.shape[1]):
        _, counts = np.unique(train[:, j], return_counts=True)
        if counts.max() <= max_repeats:
            keep.append(j)
    return np.array(keep, dtype=np.int64)


def _breast_cancer() -> dict[str, np.ndarray]:
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        raise DatasetNotFound("breast_cancer: needs scikit-learn (pip install scikit-learn)") from None
    d = load_breast_cancer()  # read from the package itself: no download
    x = np.asarray(d.data, dtype=np.float32)
    return {"malignant": x[d.target == 0], "benign": x[d.target == 1]}
