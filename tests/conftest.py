import contextlib
import functools
import http.server
import os
import threading

import numpy as np
import pytest
import torch

# Tests share 2 cores with whatever else runs; one thread keeps timings predictable.
torch.set_num_threads(1)


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Make a freshly built (identity) flow non-trivial: add small noise to every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.fixture
def data_dir() -> str:
    d = os.environ.get("FLOWCORE_DATA_DIR")
    if not d or not os.path.isdir(d):
        pytest.skip("set FLOWCORE_DATA_DIR to the folder holding fashion_mnist.npz etc. to run this test")
    return d


def fake_extract(images, batch_size=64, progress=None):
    """A stand-in image feature extractor (the real one needs 20 MB of weights and minutes): a fixed random
    projection of the pixels to 1280 dimensions, so images of different kinds get different feature
    distributions. Each image's features depend on that image only, as with the real one."""
    from flowcore.data.embeddings import FEATURE_DIM

    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:  # grayscale replicated to RGB, as the real extractor does
        x = np.repeat(x[..., None], 3, axis=-1)
    x = x.reshape(len(images), -1) / 255.0
    proj = np.random.default_rng(0).standard_normal((x.shape[1], FEATURE_DIM)).astype(np.float32)
    if progress is not None:
        progress(len(images))
    return np.tanh(x @ proj / np.sqrt(x.shape[1])).astype(np.float32)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder):
    """A loopback HTTP server over ``folder`` (for download tests: nothing leaves the machine); yields its URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
