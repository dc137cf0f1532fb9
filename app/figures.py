"""Small figure builders for the dashboard: arrays in, Plotly figure out.

Nothing here imports Streamlit or touches a model, so every function can be called (and tested) without a
browser. Images are ``(H, W)`` (one channel) or ``(H, W, 3)`` (RGB) arrays; uint8 images are drawn on
0..255, float images as they are. Row 0 of an image is drawn at the top.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.colors as pcolors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flowcore.flows.layout import to_picture

__all__ = [
    "Panel",
    "OOD_COLOURS",
    "set_colour",
    "to_display",
    "histogram",
    "panels_figure",
    "image_grid",
    "latent_figure",
    "coupling_grid",
    "latent_picker",
    "jacobian_figure",
    "curve",
]

SET_COLOURS = {"train": "#9e9e9e", "test": "#1f77b4"}
OOD_COLOURS = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
# one distinct colour per image marker, as many as the Score page draws (its MAX_MARKERS); beyond, dashes differ
MARKER_COLOURS = ("#111111", "#2ca02c", "#e6194b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                  "#008080", "#9a6324", "#800000", "#000075")
MARKER_DASHES = ("solid", "dash", "dot", "dashdot")
DIVERGING = "RdBu_r"
# Inferno, black (0 = no influence) to yellow, spelled out as rgb() stops: plotly.js replaced the named scale's
# first stop ('#000004') with a theme colour (violet or pink), drawing zero as if it were something.
HEAT = [[i / (len(pcolors.sequential.Inferno) - 1), "rgb({}, {}, {})".format(*pcolors.hex_to_rgb(c))]
        for i, c in enumerate(pcolors.sequential.Inferno)]

Box = tuple[int, int, int, int]


def set_colour(name: str, index: int = 0) -> str:
    """Grey for ``train``, blue for ``test``, a distinct warm colour for each OOD set (by position)."""
    return SET_COLOURS.get(name, OOD_COLOURS[index % len(OOD_COLOURS)])


def to_display(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` / ``(H, W, C)`` / ``(H, W)`` -> ``(H, W)`` or ``(H, W, 3)`` for drawing (the library's rule)."""
    return to_picture(image)


