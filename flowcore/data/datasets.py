"""Datasets as uint8 arrays, (N, H, W) grayscale or (N, H, W, 3) RGB.

One root directory, from ``data_dir=`` / ``--data-dir`` or ``$FLOWCORE_DATA_DIR``, holds the data. For each
name, the first of these that exists is used (``ROOT`` is the root directory)::

    any          ROOT/NAME.npz                      uint8 x_train, y_train, x_test, y_test (celeba32.npz: x_test
                                                    only; "train" is its first CELEBA_TRAIN images, "test" the rest)
    mnist        ROOT/mnist/  or ROOT/MNIST/raw/    official IDX files: {train,t10k}-images-idx3-ubyte[.gz]
    fashion_mnist ROOT/fashion_mnist/, ROOT/fashion-mnist/, ROOT/FashionMNIST/raw/,
                 then /usr/share/datasets/fashion-mnist/ (Debian package dataset-fashion-mnist)
    notmnist     ROOT/notmnist/ or ROOT/notMNIST/   IDX files as for mnist (often only t10k exists)
    cifar10      ROOT/cifar-10-batches-py/, ROOT/cifar10/cifar-10-batches-py/ or ROOT/cifar10/
                                                    official python batches data_batch_1..5 and test_batch
    svhn         ROOT/svhn/ or ROOT/                {train,test}_32x32.mat (cropped digits, format 2)
    celeba32     ROOT/celeba32/img_align_celeba/, ROOT/celeba/img_align_celeba/ or ROOT/img_align_celeba/
                                                    aligned 178x218 JPEGs, cropped and resized to 32x32 here

IDX names may also use a dot (``train-images.idx3-ubyte``), as some copies do. ``flowcore data download NAME``
(:func:`download`) writes the official files to ``ROOT/NAME/``, which the table above finds.

Two more forms of ``name``: ``npz:PATH`` (one npz file as above) and ``folder:PATH`` (every image below PATH,
recursively, decoded and fitted to ``image_shape`` by :func:`flowcore.data.images.preprocess`, without inversion;
if PATH has ``train/`` and ``test/`` subfolders they are the splits, otherwise both splits are the whole folder).

Safety: CIFAR-10 batches are pickles; they are read by a restricted unpickler that builds arrays itself
and never imports or calls anything the file names (see :func:`_load_cifar_batch`). Downloads are verified
against the SHA-256 digests in :data:`OFFICIAL_FILES` before they are renamed into place.

Cross-domain rule (applied only by :func:`match_shape`): grayscale -> RGB replicates the channel,
RGB -> grayscale averages the three channels (rounded); 28 -> 32 pads with zeros equally on all sides,
32 -> 28 crops the centre.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from .download import ChecksumError, DownloadError, RemoteFile, fetch, sha256_of
from .images import gray_from_rgb

__all__ = [
    "DatasetNotFound",
    "DataFormatError",
    "DownloadError",
    "ChecksumError",
    "DATASETS",
    "CELEBA_TRAIN",
    "OFFICIAL_FILES",
    "RemoteFile",
    "SYSTEM_DIRS",
    "data_dir",
    "download",
    "load_images",
    "load_examples",
    "EXAMPLE_SETS",
    "match_shape",
]

DATASETS = ("fashion_mnist", "mnist", "notmnist", "cifar10", "celeba32", "svhn")
# A few test images of each set whose licence allows it ship inside the package (flowcore release examples), so
# the dashboard has examples without FLOWCORE_DATA_DIR. Never used for training or evaluation.
EXAMPLES_FILE = Path(__file__).resolve().parents[1] / "examples" / "examples.npz"  # flowcore/examples
EXAMPLE_SETS = ("fashion_mnist", "mnist", "notmnist", "cifar10")
EXAMPLES_PER_SET = 16
# celeba32.npz holds 10,000 faces without a split: the first 9,000 train, the rest test.
CELEBA_TRAIN = 9000
# Official CelebA partition by file number (list_eval_partition.txt): train ..162770, valid ..182637, test rest.
CELEBA_LAST_TRAIN, CELEBA_LAST_VALID = 162770, 182637
# RealNVP crop of the 178x218 aligned faces: a central 148x148 box, left 15, top 40.
CELEBA_BOX = (15, 40, 163, 188)

# System-wide copies, looked at after the data root (tests may replace this).
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist",)}

_SUBDIRS: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
    "notmnist": ("notmnist", "notMNIST"),
    "cifar10": ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"),
    "svhn": ("svhn", "."),
    "celeba32": ("celeba32/img_align_celeba", "celeba/img_align_celeba", "img_align_celeba"),
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def set_label(name: str) -> str:
    """Short label of a dataset name for reference keys: ``npz:/a/b/svhn.npz`` -> ``svhn``."""
    if ":" in name:
        return Path(name.split(":", 1)[1]).stem.replace("__", "_")
    return name


class DatasetNotFound(Exception):
    """A dataset could not be found; the message says where we looked and how to get it."""


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format (or is unsafe to read)."""


