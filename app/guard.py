"""The page guard: every page body runs inside :func:`run_page`, so an expected failure is one ``st.error`` line
and an unexpected one a friendly line with the detail folded away (logged with its traceback on the server),
never a raw traceback in the browser."""

from __future__ import annotations

import logging
from collections.abc import Callable

import streamlit as st

from flowcore.data.datasets import DatasetNotFound
from flowcore.data.images import ImageError
from flowcore.zoo.checkpoints import CheckpointError

__all__ = ["LOG", "NoCheckpoint", "one_line", "run_page"]

LOG = logging.getLogger("flowcore.app")


class NoCheckpoint(Exception):
    """No checkpoint to show (the page already said so)."""


def one_line(e: BaseException) -> str:
    """An exception as one short line for ``st.error``."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def run_page(body: Callable[[], None]) -> None:
    """Run a page body; expected failures become one ``st.error`` line, never a traceback."""
    try:
        body()
    except NoCheckpoint:
        pass
    except (ImageError, CheckpointError, DatasetNotFound) as e:
        st.error(one_line(e))
    except (ValueError, IndexError, OSError) as e:
        LOG.warning("page could not be shown: %s", one_line(e), exc_info=True)  # the traceback, server-side only
        st.error(f"Cannot show this view: {one_line(e)}")
    except Exception as e:  # an unexpected failure: a friendly line, the detail folded away, no traceback
        LOG.exception("unexpected error in a page")
        st.error("This view hit an unexpected problem. Try another image, model or setting.")
        with st.expander("Details"):
            st.code(f"{type(e).__name__}: {one_line(e)}", language=None)
