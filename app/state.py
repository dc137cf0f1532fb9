"""The page layer's session: which checkpoint and which image the pages look at (kept in ``st.session_state``).

Results are computed by :mod:`flowcore.dashboard.service`, which imports no Streamlit; this module gives it a
spinner and adds what only a browser session has. The page guard (:mod:`flowcore.dashboard.guard`) and the shared
inputs (:mod:`flowcore.dashboard.inputs`) are re-exported, so a page needs ``state`` and ``service`` alone.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from flowcore.dashboard import service

# the page guard and the shared inputs, re-exported so that a page needs ``state`` alone for its session
from flowcore.dashboard.guard import LOG, NoCheckpoint, one_line, run_page
from flowcore.dashboard.inputs import (
    ADDED_KEY,
    CURRENT_KEY,
    FIT_KEY,
    IMAGE_TYPES,
    INVERT_KEY,
    UPLOAD_KEY,
    InputImage,
    Prepared,
    add_inputs,
    all_inputs,
    clear_added,
    prepare,
    prepared_inputs,
    preprocessing_options,
    remove_input,
    show_input_errors,
)

__all__ = [
    "LOG", "NoCheckpoint", "one_line", "run_page",
    "ADDED_KEY", "CURRENT_KEY", "FIT_KEY", "IMAGE_TYPES", "INVERT_KEY", "UPLOAD_KEY", "InputImage", "Prepared",
    "add_inputs", "all_inputs", "clear_added", "prepare", "prepared_inputs", "preprocessing_options",
    "remove_input", "show_input_errors",
    "CHECKPOINT_KEY", "selected_checkpoint", "need_checkpoint", "current_image",
]

CHECKPOINT_KEY = "checkpoint"

service.set_busy(st.spinner)  # results computed (not served from the cache) show Streamlit's spinner


def selected_checkpoint() -> str | None:
    """The checkpoint picked in the sidebar (or the default one before the sidebar ran)."""
    options = service.checkpoint_options()
    name = st.session_state.get(CHECKPOINT_KEY)
    return name if name in options else service.default_checkpoint(options)


def need_checkpoint() -> str:
    """The selected checkpoint; without one, say how to get one and stop the page."""
    name = selected_checkpoint()
    if name is None:
        st.warning(service.no_checkpoint_message())
        raise NoCheckpoint
    return name


def current_image(name: str) -> tuple[str, np.ndarray]:
    """The image the single-image views look at: the sidebar's choice, else the first input, else
    :func:`service.first_image` (a test image or one of the model's samples)."""
    good, _ = prepared_inputs(service.image_shape(name))
    if good:
        wanted = st.session_state.get(CURRENT_KEY)
        for item, p in good:
            if item.key == wanted:
                return item.name, p.array
        return good[0][0].name, good[0][1].array
    return service.first_image(name)