_MNIST_MIRRORS = (
    "http://yann.lecun.com/exdb/mnist/",  # official; often refuses plain downloads now
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # mirror used by TensorFlow Datasets
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # mirror used by torchvision
)
_FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # official
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",  # official repo
)
_TFDS = "tensorflow/datasets tensorflow_datasets/url_checksums/{}.txt"
_KERAS_CIFAR = "keras datasets/cifar10.py file_hash (origin = the official URL below)"


def _files(mirrors: tuple[str, ...], rows: list[tuple[str, str, int, str]], source: str) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(n, tuple(m + n for m in mirrors), s, size, md5, source) for n, s, size, md5 in rows)


# All digests are SHA-256 of the exact files at the official URLs; sizes and the sources' own md5 are
# recorded too. Sources: TensorFlow Datasets' url_checksums (mnist, fashion_mnist, svhn_cropped), Keras'
# cifar10 loader; each matched at least one further independent copy, and the md5 column is the value
# the dataset authors publish (LeCun's page via torchvision, zalandoresearch/fashion-mnist README,
# the CIFAR page, torchvision's SVHN).
OFFICIAL_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": _files(
        _MNIST_MIRRORS,
        [
            (
                "train-images-idx3-ubyte.gz",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                9912422,
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            ),
            (
                "train-labels-idx1-ubyte.gz",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                28881,
                "d53e105ee54ea40749a09fcbcd1e9432",
            ),
            (
                "t10k-images-idx3-ubyte.gz",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                1648877,
                "9fb629c4189551a2d022fa330f9573f3",
            ),
            (
                "t10k-labels-idx1-ubyte.gz",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                4542,
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
        ],
        _TFDS.format("mnist"),
    ),
    "fashion_mnist": _files(
        _FASHION_MIRRORS,
        [
            (
                "train-images-idx3-ubyte.gz",
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                26421880,
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            ),
            (
                "train-labels-idx1-ubyte.gz",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                29515,
                "25c81989df183df01b3e8a0aad5dffbe",
            ),
            (
                "t10k-images-idx3-ubyte.gz",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                4422102,
                "bef4ecab320f06d8554ea6380940ec79",
            ),
            (
                "t10k-labels-idx1-ubyte.gz",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                5148,
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
        ],
        _TFDS.format("fashion_mnist"),
    ),
    "cifar10": _files(
        ("https://www.cs.toronto.edu/~kriz/",),
        [
            (
                "cifar-10-python.tar.gz",
                "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                170498071,
                "c58f30108f718f92721af3b95e74349a",
            ),
        ],
        _KERAS_CIFAR,
    ),
    "svhn": _files(
        ("http://ufldl.stanford.edu/housenumbers/",),
        [
            (
                "train_32x32.mat",
                "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8",
                182040794,
                "e26dedcc434d2e4c54c9b2d4a06d8373",
            ),
            (
                "test_32x32.mat",
                "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b",
                64275384,
                "eb5a983be6a315427106f1b164d9cef3",
            ),
        ],
        _TFDS.format("svhn_cropped"),
    ),
    # tabular (App. K.3; flowcore.data.tabular reads it): the official UCI file, digest from a Git-LFS pointer to it
    "miniboone": (
        RemoteFile(
            "MiniBooNE_PID.txt",
            ("https://archive.ics.uci.edu/ml/machine-learning-databases/00199/MiniBooNE_PID.txt",),
            "577ab8bcb612199a0386cef1725058295df9a18b778a003a6a4349bbd51abd48",
            91_174_877,
            source="a Git-LFS pointer to the official file in a public repository",
        ),
    ),
}

