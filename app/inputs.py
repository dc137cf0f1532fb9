"""The inputs every page shares, kept in ``st.session_state``: the sidebar uploader's files plus images added from
the gallery, the model's samples, the drawing canvas or the perturbation explorer, all kept as encoded bytes so
that every input goes through :func:`flowcore.data.images.decode_image` and :func:`flowcore.data.images.preprocess`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import streamlit as st

from flowcore.dashboard import service
from flowcore.dashboard.guard import one_line
from flowcore.data.images import IMAGE_SUFFIXES, ImageError, decode_image, preprocess, thumbnail

__all__ = [
    "IMAGE_TYPES", "ADDED_KEY", "UPLOAD_KEY", "CURRENT_KEY", "INVERT_KEY", "FIT_KEY", "InputImage", "Prepared",
    "prepare", "all_inputs", "add_inputs", "remove_input", "clear_added", "preprocessing_options",
    "prepared_inputs", "show_input_errors",
]

IMAGE_TYPES = [s.lstrip(".") for s in IMAGE_SUFFIXES]  # the uploader's list: flowcore.data.images' formats
ADDED_KEY = "added_inputs"
UPLOAD_KEY = "uploads"
CURRENT_KEY = "current_input"
INVERT_KEY = "invert"
FIT_KEY = "fit"


@dataclass(frozen=True)
class InputImage:
    """One input: encoded image bytes, where it came from, and whether it is taken as is (never inverted)."""

    name: str
    data: bytes = field(repr=False)
    source: str = "upload"
    as_is: bool = False

    @property
    def key(self) -> str:
        return hashlib.sha1(self.data).hexdigest()[:16] + ":" + self.name


@dataclass
class Prepared:
    """What the model is given for one input: the uint8 array and each preprocessing step (for display)."""

    array: np.ndarray
    steps: list[tuple[str, np.ndarray]]
    inverted: bool
    size: tuple[int, int]
    format: str


@service.memo(max_entries=512)
def prepare(data: bytes, shape: tuple[int, int, int], invert: str = "auto", fit: str = "crop") -> Prepared:
    """Decode and preprocess one input for a model of ``shape`` (raises ImageError with one clear line)."""
    img = decode_image(data)
    p = preprocess(img, shape, invert=invert, fit=fit)
    try:
        original = np.asarray(img if img.mode in ("L", "RGB", "RGBA") else img.convert("RGBA"))
    except (OSError, ValueError):
        original = p.steps[0][1]
    size = img.info.get("original_size", img.size)  # a large file is decoded at a reduced working size
    label = f"original: {img.format or 'image'} {img.mode} {size[0]}x{size[1]}"
    shown = [(label, thumbnail(original))] + [(step, thumbnail(a)) for step, a in p.steps]
    p.array.flags.writeable = False  # cached and shared by every page: read-only, so none can alter it
    return Prepared(p.array, shown, p.inverted, tuple(size), img.format or "")


def _added() -> list[InputImage]:
    return st.session_state.setdefault(ADDED_KEY, [])


def all_inputs() -> list[InputImage]:
    """Uploaded files (sidebar) then added images (gallery, samples, drawing, perturbations), no duplicates."""
    out: list[InputImage] = []
    for f in st.session_state.get(UPLOAD_KEY) or []:
        out.append(InputImage(f.name, f.getvalue(), "upload"))
    out += _added()
    seen: set[str] = set()
    unique = []
    for item in out:
        if item.key not in seen:
            seen.add(item.key)
            unique.append(item)
    return unique


def add_inputs(items: Sequence[InputImage]) -> None:
    added = _added()
    keys = {i.key for i in added}
    added += [i for i in items if i.key not in keys]
    if items:
        st.session_state[CURRENT_KEY] = items[0].key


def remove_input(key: str) -> None:
    st.session_state[ADDED_KEY] = [i for i in _added() if i.key != key]


def clear_added() -> None:
    st.session_state[ADDED_KEY] = []


def preprocessing_options() -> tuple[str, str]:
    return st.session_state.get(INVERT_KEY, "auto"), st.session_state.get(FIT_KEY, "crop")


def prepared_inputs(
    shape: tuple[int, int, int], inputs: Sequence[InputImage] | None = None
) -> tuple[list[tuple[InputImage, Prepared]], list[tuple[str, str]]]:
    """Every input prepared for ``shape`` and the ``(name, reason)`` of those that cannot be read."""
    invert, fit = preprocessing_options()
    good, bad = [], []
    for item in all_inputs() if inputs is None else inputs:
        try:
            good.append((item, prepare(item.data, tuple(shape), "no" if item.as_is else invert, fit)))
        except ImageError as e:
            reason = one_line(e)
            reason = reason[len("image: ") :] if reason.startswith("image: ") else reason
            bad.append((item.name, reason))
    return good, bad


def show_input_errors(errors: Sequence[tuple[str, str]]) -> None:
    """One ``st.error`` line per input that cannot be read."""
    for name, reason in errors:
        st.error(f"{name}: {reason}")
