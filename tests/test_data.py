"""Dataset loading (flowcore.data.datasets): every on-disk layout, safe CIFAR unpickling, verified downloads."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from flowcore.data import datasets as data
from flowcore.data.datasets import (
    ChecksumError,
    DataFormatError,
    DatasetNotFound,
    DownloadError,
    RemoteFile,
    download,
    load_images,
    match_shape,
)

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """No env root and no system copies unless a test sets them."""
    monkeypatch.delenv("FLOWCORE_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DIRS", {})


# ------------------------------------------------------------------------------ writers (official formats)


def idx_bytes(x: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, x.ndim]) + struct.pack(f">{x.ndim}I", *x.shape) + x.astype(np.uint8).tobytes()


def write_cifar_batch(path, x_hwc: np.ndarray, labels: list[int]) -> None:
    """As the official python batches: dict of b'data' (N, 3072) channel-major uint8 and b'labels'."""
    flat = x_hwc.transpose(0, 3, 1, 2).reshape(len(x_hwc), 3072)
    batch = {
        b"batch_label": b"synthetic batch",
        b"labels": labels,
        b"data": np.ascontiguousarray(flat, dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def py2_batch_bytes(flat: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote the official files: str opcodes (no _codecs), numpy.core names."""

    def s(b: bytes) -> bytes:  # SHORT_BINSTRING or BINSTRING: a Python 2 str
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b

    n = len(flat)
    out = b"\x80\x02}(" + s(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
    out += b"(K\x01" + b"J" + struct.pack("<i", n) + b"M\x00\x0c\x86"  # version 1, shape (n, 3072)
    out += b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89" + s(flat.astype(np.uint8).tobytes()) + b"tb"
    out += s(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return out + b"u."


def cifar_tree(d, n=2):
    d.mkdir(parents=True, exist_ok=True)
    train = []
    for i in range(1, 6):
        x = RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        write_cifar_batch(d / f"data_batch_{i}", x, [i % 10] * n)
        train.append(x)
    test = RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(d / "test_batch", test, [0] * n)
    return np.concatenate(train), test


# --------------------------------------------------------------------------------------------- layouts


def test_npz_layout_and_npz_path(tmp_path):
    x_tr = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    x_te = RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.savez_compressed(tmp_path / "mnist.npz", x_train=x_tr, y_train=np.zeros(5), x_test=x_te, y_test=np.zeros(3))
    assert np.array_equal(load_images("mnist", "train", tmp_path), x_tr)  # positional API unchanged
    assert np.array_equal(load_images("mnist", "test", data_dir_=str(tmp_path)), x_te)
    assert np.array_equal(load_images(f"npz:{tmp_path / 'mnist.npz'}", "test"), x_te)
    assert load_images("mnist", "test", tmp_path, image_shape=(3, 32, 32)).shape == (3, 32, 32, 3)

    faces = RNG.integers(0, 256, (data.CELEBA_TRAIN + 2, 2, 2, 3), dtype=np.uint8)
    np.savez(tmp_path / "celeba32.npz", x_test=faces)
    assert len(load_images("celeba32", "train", tmp_path)) == data.CELEBA_TRAIN
    # the two splits never overlap
    assert np.array_equal(load_images("celeba32", "test", tmp_path), faces[data.CELEBA_TRAIN :])


def test_npz_is_decoded_once_and_callers_get_their_own_copy(tmp_path, monkeypatch):
    images = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=images, x_test=images[:1])
    reads = []
    real = data._read_npz
    monkeypatch.setattr(data, "_read_npz", lambda path, split: reads.append(split) or real(path, split))
    data._decoded_npz.cache_clear()
    first = load_images("cifar10", "train", tmp_path)
    first[0] = 0  # the caller's own array: writing to it changes nothing for the next caller
    again = load_images("cifar10", "train", tmp_path)
    assert reads == ["train"] and np.array_equal(again, images)
    # a replaced file is read again
    np.savez(tmp_path / "cifar10.npz", x_train=images[:2], x_test=images[:1])
    assert np.array_equal(load_images("cifar10", "train", tmp_path), images[:2]) and reads == ["train", "train"]
    assert "cifar10_lossless" not in data.DATASETS


def test_idx_gz_and_plain(tmp_path, monkeypatch):
    x_tr = RNG.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    x_te = RNG.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    d = tmp_path / "fashion_mnist"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x_tr)))
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x_te))
    monkeypatch.setenv("FLOWCORE_DATA_DIR", str(tmp_path))
    assert np.array_equal(load_images("fashion_mnist", "train"), x_tr)
    assert np.array_equal(load_images("fashion_mnist", "test"), x_te)

    raw = tmp_path / "MNIST" / "raw"  # torchvision's layout, dotted names as in some copies
    raw.mkdir(parents=True)
    (raw / "t10k-images.idx3-ubyte").write_bytes(idx_bytes(x_te))
    assert np.array_equal(load_images("mnist", "test"), x_te)

    (tmp_path / "notmnist").mkdir()
    (tmp_path / "notmnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 12)
    with pytest.raises(DataFormatError, match="not unsigned byte"):
        load_images("notmnist", "test")
    (tmp_path / "notmnist" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x_te)[:-5]))
    with pytest.raises(DataFormatError, match="bytes follow"):
        load_images("notmnist", "test")