_NO_DOWNLOAD = {
    "hepmass": (
        "the official HEPMASS files' digests are not pinned here (no copy was reachable to take them from), so "
        "flowcore does not download them unverified; put 1000_train.csv.gz and 1000_test.csv.gz from "
        "archive.ics.uci.edu/ml/datasets/HEPMASS in ROOT/hepmass/"
    ),
    "notmnist": (
        "notMNIST has no stable official direct download (the author's page links change); put the IDX files "
        "{train,t10k}-images-idx3-ubyte.gz (e.g. from github.com/davidflanagan/notMNIST-to-MNIST) in "
        "ROOT/notmnist/, or notmnist.npz in ROOT"
    ),
    "celeba32": (
        "CelebA has no stable official direct download (it is served from Google Drive / Baidu behind the CelebA "
        "agreement); download img_align_celeba.zip from mmlab.ie.cuhk.edu.hk/projects/CelebA.html, unzip it to "
        "ROOT/celeba/img_align_celeba/ (add Eval/list_eval_partition.txt for the official split), or put "
        "celeba32.npz in ROOT"
    ),
}


def _how_to_get(name: str) -> str:
    if name in _NO_DOWNLOAD:
        return _NO_DOWNLOAD[name].replace("ROOT", "$FLOWCORE_DATA_DIR")
    return f"run `flowcore data download {name}` or set FLOWCORE_DATA_DIR (or --data-dir) to a folder holding it"


# ------------------------------------------------------------------------------------------- loading


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """``explicit`` or ``$FLOWCORE_DATA_DIR`` (None when neither is set)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("FLOWCORE_DATA_DIR")
    return Path(env) if env else None


def _from_npz(path: Path, split: str) -> np.ndarray:
    """``split`` of an npz file (a fresh array: callers may write to it)."""
    st = path.stat()
    return _decoded_npz(str(path.resolve()), st.st_mtime_ns, st.st_size, split).copy()


@functools.lru_cache(maxsize=4)
def _decoded_npz(path: str, mtime_ns: int, size: int, split: str) -> np.ndarray:
    """Decoded once per process: an LZMA-compressed npz (our CIFAR-10) takes seconds to read. Keyed by the
    file's modification time and size too, so a replaced file is read again."""
    arr = _read_npz(Path(path), split)
    arr.setflags(write=False)
    return arr