def _as_rgb_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    return np.clip(np.round(np.nan_to_num(a.astype(np.float64)) * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- histograms


def histogram(
    sets: Mapping[str, np.ndarray],
    markers: Sequence[tuple[str, float]] = (),
    xlabel: str = "",
    title: str = "",
    medians: bool = True,
    nbins: int = 60,
    height: int = 360,
) -> go.Figure:
    """Overlaid density histograms, one per set (shared bins), each image a vertical line (a trace).

    Medians are dashed vertical lines in the set's colour and quoted in its legend entry.
    """
    fig = go.Figure()
    clean = {k: np.asarray(v, dtype=np.float64) for k, v in sets.items()}
    clean = {k: v[np.isfinite(v)] for k, v in clean.items()}
    pooled = np.concatenate([v for v in clean.values() if v.size] or [np.zeros(0)])
    xbins = None
    if pooled.size:
        lo, hi = float(pooled.min()), float(pooled.max())
        size = (hi - lo) / max(1, nbins) or 1.0
        xbins = {"start": lo, "end": hi + size, "size": size}
    ood_index = 0
    for name, values in clean.items():
        colour = set_colour(name, ood_index)
        if name not in SET_COLOURS:
            ood_index += 1
        label = f"{name} (n={values.size})"
        if medians and values.size:
            med = float(np.median(values))
            label += f", median {med:.4g}"
            fig.add_vline(x=med, line_dash="dash", line_color=colour, line_width=1.5)
        fig.add_trace(
            go.Histogram(
                x=values,
                name=label,
                histnorm="probability density",
                opacity=0.55,
                marker_color=colour,
                xbins=xbins,
                hovertemplate=f"{name}: %{{x}}<br>density %{{y:.3g}}<extra></extra>",
            )
        )
    for j, (label, x) in enumerate(markers):
        if x is None or not np.isfinite(x):
            continue
        colour = MARKER_COLOURS[j % len(MARKER_COLOURS)]
        dash = MARKER_DASHES[(j // len(MARKER_COLOURS)) % len(MARKER_DASHES)]
        fig.add_trace(
            go.Scatter(
                x=[float(x), float(x)],
                y=[0.0, 1.0],
                yaxis="y2",
                mode="lines",
                name=label,
                line={"color": colour, "width": 2.5, "dash": dash},
                hovertemplate=f"{label}: {float(x):.5g}<extra></extra>",
            )
        )
    # The legend goes below the x axis. Placed in plot-area units it slid onto the axis title whenever many
    # entries shrank the plot, so the figure grows by a row per entry (the plot keeps ``height``) and the
    # legend's top is pinned a fixed number of pixels below the plot, in figure-container units.
    axis_px, row_px = 55, 21
    bottom = axis_px + row_px * len(fig.data) + 10
    total = height + bottom
    fig.update_layout(
        barmode="overlay",
        title=title or None,
        xaxis_title=xlabel,
        yaxis_title="density",
        yaxis2={"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True},
        legend={"orientation": "h", "yref": "container", "yanchor": "top", "y": (bottom - axis_px) / total, "x": 0},
        margin={"l": 50, "r": 10, "t": 40 if title else 10, "b": bottom},
        height=total,
    )
    return fig


# ---------------------------------------------------------------------------------------- image panels


@dataclass
class Panel:
    """One image-like panel of a grid: a 2-d array (heatmap) or an RGB image."""

    array: np.ndarray
    title: str = ""
    colorscale: str = "gray"
    zmin: float | None = None
    zmax: float | None = None
    zmid: float | None = None
    hover: str = "value"
    colorbar: bool = False  # a colour scale beside this panel (placed by panels_figure)


def _panel_trace(p: Panel) -> go.BaseTraceType:
    a = to_display(p.array)
    if a.ndim == 3:
        return go.Image(z=_as_rgb_uint8(a), hovertemplate="row %{y}, col %{x}: %{z}<extra></extra>")
    zmin, zmax = p.zmin, p.zmax
    if a.dtype == np.uint8 and zmin is None and zmax is None and p.zmid is None:
        zmin, zmax = 0, 255
    z = a.astype(np.float64)
    return go.Heatmap(
        z=z,
        colorscale=p.colorscale,
        zmin=zmin,
        zmax=zmax,
        zmid=p.zmid,
        showscale=p.colorbar,
        hoverongaps=True,
        hovertemplate=f"row %{{y}}, col %{{x}}<br>{p.hover} %{{z:.4g}}<extra>{p.title}</extra>",
    )


def _axis_suffix(index: int) -> str:
    return "" if index == 1 else str(index)


def panels_figure(
    panels: Sequence[Panel],
    cols: int = 4,
    box: Box | None = None,
    marker: tuple[int, int] | None = None,
    cell_height: int = 220,
    titles: bool = True,
) -> go.Figure:
    """A grid of image panels (row-major), square pixels, optional box outline and point marker on each."""
    n = len(panels)
    if n == 0:
        raise ValueError("nothing to draw")
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[p.title for p in panels] if titles else None,
        horizontal_spacing=0.14 if any(p.colorbar for p in panels) else 0.02,  # colour bars and ticks sit in the gap
        vertical_spacing=min(0.08, 0.3 / rows),
    )
    # One layout update and one add_traces for the whole grid: plotly's per-subplot row/col helpers walk the
    # grid on every call, which made a 40-panel figure take about 0.4 s to build.
    traces: list[go.BaseTraceType] = []
    axes: dict[str, dict[str, Any]] = {}
    shapes: list[dict[str, Any]] = []
    hidden = {"showticklabels": False, "showgrid": False, "zeroline": False, "ticks": ""}  # no stray tick marks
    for i, p in enumerate(panels):
        suffix = _axis_suffix(i + 1)
        x_ref, y_ref = f"x{suffix}", f"y{suffix}"
        trace = _panel_trace(p)
        trace.update(xaxis=x_ref, yaxis=y_ref)
        if p.colorbar and isinstance(trace, go.Heatmap):
            x_domain = fig.layout[f"xaxis{suffix}"].domain
            y_domain = fig.layout[f"yaxis{suffix}"].domain
            trace.colorbar = {"x": x_domain[1], "xanchor": "left", "y": sum(y_domain) / 2,
                              "len": y_domain[1] - y_domain[0], "thickness": 10}
        traces.append(trace)
        axes[f"xaxis{suffix}"] = dict(hidden)
        axes[f"yaxis{suffix}"] = {**hidden, "autorange": "reversed", "scaleanchor": x_ref}
        if box is not None:
            top, left, bh, bw = box
            shapes.append({"type": "rect", "xref": x_ref, "yref": y_ref, "x0": left - 0.5, "x1": left + bw - 0.5,
                           "y0": top - 0.5, "y1": top + bh - 0.5, "line": {"color": "#00e5ff", "width": 2}})
        if marker is not None:
            traces.append(go.Scatter(
                x=[marker[1]], y=[marker[0]], xaxis=x_ref, yaxis=y_ref, mode="markers",
                marker={"symbol": "x-thin", "size": 14, "line": {"width": 3, "color": "#00e5ff"}},
                showlegend=False, hoverinfo="skip",
            ))
    fig.add_traces(traces)
    fig.update_layout(axes)
    if shapes:
        fig.update_layout(shapes=shapes)
    fig.update_layout(
        height=rows * cell_height + 40,
        margin={"l": 5, "r": 5, "t": 30, "b": 5},
        showlegend=False,
    )
    return fig


def image_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    titles: Sequence[str] | None = None,
    cols: int = 8,
    box: Box | None = None,
    cell_height: int = 150,
) -> go.Figure:
    """Images (uint8 0..255 or floats 0..1, any of the layouts :func:`to_display` accepts) in a grid."""
    panels = []
    for i, img in enumerate(images):
        a = to_display(np.asarray(img))
        lim = (0, 255) if a.dtype == np.uint8 else (0.0, 1.0)
        title = titles[i] if titles is not None and i < len(titles) else ""
        panels.append(Panel(a, title, "gray", *lim, hover="pixel"))
    return panels_figure(panels, cols=cols, box=box, cell_height=cell_height, titles=titles is not None)


def latent_figure(image: np.ndarray, z: np.ndarray, cell_height: int = 320) -> go.Figure:
    """The input beside its latents ``z`` ``(C, H, W)`` in image layout, one panel per channel (Fig. 10)."""
    z = np.asarray(z)
    if z.ndim == 2:
        z = z[None]
    lim = float(np.nanmax(np.abs(z))) if z.size and np.isfinite(z).any() else 1.0
    panels = [Panel(to_display(image), "input", hover="pixel")]
    for c in range(z.shape[0]):
        title = "latent z" if z.shape[0] == 1 else f"latent z, channel {c}"
        panels.append(Panel(z[c], title, DIVERGING, -lim, lim, hover="z"))
    return panels_figure(panels, cols=len(panels), cell_height=cell_height)


COUPLING_FIELDS = ("input", "log_s", "t", "output")


def coupling_grid(
    records: Sequence[tuple[str, Mapping[str, np.ndarray]]],
    fields: Sequence[str] = COUPLING_FIELDS,
    cell_height: int = 200,
) -> go.Figure:
    """One row per coupling layer: its input, log-scale s, shift t and output as heatmaps (Fig. 11, 13).

    Each record is ``(layer name, {field: (H, W) array})``; NaN (where a layer transforms nothing) is
    left blank. ``s`` and ``t`` use a diverging scale centred on 0.
    """
    panels = []
    for name, rec in records:
        for f in fields:
            a = np.asarray(rec[f], dtype=np.float64)
            if f in ("log_s", "t"):
                finite = a[np.isfinite(a)]
                lim = float(np.max(np.abs(finite))) if finite.size else 1.0
                panels.append(Panel(a, f"{name} · {f}", DIVERGING, -lim or -1.0, lim or 1.0, hover=f))
            else:
                panels.append(Panel(a, f"{name} · {f}", "Viridis", hover=f))
    return panels_figure(panels, cols=len(fields), cell_height=cell_height)


def latent_picker(z: np.ndarray, position: tuple[int, int] | None = None, title: str = "") -> go.Figure:
    """A clickable latent map: a heatmap with an invisible marker on every pixel (for point selection)."""
    z = np.asarray(z, dtype=np.float64)
    h, w = z.shape
    finite = z[np.isfinite(z)]
    lim = float(np.max(np.abs(finite))) if finite.size else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            colorscale=DIVERGING,
            zmin=-lim,
            zmax=lim,
            showscale=False,
            hovertemplate="row %{y}, col %{x}<br>z %{z:.4g}<extra></extra>",
        )
    )
    yy, xx = np.mgrid[:h, :w]
    fig.add_trace(
        go.Scatter(
            x=xx.ravel(),
            y=yy.ravel(),
            mode="markers",
            marker={"size": max(4, int(300 / max(h, w))), "opacity": 0.01, "color": "#000000"},
            customdata=z.ravel(),
            hovertemplate="row %{y}, col %{x}<br>z %{customdata:.4g}<extra>click to pick</extra>",
            name="pick",
            showlegend=False,
        )
    )
    if position is not None:
        fig.add_trace(
            go.Scatter(
                x=[position[1]],
                y=[position[0]],
                mode="markers",
                marker={"symbol": "x-thin", "size": 16, "line": {"width": 3, "color": "#00e5ff"}},
                hoverinfo="skip",
                showlegend=False,
                name="picked",
            )
        )
    fig.update_xaxes(showgrid=False, zeroline=False, constrain="domain")
    fig.update_yaxes(showgrid=False, zeroline=False, autorange="reversed", scaleanchor="x",
                     constrain="domain")  # a narrow column shrinks the map instead of padding its row range
    fig.update_layout(
        title=title or None,
        height=380,
        margin={"l": 5, "r": 5, "t": 35 if title else 5, "b": 5},
        clickmode="event+select",
        dragmode=False,
    )
    return fig


def _nonnegative_panel(a: np.ndarray, title: str, log: bool) -> Panel:
    a = np.abs(np.asarray(a, dtype=np.float64))
    finite = a[np.isfinite(a)]
    peak = float(finite.max()) if finite.size else 0.0
    if log:
        floor = peak * 1e-6 if peak > 0 else 1e-12
        a = np.log10(np.maximum(a, floor))
        lo = float(np.log10(floor))
        return Panel(a, f"{title} (log10)", HEAT, lo, lo + 6.0 if peak > 0 else lo + 1.0, hover=f"log10 {title}",
                     colorbar=True)
    return Panel(a, title, HEAT, 0.0, peak or 1.0, hover=title, colorbar=True)  # 0 is black: no influence


def jacobian_figure(
    image: np.ndarray,
    jacobian: np.ndarray,
    position: tuple[int, int] | None = None,
    footprint: np.ndarray | None = None,
    log: bool = False,
    cell_height: int = 320,
) -> go.Figure:
    """Input, ``|dz_i/dx|`` over the input (Fig. 12) and, optionally, the mean footprint, side by side.

    ``jacobian`` / ``footprint`` are ``(H, W)`` maps (absolute values are drawn); ``log`` draws
    ``log10`` over six decades below the peak, which shows how fast the influence decays.
    """
    panels = [Panel(to_display(image), "input", hover="pixel"), _nonnegative_panel(jacobian, "|dz_i / dx|", log)]
    if footprint is not None:
        panels.append(_nonnegative_panel(footprint, "mean footprint", log))
    fig = panels_figure(panels, cols=len(panels), marker=position, cell_height=cell_height)
    fig.update_layout(margin={"l": 5, "r": 40, "t": 30, "b": 5})  # room for the last colour bar
    return fig


def curve(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    xlabel: str,
    ylabel: str,
    current: float | None = None,
    hlines: Sequence[tuple[str, float]] = (),
    height: int = 320,
) -> go.Figure:
    """A line with markers (e.g. bpd against noise level), a vertical line at ``current`` and labelled
    horizontal reference lines (e.g. the test median)."""
    fig = go.Figure(
        go.Scatter(
            x=np.asarray(x, dtype=np.float64),
            y=np.asarray(y, dtype=np.float64),
            mode="lines+markers",
            name=ylabel,
            hovertemplate=f"{xlabel} %{{x:.4g}}<br>{ylabel} %{{y:.4g}}<extra></extra>",
        )
    )
    for j, (label, value) in enumerate(hlines):
        if value is None or not np.isfinite(value):
            continue
        colour = OOD_COLOURS[j % len(OOD_COLOURS)] if j else SET_COLOURS["test"]
        fig.add_hline(
            y=float(value),
            line_dash="dash",
            line_color=colour,
            annotation_text=label,
            annotation_position="top left",
        )
    if current is not None:
        fig.add_vline(x=float(current), line_color="#111111", line_width=1.5)
    fig.update_layout(
        xaxis_title=xlabel,
        yaxis_title=ylabel,
        height=height,
        margin={"l": 50, "r": 10, "t": 10, "b": 40},
        showlegend=False,
    )
    return fig


def projection_figure(
    sets: Mapping[str, np.ndarray], markers: Sequence[tuple[str, tuple[float, float]]] = (), height: int = 420
) -> go.Figure:
    """Reference points of each set ``(N, 2)`` on two principal directions, and each marked image as a star."""
    fig = go.Figure()
    ood_index = 0
    for name, points in sets.items():
        colour = set_colour(name, ood_index)
        if name not in SET_COLOURS:
            ood_index += 1
        p = np.asarray(points, dtype=np.float64)
        fig.add_trace(go.Scattergl(x=p[:, 0], y=p[:, 1], mode="markers", name=f"{name} (n={len(p)})",
                                   marker={"color": colour, "size": 4, "opacity": 0.5},
                                   hovertemplate=f"{name}<extra></extra>"))
    for j, (label, (x, y)) in enumerate(markers):
        colour = MARKER_COLOURS[j % len(MARKER_COLOURS)]
        fig.add_trace(go.Scatter(x=[x], y=[y], mode="markers", name=label,
                                 marker={"color": colour, "size": 16, "symbol": "star",
                                         "line": {"color": "white", "width": 1}},
                                 hovertemplate=f"{label}<extra></extra>"))
    fig.update_layout(xaxis_title="principal direction 1", yaxis_title="principal direction 2", height=height,
                      margin={"l": 50, "r": 10, "t": 10, "b": 50}, legend={"orientation": "h", "y": -0.2})
    return fig


def scale_latents_figure(z: np.ndarray, labels: np.ndarray, correlations: Sequence[float],
                         cell_height: int = 260) -> go.Figure:
    """One panel per scale: the latents ``z`` (C, H, W) factored out at that scale (``labels`` gives each
    latent's scale), blank elsewhere, averaged over channels; each title quotes that scale's correlation."""
    z = np.asarray(z, dtype=np.float64)
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    panels = []
    for s, r in zip(np.unique(labels), correlations, strict=True):
        mine = labels == s
        counts = mine.sum(axis=0)
        mean = np.where(counts > 0, np.where(mine, z, 0.0).sum(axis=0) / np.maximum(counts, 1), np.nan)
        panels.append(Panel(mean, f"scale {int(s) + 1} ({100 * mine.mean():.0f} % of z): r = {r:.2f}", DIVERGING,
                            -lim, lim, hover="z"))
    return panels_figure(panels, cols=len(panels), cell_height=cell_height)