def test_debian_system_copy_of_fashion_mnist(tmp_path, monkeypatch):
    x = RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion_mnist": (str(tmp_path),)})
    assert np.array_equal(load_images("fashion_mnist", "test"), x)  # no data root needed


def test_cifar_python_batches(tmp_path):
    train, test = cifar_tree(tmp_path / "cifar-10-batches-py")
    got = load_images("cifar10", "train", tmp_path)
    assert got.shape == (10, 32, 32, 3) and got.dtype == np.uint8
    assert np.array_equal(got, train)
    assert np.array_equal(load_images("cifar10", "test", tmp_path), test)


def test_class_major_npz_is_interleaved_so_every_prefix_is_balanced(tmp_path):
    # our staged CIFAR-10 test set is stored class by class: its first 5000 would be 5 classes only
    y = np.repeat(np.arange(3, dtype=np.uint8), [4, 3, 3])
    x = (np.arange(10, dtype=np.uint8)[:, None, None] * np.ones((1, 8, 8), np.uint8))  # image i is all i
    np.savez(tmp_path / "sorted.npz", x_test=x, y_test=y, x_train=x,
             y_train=np.array([0, 1, 0, 1, 0, 1, 0, 1, 2, 2], np.uint8))  # uint8 labels, as staged
    got = load_images(f"npz:{tmp_path / 'sorted.npz'}", "test")[:, 0, 0]
    assert got.tolist() == [0, 4, 7, 1, 5, 8, 2, 6, 9, 3]  # round robin over the classes, in order within each
    assert np.array_equal(load_images(f"npz:{tmp_path / 'sorted.npz'}", "train"), x)  # unsorted labels: as stored
    np.savez(tmp_path / "one_class.npz", x_test=x, y_test=np.zeros(10, np.uint8))
    assert np.array_equal(load_images(f"npz:{tmp_path / 'one_class.npz'}", "test"), x)


def test_cifar_python2_opcodes(tmp_path):
    x = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    flat = x.transpose(0, 3, 1, 2).reshape(3, 3072)
    raw = py2_batch_bytes(flat, [1, 2, 3])
    assert np.array_equal(pickle.loads(raw, encoding="bytes")[b"data"], flat)  # the helper is faithful
    d = tmp_path / "cifar10"
    cifar_tree(d)
    (d / "test_batch").write_bytes(raw)
    assert np.array_equal(load_images("cifar10", "test", tmp_path), x)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


class _EvilSystem:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "payload",
    [
        lambda t: {b"data": _Evil(t)},
        lambda t: [_EvilSystem()],
        lambda t: {b"data": np.ma.masked_array(np.zeros((1, 3072), np.uint8))},
        lambda t: {b"data": np.array([[1, "x"]], dtype=object)},
        lambda t: {b"data": np.zeros((1, 3072), np.uint8), b"extra": _Evil(t)},
    ],
    ids=["open-file", "os-system", "masked-array", "object-array", "evil-after-data"],
)
def test_malicious_cifar_pickle_is_refused_without_running(tmp_path, payload):
    d = tmp_path / "cifar-10-batches-py"
    cifar_tree(d)
    target = tmp_path / "pwned.txt"
    (d / "data_batch_3").write_bytes(pickle.dumps(payload(str(target)), protocol=2))
    with pytest.raises(DataFormatError, match="not a safe CIFAR-10 batch|not a CIFAR-10 batch"):
        load_images("cifar10", "train", tmp_path)
    assert not target.exists()


def test_cifar_batch_of_wrong_shape_is_refused(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    cifar_tree(d)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}, protocol=2))
    with pytest.raises(DataFormatError, match="3072"):
        load_images("cifar10", "test", tmp_path)


def test_svhn_mat(tmp_path):
    x = RNG.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": np.ones((4, 1), np.uint8)})
    got = load_images("svhn", "test", tmp_path)
    assert got.shape == (4, 32, 32, 3)
    assert np.array_equal(got, x.transpose(3, 0, 1, 2))