def _read_npz(path: Path, split: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as d:
        key = f"x_{split}"
        if path.stem.startswith("celeba") and "x_train" not in d.files and "x_test" in d.files:
            # faces without a split: the first CELEBA_TRAIN train, the rest test (never overlapping)
            x = np.asarray(d["x_test"], dtype=np.uint8)
            return x[:CELEBA_TRAIN] if split == "train" else x[CELEBA_TRAIN:]
        if key in d.files:
            x = np.asarray(d[key], dtype=np.uint8)
            labels = f"y_{split}"
            return _interleave_classes(x, np.asarray(d[labels])) if labels in d.files else x
        raise DatasetNotFound(f"{path} has no {key!r} array (arrays: {', '.join(d.files)})")


def _interleave_classes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x`` in round-robin class order when it is stored class-major (labels sorted), else unchanged.

    Evaluation and the app take the first N images of a set; of a class-major copy (our staged CIFAR-10
    test set) that would be the first few classes only. Interleaving makes every prefix class-balanced.
    """
    y = y.astype(np.int64)  # np.diff of unsigned labels would wrap around instead of going negative
    if y.ndim != 1 or len(y) != len(x) or len(x) < 2 or np.any(np.diff(y) < 0) or y[0] == y[-1]:
        return x
    _, first, counts = np.unique(y, return_index=True, return_counts=True)
    within = np.arange(len(y)) - np.repeat(first, counts)  # index of each image inside its class
    return x[np.lexsort((y, within))]


def load_images(
    name: str,
    split: str = "train",
    data_dir_: str | os.PathLike | None = None,
    image_shape: tuple[int, int, int] | list[int] | None = None,
) -> np.ndarray:
    """Images of dataset ``name`` (one of :data:`DATASETS`, ``npz:PATH`` or ``folder:PATH``) for ``split``.

    With ``image_shape`` ([C, H, W]) the result is fitted to it: by :func:`match_shape` for datasets, by
    :func:`flowcore.data.images.preprocess` for folders (whose images may differ in size and mode).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name.startswith("folder:"):
        return _from_folder(Path(name[7:]).expanduser(), split, image_shape)
    if name.startswith("npz:"):
        path = Path(name[4:])
        if not path.is_file():
            raise DatasetNotFound(f"npz file not found: {path}")
        return _fit_to(_from_npz(path, split), image_shape)
    if name not in DATASETS:
        raise DatasetNotFound(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, npz:PATH, folder:PATH")
    root = data_dir(data_dir_)
    looked: list[str] = []
    if root is not None:
        npz = root / f"{name}.npz"
        if npz.is_file():
            return _fit_to(_from_npz(npz, split), image_shape)
        looked.append(str(npz))
    for d in _search_dirs(name, root):
        x = _FINDERS[name](d, split, looked)
        if x is not None:
            return _fit_to(x, image_shape)
    where = "; ".join(looked) if looked else "nowhere"
    unset = "" if root is not None else " (FLOWCORE_DATA_DIR is not set)"
    raise DatasetNotFound(
        f"dataset {name!r} ({split}) not found{unset}; looked in: {where}; to get it: {_how_to_get(name)}"
    )


def load_examples(name: str, image_shape: tuple[int, int, int] | list[int] | None = None) -> np.ndarray:
    """The first :data:`EXAMPLES_PER_SET` test images of ``name`` bundled with the package (for display only)."""
    if name not in EXAMPLE_SETS or not EXAMPLES_FILE.is_file():
        bundled = ", ".join(EXAMPLE_SETS)
        raise DatasetNotFound(f"no bundled examples of {name!r} (bundled: {bundled}); set FLOWCORE_DATA_DIR")
    with np.load(EXAMPLES_FILE, allow_pickle=False) as d:
        return _fit_to(np.asarray(d[name], dtype=np.uint8), image_shape)


def _fit_to(x: np.ndarray, image_shape: tuple[int, int, int] | list[int] | None) -> np.ndarray:
    return x if image_shape is None else match_shape(x, image_shape)


def _search_dirs(name: str, root: Path | None) -> list[Path]:
    dirs = [root / sub if sub != "." else root for sub in _SUBDIRS[name]] if root is not None else []
    return dirs + [Path(p) for p in SYSTEM_DIRS.get(name, ())]


def _find_idx(d: Path, split: str, looked: list[str]) -> np.ndarray | None:
    prefix = _IDX_PREFIX[split]
    looked.append(str(d / f"{prefix}-images-idx3-ubyte[.gz]"))
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"):
        for suffix in (".gz", ""):
            p = d / (stem + suffix)
            if p.is_file():
                x = _read_idx(p)
                if x.ndim != 3:
                    raise DataFormatError(f"{p}: expected images (N, H, W), got an IDX array of shape {x.shape}")
                return x
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's format: 2 zero bytes, type 0x08, ndim, big-endian uint32 dims, data)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # by content: browsers often un-gzip a .gz download and keep its name
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataFormatError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4 or raw[0] or raw[1]:
        raise DataFormatError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataFormatError(f"{path}: IDX data type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim == 0 or len(raw) < head:
        raise DataFormatError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - head != count:
        raise DataFormatError(f"{path}: IDX header says {dims} ({count} bytes) but {len(raw) - head} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=head).reshape(dims).copy()


def _find_cifar(d: Path, split: str, looked: list[str]) -> np.ndarray | None:
    names = _CIFAR_FILES[split]
    looked.append(str(d / ("{" + ",".join(names) + "}" if len(names) > 1 else names[0])))
    paths = [d / n for n in names]
    if not all(p.is_file() for p in paths):
        return None
    x = np.concatenate([_load_cifar_batch(p) for p in paths])
    return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _find_svhn(d: Path, split: str, looked: list[str]) -> np.ndarray | None:
    p = d / f"{split}_32x32.mat"
    looked.append(str(p))
    if not p.is_file():
        return None
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataFormatError(f"{p}: reading SVHN's MATLAB files needs scipy: pip install -e \".[svhn]\"") from None
    try:
        x = loadmat(p, variable_names=["X"]).get("X")
    except Exception as e:  # scipy raises several types on damaged .mat files
        raise DataFormatError(f"{p}: not a readable MATLAB file ({e})") from e
    if x is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataFormatError(f"{p}: expected X of shape (32, 32, 3, N), got {None if x is None else x.shape}")
    return np.ascontiguousarray(np.asarray(x, dtype=np.uint8).transpose(3, 0, 1, 2))


def _find_celeba(d: Path, split: str, looked: list[str]) -> np.ndarray | None:
    looked.append(str(d / "*.jpg"))
    if not d.is_dir():
        return None
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file())
    if not files:
        return None
    partition = _celeba_partition(d)
    want = 0 if split == "train" else 2
    chosen = []
    for p in files:
        part = partition.get(p.name) if partition is not None else _celeba_part_by_number(p.stem)
        if part == want:
            chosen.append(p)
    if not chosen:
        raise DatasetNotFound(
            f"{d} holds {len(files)} CelebA images but none in the official {split} partition "
            f"(train: 000001-{CELEBA_LAST_TRAIN:06d}, test: {CELEBA_LAST_VALID + 1:06d}-)"
        )
    return np.stack([_celeba_crop(p) for p in chosen])


def _celeba_part_by_number(stem: str) -> int | None:
    if not stem.isdigit():
        return None
    n = int(stem)
    return 0 if n <= CELEBA_LAST_TRAIN else 1 if n <= CELEBA_LAST_VALID else 2


def _celeba_partition(d: Path) -> dict[str, int] | None:
    for p in (d.parent / "list_eval_partition.txt", d.parent / "Eval" / "list_eval_partition.txt"):
        if p.is_file():
            out: dict[str, int] = {}
            for line in p.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    out[parts[0]] = int(parts[1])
            return out
    return None


def _celeba_crop(path: Path) -> np.ndarray:
    """RealNVP preprocessing: the central 148x148 box of a 178x218 face, Lanczos to 32x32.

    Other sizes (e.g. copies already downscaled 2x) use the same box scaled to their size.
    """
    from PIL import Image

    from .images import ImageError, decode_image

    try:
        img = decode_image(path).convert("RGB")
    except ImageError as e:
        raise DataFormatError(str(e)) from e
    sx, sy = img.width / 178.0, img.height / 218.0
    box = (CELEBA_BOX[0] * sx, CELEBA_BOX[1] * sy, CELEBA_BOX[2] * sx, CELEBA_BOX[3] * sy)
    return np.asarray(img.resize((32, 32), Image.Resampling.LANCZOS, box=box), dtype=np.uint8)


_FINDERS: dict[str, Callable[[Path, str, list[str]], np.ndarray | None]] = {
    "mnist": _find_idx,
    "fashion_mnist": _find_idx,
    "notmnist": _find_idx,
    "cifar10": _find_cifar,
    "svhn": _find_svhn,
    "celeba32": _find_celeba,
}


def _from_folder(path: Path, split: str, image_shape: tuple[int, int, int] | list[int] | None) -> np.ndarray:
    from .images import IMAGE_SUFFIXES, ImageError, decode_image, is_grayscale, preprocess

    if not path.is_dir():
        raise DatasetNotFound(f"image folder not found: {path}")
    if (path / "train").is_dir() and (path / "test").is_dir():
        path = path / split
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    images, bad = [], []
    for p in files:
        try:
            images.append(decode_image(p))
        except ImageError as e:
            bad.append(str(e))
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable file(s) in {path}: {bad[0]}", stacklevel=2)
    if not images:
        raise DatasetNotFound(f"no readable images ({', '.join(IMAGE_SUFFIXES)}) below {path}")
    if image_shape is None:
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise ValueError(f"images in {path} differ in size ({len(sizes)} sizes); pass image_shape=[C, H, W]")
        (w, h), c = sizes.pop(), (1 if all(is_grayscale(im) for im in images) else 3)
        image_shape = (c, h, w)
    return np.stack([preprocess(im, image_shape, invert=False).array for im in images])


# ---------------------------------------------------------------------------- CIFAR restricted pickle


class _ArrayStub:
    """What a pickle's ``_reconstruct(ndarray, (0,), b'b')`` builds; its state becomes a copied numpy array."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: object = None

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise pickle.UnpicklingError("unexpected ndarray state")
        shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DtypeStub) or not isinstance(raw, bytes):
            raise pickle.UnpicklingError("unexpected ndarray state")
        if not isinstance(shape, tuple) or not all(type(s) is int and s >= 0 for s in shape):
            raise pickle.UnpicklingError("bad ndarray shape")
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.dtype.itemsize != len(raw):
            raise pickle.UnpicklingError("ndarray data does not match its shape")
        flat = np.frombuffer(raw, dtype=dtype.dtype, count=count)
        self.value = flat.reshape(shape, order="F" if fortran else "C").copy()


class _DtypeStub:
    """What a pickle's ``numpy.dtype(spec, align, copy)`` builds; only plain numeric dtypes are allowed."""

    __slots__ = ("dtype",)
    _ALLOWED = frozenset({"u1", "i1", "b1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8"})

    def __init__(self, spec: object) -> None:
        text = spec.decode("latin-1") if isinstance(spec, bytes) else spec
        if not isinstance(text, str) or text not in self._ALLOWED:
            raise pickle.UnpicklingError(f"dtype {spec!r} is not allowed")
        self.dtype = np.dtype(text)

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) < 8 or any(v is not None for v in state[2:5]):
            raise pickle.UnpicklingError("structured or sub-array dtypes are not allowed")
        order = state[1].decode("latin-1") if isinstance(state[1], bytes) else state[1]
        if order not in ("|", "<", ">", "="):
            raise pickle.UnpicklingError(f"bad dtype byte order {order!r}")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


# The only globals a batch may name. Each maps to an instance (not a class or function: no attributes a
# pickle could overwrite, nothing it could instantiate) that builds one of the inert stubs above.
class _Global:
    __slots__ = ()


class _NdarrayGlobal(_Global):
    """``numpy.ndarray``: not callable; only accepted as ``_reconstruct``'s first argument."""

    __slots__ = ()


class _ReconstructGlobal(_Global):
    __slots__ = ()

    def __call__(self, subtype: object, shape: object = None, typecode: object = None) -> _ArrayStub:
        if not isinstance(subtype, _NdarrayGlobal):
            raise pickle.UnpicklingError("only plain numpy arrays are allowed")
        return _ArrayStub()


class _DtypeGlobal(_Global):
    __slots__ = ()

    def __call__(self, spec: object, align: object = False, copy: object = False) -> _DtypeStub:
        return _DtypeStub(spec)


class _EncodeGlobal(_Global):
    """Python 3 pickles bytes at protocol 2 as ``_codecs.encode(str, 'latin1')``; nothing else is honoured."""

    __slots__ = ()

    def __call__(self, text: object, encoding: object = "latin1") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("only latin-1 byte strings are allowed")
        return text.encode("latin-1")


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global except numpy's array-rebuilding names (and protocol 2's bytes encoder)."""

    _GLOBALS: dict[tuple[str, str], _Global] = {
        ("numpy.core.multiarray", "_reconstruct"): _ReconstructGlobal(),
        ("numpy._core.multiarray", "_reconstruct"): _ReconstructGlobal(),
        ("numpy", "ndarray"): _NdarrayGlobal(),
        ("numpy", "dtype"): _DtypeGlobal(),
        ("_codecs", "encode"): _EncodeGlobal(),
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _unstub(obj: object) -> object:
    if isinstance(obj, _ArrayStub):
        if not isinstance(obj.value, np.ndarray):
            raise pickle.UnpicklingError("ndarray without state")
        return obj.value
    if isinstance(obj, dict):
        return {k: _unstub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unstub(v) for v in obj)
    if isinstance(obj, (bytes, str, int, float, bool, type(None))):
        return obj
    raise pickle.UnpicklingError(f"unexpected {type(obj).__name__} in batch")


def _load_cifar_batch(path: Path) -> np.ndarray:
    """The (N, 3072) uint8 ``data`` of one official CIFAR-10 python batch, read without running pickle code."""
    try:
        raw = path.read_bytes()
        obj = _unstub(_CifarUnpickler(io.BytesIO(raw), encoding="bytes").load())
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        struct.error,
        RecursionError,
    ) as e:
        raise DataFormatError(f"{path}: not a safe CIFAR-10 batch ({e})") from e
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: not a CIFAR-10 batch (top level is {type(obj).__name__}, not dict)")
    data = obj.get(b"data", obj.get("data"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataFormatError(f"{path}: 'data' is not a uint8 (N, 3072) array")
    return data


# ------------------------------------------------------------------------------------------ download


def download(
    name: str,
    root: str | os.PathLike | None = None,
    base_url: str | None = None,
    *,
    timeout: float = 60.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Fetch the official files of ``name`` into ``ROOT/NAME/`` (ROOT: ``root`` or ``$FLOWCORE_DATA_DIR``).

    Every file is checked against :data:`OFFICIAL_FILES` (size and SHA-256) in a temporary file that is
    renamed into place only when it matches; files already present with the right digest are kept.
    ``base_url`` replaces the official hosts (a mirror, or a loopback server in tests). CIFAR-10's archive
    is unpacked to ``ROOT/cifar10/cifar-10-batches-py/``. ``progress(filename, done_bytes, total_bytes)``
    is called as bytes arrive. Returns ``ROOT/NAME``.
    """
    if name in _NO_DOWNLOAD:
        raise DownloadError(f"cannot download {name!r}: {_NO_DOWNLOAD[name]}")
    if name not in OFFICIAL_FILES:
        raise ValueError(f"unknown dataset {name!r}; downloadable: {', '.join(OFFICIAL_FILES)}")
    base = data_dir(root)
    if base is None:
        raise ValueError("no data folder: pass --data-dir or set FLOWCORE_DATA_DIR")
    dest = base / name
    dest.mkdir(parents=True, exist_ok=True)
    for rf in OFFICIAL_FILES[name]:
        target = dest / rf.filename
        if target.is_file() and target.stat().st_size == rf.size and sha256_of(target) == rf.sha256:
            continue
        urls = (base_url.rstrip("/") + "/" + rf.filename,) if base_url else rf.urls
        fetch(urls, target, rf, timeout, progress)
    if name == "cifar10":
        _extract_cifar(dest / OFFICIAL_FILES["cifar10"][0].filename, dest)
    return dest


def _extract_cifar(archive: Path, dest: Path) -> None:
    """Unpack ``cifar-10-batches-py/*`` from the verified archive, writing plain files only (no links, no
    absolute or ``..`` paths, nothing outside that folder), first to a temporary folder, then renamed."""
    final = dest / "cifar-10-batches-py"
    if all((final / n).is_file() for n in (*_CIFAR_FILES["train"], *_CIFAR_FILES["test"])):
        return
    tmp = Path(tempfile.mkdtemp(prefix=".cifar-extract-", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tf:
                for m in tf:
                    parts = PurePosixPath(m.name).parts
                    unsafe = (
                        m.name.startswith(("/", "\\"))
                        or "\\" in m.name
                        or ".." in parts
                        or not (m.isfile() or m.isdir())
                        or not parts
                        or parts[0] != "cifar-10-batches-py"
                        or len(parts) > 2
                    )
                    if unsafe:
                        raise DataFormatError(f"{archive}: refusing unsafe or unexpected archive member {m.name!r}")
                    if m.isdir():
                        continue
                    src = tf.extractfile(m)
                    if src is None:
                        raise DataFormatError(f"{archive}: cannot read member {m.name!r}")
                    with src, open(tmp / parts[1], "wb") as out:
                        shutil.copyfileobj(src, out)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataFormatError(f"{archive}: broken archive ({e})") from e
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ------------------------------------------------------------------------------------- shape matching


def match_shape(images: np.ndarray, image_shape: tuple[int, int, int] | list[int]) -> np.ndarray:
    """Bring uint8 images (N, H, W[, 3]) to a model's ``[C, H, W]`` by the project's cross-domain rule.

    Returns (N, H, W) for C = 1 and (N, H, W, 3) for C = 3.
    """
    c, h, w = (int(v) for v in image_shape)
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if c == 1 and x.ndim == 4:
        x = gray_from_rgb(x)
    elif c == 3 and x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    x = _fit_spatial(x, h, w)
    return np.ascontiguousarray(x)


def _fit_spatial(x: np.ndarray, h: int, w: int) -> np.ndarray:
    for axis, size in ((1, h), (2, w)):
        cur = x.shape[axis]
        if cur < size:
            before = (size - cur) // 2
            pad = [(0, 0)] * x.ndim
            pad[axis] = (before, size - cur - before)
            x = np.pad(x, pad)
        elif cur > size:
            start = (cur - size) // 2
            x = np.take(x, np.arange(start, start + size), axis=axis)
    return x