def _face(inner, outer):
    a = np.full((218, 178, 3), outer, np.uint8)
    l_, t, r, b = data.CELEBA_BOX
    a[t:b, l_:r] = inner
    return Image.fromarray(a)


def test_celeba_img_align_folder(tmp_path):
    d = tmp_path / "celeba" / "img_align_celeba"
    d.mkdir(parents=True)
    for name, colour in (("000001", 200), ("000002", 120), ("182638", 40)):
        _face(colour, 255 - colour).save(d / f"{name}.jpg", quality=95)
    train = load_images("celeba32", "train", tmp_path)
    test = load_images("celeba32", "test", tmp_path)
    assert train.shape == (2, 32, 32, 3) and test.shape == (1, 32, 32, 3)
    assert abs(float(train[0].mean()) - 200) < 3 and abs(float(test[0].mean()) - 40) < 3  # box only

    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 2\n000002.jpg 0\n182638.jpg 0\n")
    assert len(load_images("celeba32", "train", tmp_path)) == 2
    assert abs(float(load_images("celeba32", "test", tmp_path)[0].mean()) - 200) < 3


def test_image_folder_mixed_modes(tmp_path):
    d = tmp_path / "pics"
    (d / "sub").mkdir(parents=True)
    digit = np.zeros((28, 28), np.uint8)
    digit[7:21, 12:16] = 255
    Image.fromarray(digit).save(d / "a_gray.png")
    Image.fromarray(np.stack([digit] * 3, -1)).resize((56, 40)).save(d / "b_rgb.jpg")
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., :3], rgba[8:22, 13:17, 3] = 255, 255
    Image.fromarray(rgba, "RGBA").save(d / "sub" / "c_rgba.png")
    Image.fromarray(digit).convert("P").save(d / "sub" / "d_palette.gif")
    Image.fromarray(digit.astype(np.uint16) * 257).save(d / "e_16bit.png")
    (d / "f_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (d / "notes.txt").write_text("not an image, not even looked at")

    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        gray = load_images(f"folder:{d}", "test", image_shape=(1, 28, 28))
    assert gray.shape == (5, 28, 28) and gray.dtype == np.uint8
    assert all(img[14, 14] > 200 and img[2, 2] < 30 for img in gray)  # light digit, dark ground, none inverted
    with pytest.warns(UserWarning):
        rgb = load_images(f"folder:{d}", "train", image_shape=[3, 32, 32])
    assert rgb.shape == (5, 32, 32, 3)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="image_shape"):
        load_images(f"folder:{d}", "train")

    same = tmp_path / "same"
    (same / "train").mkdir(parents=True)
    (same / "test").mkdir()
    Image.fromarray(digit).save(same / "train" / "x.png")
    Image.fromarray(digit).save(same / "test" / "y.bmp")
    Image.fromarray(255 - digit).save(same / "test" / "z.png")
    assert np.array_equal(load_images(f"folder:{same}", "train"), digit[None])
    assert load_images(f"folder:{same}", "test").shape == (2, 28, 28)
    with pytest.raises(DatasetNotFound):
        load_images(f"folder:{tmp_path / 'nope'}")


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFound) as e:
        load_images("svhn", "train", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    for place in (tmp_path / "svhn.npz", tmp_path / "svhn" / "train_32x32.mat", tmp_path / "train_32x32.mat"):
        assert str(place) in msg
    assert "flowcore data download svhn" in msg and "FLOWCORE_DATA_DIR" in msg

    with pytest.raises(DatasetNotFound) as e:
        load_images("mnist", "test")
    assert "FLOWCORE_DATA_DIR is not set" in str(e.value) and "flowcore data download mnist" in str(e.value)
    with pytest.raises(DatasetNotFound) as e:
        load_images("celeba32", "train", tmp_path)
    assert "img_align_celeba" in str(e.value) and "no stable official direct download" in str(e.value)
    with pytest.raises(DatasetNotFound, match="unknown dataset"):
        load_images("imagenet", "train", tmp_path)


def test_match_shape_rules():
    gray28 = RNG.integers(1, 256, (2, 28, 28), dtype=np.uint8)
    padded = match_shape(gray28, (1, 32, 32))
    assert padded.shape == (2, 32, 32)
    assert np.array_equal(padded[:, 2:30, 2:30], gray28) and padded[:, :2].max() == 0 and padded[:, :, 30:].max() == 0
    rgb32 = RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    cropped = match_shape(rgb32, (3, 28, 28))
    assert np.array_equal(cropped, rgb32[:, 2:30, 2:30])
    to_gray = match_shape(rgb32, (1, 32, 32))
    assert np.array_equal(to_gray, np.round(rgb32.astype(np.float32).mean(-1)).astype(np.uint8))
    to_rgb = match_shape(gray28, (3, 28, 28))
    assert to_rgb.shape == (2, 28, 28, 3) and all(np.array_equal(to_rgb[..., c], gray28) for c in range(3))
    assert match_shape(gray28[..., None], (1, 28, 28)).shape == (2, 28, 28)


# ------------------------------------------------------------------------------------------- downloads


class _Quiet(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        _Quiet.hits.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Quiet.hits = []
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/files"
    httpd.shutdown()
    httpd.server_close()


def _remote(path, name=None) -> RemoteFile:
    raw = path.read_bytes()
    return RemoteFile(name or path.name, ("http://invalid.example/",), hashlib.sha256(raw).hexdigest(), len(raw))


def test_download_verifies_and_is_loadable(server, tmp_path, monkeypatch):
    served, url = server
    (served / "files").mkdir()
    x = RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    (served / "files" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
    monkeypatch.setitem(data.OFFICIAL_FILES, "mnist", (_remote(served / "files" / "t10k-images-idx3-ubyte.gz"),))
    seen = []
    root = tmp_path / "root"
    out = download("mnist", root, base_url=url, progress=lambda f, done, total: seen.append((done, total)))
    assert out == root / "mnist" and seen[-1][0] == seen[-1][1]
    assert np.array_equal(load_images("mnist", "test", root), x)
    assert sorted(p.name for p in out.iterdir()) == ["t10k-images-idx3-ubyte.gz"]
    hits = len(_Quiet.hits)
    download("mnist", root, base_url=url)  # already there and verified: nothing fetched
    assert len(_Quiet.hits) == hits


def test_checksum_mismatch_is_refused_and_leaves_no_file(server, tmp_path, monkeypatch):
    served, url = server
    (served / "files").mkdir()
    (served / "files" / "train_32x32.mat").write_bytes(b"tampered bytes")
    good = RemoteFile("train_32x32.mat", (), hashlib.sha256(b"the real bytes").hexdigest(), len(b"tampered bytes"))
    monkeypatch.setitem(data.OFFICIAL_FILES, "svhn", (good,))
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        download("svhn", tmp_path / "root", base_url=url)
    assert list((tmp_path / "root" / "svhn").iterdir()) == []
    with pytest.raises(DownloadError):  # 404
        monkeypatch.setitem(data.OFFICIAL_FILES, "svhn", (RemoteFile("missing.mat", (), "0" * 64, 1),))
        download("svhn", tmp_path / "root", base_url=url)
    assert list((tmp_path / "root" / "svhn").iterdir()) == []


def _tar_gz(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))


def test_cifar_download_extracts_safely(server, tmp_path, monkeypatch):
    served, url = server
    (served / "files").mkdir()
    train, test = cifar_tree(tmp_path / "src")
    members = {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in sorted((tmp_path / "src").iterdir())}
    archive = served / "files" / "cifar-10-python.tar.gz"
    _tar_gz(archive, members)
    monkeypatch.setitem(data.OFFICIAL_FILES, "cifar10", (_remote(archive),))
    root = tmp_path / "root"
    download("cifar10", root, base_url=url)
    assert np.array_equal(load_images("cifar10", "train", root), train)
    assert np.array_equal(load_images("cifar10", "test", root), test)

    bad_root = tmp_path / "bad"
    _tar_gz(archive, {**members, "cifar-10-batches-py/../../escaped.txt": b"x"})
    monkeypatch.setitem(data.OFFICIAL_FILES, "cifar10", (_remote(archive),))
    with pytest.raises(DataFormatError, match="unsafe"):
        download("cifar10", bad_root, base_url=url)
    assert not (tmp_path / "escaped.txt").exists() and not (bad_root / "escaped.txt").exists()
    assert not (bad_root / "cifar10" / "cifar-10-batches-py").exists()


def test_download_without_official_source_or_root(tmp_path):
    for name in ("notmnist", "celeba32"):
        with pytest.raises(DownloadError, match="no stable official direct download"):
            download(name, tmp_path)
    with pytest.raises(ValueError, match="FLOWCORE_DATA_DIR"):
        download("mnist")
    for rows in data.OFFICIAL_FILES.values():
        for rf in rows:
            assert len(rf.sha256) == 64 and int(rf.sha256, 16) >= 0 and rf.size > 0
