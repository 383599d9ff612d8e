"""Plotly figures: the step-aligned metric panels, their live extension, the embedding view.

One template (``collapsewatch``) is registered once and used by every figure. Colours are
Okabe–Ito, which stay distinguishable under the common colour-vision deficiencies; a run's
state is always written out as text too, never shown by colour alone.

Figures are plain dicts (what Dash sends anyway) with lists, not NumPy arrays: plotly.py
would turn arrays into base64 typed arrays, which ``Plotly.extendTraces`` cannot append to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from collapsewatch.columns import healthy_std_of_l2_normalized
from collapsewatch.states import RunState

from .data import RunView, Span
from .decimate import decimate_frame
from .projection import Projection

TEMPLATE_NAME = "collapsewatch"

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}
# Runs: vermillion comes last because it also marks collapse; yellow is too light on white.
RUN_COLOURS = tuple(
    OKABE_ITO[c] for c in ("blue", "orange", "green", "purple", "sky", "black", "vermillion")
)
STATE_COLOURS = {
    RunState.HEALTHY: OKABE_ITO["green"],
    RunState.WARNING: OKABE_ITO["orange"],
    RunState.COLLAPSED: OKABE_ITO["vermillion"],
    RunState.DIVERGED: OKABE_ITO["purple"],
    RunState.RECOVERED: OKABE_ITO["blue"],
    RunState.EMPTY: "#9aa5b1",
    "error": "#52606d",
}
# Embedding classes: Okabe–Ito, then Paul Tol's muted scheme; shapes repeat the cue.
LABEL_COLOURS = (
    *(OKABE_ITO[c] for c in ("blue", "orange", "green", "vermillion", "purple", "sky")),
    "#000000",
    "#999933",
    "#882255",
    "#44AA99",
    "#332288",
    "#DDCC77",
)
LABEL_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "cross", "x", "triangle-down")
MAX_LABEL_TRACES = len(LABEL_COLOURS)
COLLAPSE_FILL = "rgba(213, 94, 0, 0.13)"
INK = "#1f2933"
MUTED = "#616e7c"
GRID = "#e4e7eb"

EVENT_STYLE = {  # kind -> (marker symbol, colour)
    "warning": ("triangle-up", OKABE_ITO["orange"]),
    "collapsed": ("x", OKABE_ITO["vermillion"]),
    "recovered": ("circle", OKABE_ITO["blue"]),
    "cleared": ("circle-open", OKABE_ITO["green"]),
    "dimensional_collapse": ("diamond", OKABE_ITO["purple"]),
    "diverged": ("star", OKABE_ITO["black"]),
    "dimensional_collapse_cleared": ("diamond-open", OKABE_ITO["green"]),
    "diverged_cleared": ("star-open", OKABE_ITO["green"]),
}


def register_template() -> go.layout.Template:
    """Register the ``collapsewatch`` plotly template (idempotent) and return it."""
    if TEMPLATE_NAME in pio.templates:
        return pio.templates[TEMPLATE_NAME]
    axis = {
        "gridcolor": GRID,
        "linecolor": "#9aa5b1",
        "zeroline": False,
        "ticks": "outside",
        "tickcolor": "#9aa5b1",
        "ticklen": 4,
        "title": {"font": {"size": 12, "color": MUTED}},
        "tickfont": {"size": 11, "color": MUTED},
        "automargin": True,
    }
    template = go.layout.Template(
        layout={
            "font": {
                "family": "Inter, system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
                "size": 12,
                "color": INK,
            },
            "paper_bgcolor": "#ffffff",
            "plot_bgcolor": "#ffffff",
            "colorway": list(RUN_COLOURS),
            "xaxis": axis,
            "yaxis": axis,
            "hoverlabel": {"font": {"size": 12}, "bgcolor": "#ffffff", "bordercolor": GRID},
            "legend": {"font": {"size": 12}, "bgcolor": "rgba(255,255,255,0.85)"},
            "margin": {"l": 60, "r": 24, "t": 36, "b": 48},
        }
    )
    pio.templates[TEMPLATE_NAME] = template
    return template


_TEMPLATE_JSON = register_template().to_plotly_json()


def run_colours(run_ids: Sequence[str]) -> dict[str, str]:
    """A colour per run, by the run's position among the sorted ids plotted together."""
    return {rid: RUN_COLOURS[i % len(RUN_COLOURS)] for i, rid in enumerate(sorted(run_ids))}


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha})"


def _values(series: pd.Series | np.ndarray) -> list[float | None]:
    # JSON has no NaN; null makes plotly leave a gap.
    return [None if not math.isfinite(v) else v for v in np.asarray(series, dtype=float).tolist()]


def _steps(series: pd.Series | np.ndarray) -> list[int]:
    return np.asarray(series, dtype=np.int64).tolist()


# ---------------------------------------------------------------------------------------
# Metric panels
# ---------------------------------------------------------------------------------------

# Four panels stacked on one shared step axis. Each panel has a hidden base y axis (0..1)
# holding the collapse shading, so shading is drawn beneath the data, and a visible
# overlaying y axis for the data.
PANEL_DOMAINS = ((0.775, 1.0), (0.52, 0.735), (0.265, 0.48), (0.0, 0.215))
SHADE_AXES = ("y", "y2", "y3", "y4")
PANEL_TITLES = (
    "<b>Loss / margin</b> — 1.0 is the collapse plateau (loss = margin)",
    "<b>Spread</b> — mean pairwise distance (solid) and embedding variance (dotted), log scale",
    "<b>Triplet difficulty</b> — share of valid triplets, stacked: hard (dark), semi-hard (light),"
    " easy (rest, unfilled)",
    "<b>Rank</b> — std of L2-normalised (solid, healthy 1/√D dashed), within-class variance"
    " share (dash), alignment (dash-dot), uniformity (long dash); right: effective rank (dots)"
    " and what the classes need, min(C − 1, D, N − 1) (dashes)",
)


@dataclass(frozen=True)
class Series:
    """One plotted metric column."""

    column: str
    label: str  # for hover
    axis: str  # data y axis
    dash: str = "solid"
    fill_alpha: float | None = None  # stacked area if set
    markers: bool = False
    fmt: str = ".4g"


# Columns plotted together share their rows (and so their decimation).
GROUPS: tuple[tuple[Series, ...], ...] = (
    (Series("loss_margin_ratio", "loss / margin", "y5", fmt=".4f"),),
    (
        Series("mean_pairwise_distance", "mean pairwise distance", "y6"),
        Series("embedding_variance", "embedding variance", "y6", dash="dot"),
    ),
    (
        Series("frac_hard", "hard", "y7", fill_alpha=0.28, fmt=".1%"),
        Series("frac_semihard", "semi-hard", "y7", fill_alpha=0.1, fmt=".1%"),
        # The top band is what is left up to 100 %: unfilled, so overlaid runs stay legible.
        Series("frac_easy", "easy", "y7", fill_alpha=0.0, fmt=".1%"),
    ),
    (Series("std_of_l2_normalized", "std of L2-normalised", "y8"),),
    # Measured together on rank steps (NaN between), so they share rows.
    (
        Series("effective_rank", "effective rank", "y9", dash="dot", markers=True, fmt=".3g"),
        Series("reference_rank", "rank the classes need", "y9", dash="dash", fmt=".0f"),
        Series(
            "within_class_variance_ratio",
            "within-class variance share",
            "y8",
            dash="dash",
            markers=True,
            fmt=".3f",
        ),
        Series("alignment", "alignment", "y8", dash="dashdot", markers=True, fmt=".3f"),
        Series("uniformity", "uniformity", "y8", dash="longdash", markers=True, fmt=".3f"),
    ),
)
PLOTTED_COLUMNS = tuple(s.column for group in GROUPS for s in group)


def _panel_layout(height: int | None = None, runs: int = 1) -> dict[str, Any]:
    # The legend sits in the top margin, above the first panel's title, and the margin grows
    # by a row for every four runs so a long legend never covers the plots.
    legend_rows = max(1, math.ceil(runs / 4))
    layout: dict[str, Any] = {
        "template": _TEMPLATE_JSON,
        "uirevision": "panels",  # keep the user's zoom across rebuilds
        "hovermode": "x unified",
        "showlegend": True,
        "legend": {
            "orientation": "h",
            "xref": "container",
            "x": 1.0,
            "xanchor": "right",
            "yref": "container",
            "y": 1.0,
            "yanchor": "top",
            "title": {"text": ""},
        },
        "margin": {"l": 64, "r": 64, "t": 26 + 22 * legend_rows, "b": 44},
        "xaxis": {
            "anchor": "y4",
            "domain": [0.0, 1.0],
            "title": {"text": "training step"},
            "showspikes": True,
            "spikemode": "across",
            "spikesnap": "cursor",
            "spikethickness": 1,
            "spikedash": "dot",
            "spikecolor": "#9aa5b1",
            "rangemode": "tozero",
        },
        "annotations": [],
        "shapes": [],
    }
    if height:
        layout["height"] = height
    for i, domain in enumerate(PANEL_DOMAINS):
        layout[f"yaxis{'' if i == 0 else i + 1}"] = {
            "domain": list(domain),
            "range": [0, 1],
            "visible": False,
            "fixedrange": True,
            "anchor": "x",
        }
        layout["annotations"].append(
            {
                "text": PANEL_TITLES[i],
                "xref": "paper",
                "yref": "paper",
                "x": 0,
                "y": domain[1],
                "xanchor": "left",
                "yanchor": "bottom",
                "showarrow": False,
                "font": {"size": 12, "color": INK},
            }
        )
    # tickmode "auto": overlaying axes otherwise sync their ticks to the hidden 0..1 base.
    data_axis = {"anchor": "x", "gridcolor": GRID, "automargin": True, "tickmode": "auto"}
    layout["yaxis5"] = {
        **data_axis,
        "overlaying": "y",
        "title": {"text": "loss / margin"},
        "rangemode": "tozero",
    }
    layout["yaxis6"] = {
        **data_axis,
        "overlaying": "y2",
        "type": "log",
        "title": {"text": "distance, variance"},
        "exponentformat": "power",
    }
    layout["yaxis7"] = {
        **data_axis,
        "overlaying": "y3",
        "range": [0, 1],
        "title": {"text": "share of valid triplets"},
        "tickformat": ".0%",
    }
    layout["yaxis8"] = {
        **data_axis,
        "overlaying": "y4",
        "title": {"text": "std, share, alignment, uniformity"},
    }
    layout["yaxis9"] = {
        **data_axis,
        "overlaying": "y4",
        "side": "right",
        "title": {"text": "effective rank"},
        "rangemode": "tozero",
        "showgrid": False,
    }
    # The collapse plateau: batch-hard loss equals the margin when all distances are zero.
    layout["shapes"].append(_hline("y5", 1.0, OKABE_ITO["vermillion"]))
    layout["annotations"].append(_hline_label("y5", 1.0, "loss = margin", OKABE_ITO["vermillion"]))
    return layout


def _hline(yref: str, y: float, colour: str) -> dict[str, Any]:
    return {
        "type": "line",
        "xref": "x domain",
        "x0": 0,
        "x1": 1,
        "yref": yref,
        "y0": y,
        "y1": y,
        "line": {"color": colour, "width": 1.2, "dash": "dash"},
        "layer": "below",
    }


def _hline_label(yref: str, y: float, text: str, colour: str) -> dict[str, Any]:
    return {
        "text": text,
        "xref": "x domain",
        "x": 1,
        "xanchor": "right",
        "yref": yref,
        "y": y,
        "yanchor": "bottom",
        "showarrow": False,
        "font": {"size": 11, "color": colour},
    }


def _group_frame(frame: pd.DataFrame, group: Sequence[Series]) -> pd.DataFrame:
    columns = [s.column for s in group if s.column in frame]
    values = frame[columns].to_numpy(dtype=float)
    return frame.loc[np.isfinite(values).any(axis=1), ["step", *columns]]


def _series_trace(view: RunView, colour: str, series: Series, rows: pd.DataFrame) -> dict:
    trace: dict[str, Any] = {
        "type": "scatter",
        "mode": "lines+markers" if series.markers else "lines",
        "x": _steps(rows["step"]),
        "y": _values(rows[series.column]),
        "xaxis": "x",
        "yaxis": series.axis,
        "name": view.name,
        "legendgroup": view.run_id,
        "showlegend": series.column == "loss_margin_ratio",
        "line": {"color": colour, "width": 2 if series.fill_alpha is None else 0.6},
        "hovertemplate": f"{series.label} %{{y:{series.fmt}}}<extra>{view.name}</extra>",
    }
    if series.dash != "solid":
        trace["line"]["dash"] = series.dash
    if series.markers:
        trace["marker"] = {"size": 5, "color": colour}
    if series.fill_alpha is not None:
        trace["stackgroup"] = f"difficulty:{view.run_id}"
        trace["fillcolor"] = _rgba(colour, series.fill_alpha)
        if not series.fill_alpha:  # the remainder band: no fill, no line at 100 %
            trace["line"]["width"] = 0
    return trace


def _shade_points(spans: Sequence[Span], last_step: int | None) -> tuple[list, list]:
    # Rectangles as one filled line per panel: (a,0) (a,1) (b,1) (b,0) per span. An open
    # span ends at (last,1), so the live tail extends it by appending (new_last, 1).
    xs: list[int] = []
    ys: list[int] = []
    for span in spans:
        stop = span.stop(last_step)
        xs += [span.start, span.start, stop]
        ys += [0, 1, 1]
        if span.end is not None:
            xs.append(stop)
            ys.append(0)
    return xs, ys


def _event_trace(view: RunView, colour: str) -> dict | None:
    events = view.events
    if not len(events):
        return None
    kinds = events["kind"].astype(str).tolist()
    symbols = [EVENT_STYLE.get(k, ("circle", MUTED))[0] for k in kinds]
    colours = [EVENT_STYLE.get(k, ("circle", MUTED))[1] for k in kinds]
    text = [
        f"{k.replace('_', ' ')} at step {s}: {m}"
        for k, s, m in zip(kinds, events["step"], events["message"], strict=True)
    ]
    return {
        "type": "scatter",
        "mode": "markers",
        "x": _steps(events["step"]),
        "y": [0.93] * len(events),
        "xaxis": "x",
        "yaxis": "y",
        "name": f"{view.name} events",
        "legendgroup": view.run_id,
        "showlegend": False,
        "marker": {
            "symbol": symbols,
            "color": colours,
            "size": 11,
            "line": {"color": colour, "width": 1.5},
        },
        "text": text,
        "hovertemplate": "%{text}<extra>" + view.name + "</extra>",
    }


def run_signature(view: RunView, colour: str) -> list:
    """What, if changed, needs the figure rebuilt rather than extended."""
    columns = [c for c in PLOTTED_COLUMNS if c in view.metrics]
    return [view.run_id, str(view.generation), columns, len(view.events), colour]


def panels_figure(
    views: Sequence[RunView],
    colours: Mapping[str, str],
    max_points: int,
    height: int | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The four step-aligned panels for ``views``, each series decimated to ~max_points.

    Returns the figure and, per run id, where its traces are, for :func:`panels_extension`:
    ``{"last": last step drawn, "traces": {column: index}, "shade": [indices], "open": bool}``.
    """
    layout = _panel_layout(height, runs=len(views))
    data: list[dict[str, Any]] = []
    trace_map: dict[str, dict[str, Any]] = {}
    dims: set[int] = set()
    for view in views:
        colour = colours[view.run_id]
        frame, last = view.metrics, view.last_step
        collapsed = view.spans(("collapsed",))
        flagged = view.spans(("warning", "collapsed", "diverged"))
        event_steps = view.events["step"].tolist() if len(view.events) else []
        entry: dict[str, Any] = {"last": last, "traces": {}, "shade": [], "open": False}
        # Shading first: lower trace indices are drawn first, under the data.
        if collapsed:
            xs, ys = _shade_points(collapsed, last)
            for axis in SHADE_AXES:
                entry["shade"].append(len(data))
                data.append(
                    {
                        "type": "scatter",
                        "mode": "lines",
                        "x": list(xs),
                        "y": list(ys),
                        "xaxis": "x",
                        "yaxis": axis,
                        "fill": "tozeroy",
                        "fillcolor": COLLAPSE_FILL,
                        "line": {"width": 0, "color": COLLAPSE_FILL},
                        "hoverinfo": "skip",
                        "showlegend": False,
                        "legendgroup": view.run_id,
                        "name": f"{view.name} collapsed",
                    }
                )
            entry["open"] = collapsed[-1].end is None
        for group in GROUPS:
            present = [s for s in group if s.column in frame]
            if not present:
                continue
            rows = decimate_frame(
                frame, [s.column for s in present], max_points, flagged, event_steps, last
            )
            for series in present:
                entry["traces"][series.column] = len(data)
                data.append(_series_trace(view, colour, series, rows))
        events = _event_trace(view, colour)
        if events is not None:
            data.append(events)
        trace_map[view.run_id] = entry
        if view.embedding_dim:
            dims.add(view.embedding_dim)
    for dim in sorted(dims):
        healthy = healthy_std_of_l2_normalized(dim)
        layout["shapes"].append(_hline("y8", healthy, MUTED))
        layout["annotations"].append(
            _hline_label("y8", healthy, f"healthy 1/√{dim} = {healthy:.3f}", MUTED)
        )
    if not views:
        layout["annotations"].append(
            {
                "text": "Select one or more runs in the list to plot them.",
                "xref": "paper",
                "yref": "paper",
                "x": 0.5,
                "y": 0.5,
                "showarrow": False,
                "font": {"size": 15, "color": MUTED},
            }
        )
    return {"data": data, "layout": layout}, trace_map


def panels_extension(
    views: Sequence[RunView], trace_maps: Mapping[str, Mapping[str, Any]]
) -> tuple[list | None, dict[str, int]]:
    """``extendData`` for the rows each run gained since its ``trace_maps[...]["last"]``.

    New rows are appended exactly (no decimation); an open collapse span is stretched to
    the new last step. Returns ``(extendData or None if nothing is new, {run id: rows
    appended})``.
    """
    xs: list[list] = []
    ys: list[list] = []
    indices: list[int] = []
    appended: dict[str, int] = {}
    for view in views:
        entry = trace_maps[view.run_id]
        new = view.rows_after(entry["last"])
        appended[view.run_id] = len(new)
        if not len(new):
            continue
        for group in GROUPS:
            present = [s for s in group if s.column in entry["traces"]]
            if not present:
                continue
            rows = _group_frame(new, present)
            if not len(rows):
                continue
            for series in present:
                indices.append(entry["traces"][series.column])
                xs.append(_steps(rows["step"]))
                ys.append(_values(rows[series.column]))
        if entry["open"]:
            for index in entry["shade"]:
                indices.append(index)
                xs.append([int(new["step"].iloc[-1])])
                ys.append([1])
    if not indices:
        return None, appended
    return [{"x": xs, "y": ys}, indices], appended


# ---------------------------------------------------------------------------------------
# Embedding view
# ---------------------------------------------------------------------------------------


def embedding_figure(projection: Projection | None, run_name: str = "") -> dict[str, Any]:
    """Scatter of a projected snapshot, one trace (colour + marker shape) per label."""
    layout: dict[str, Any] = {
        "template": _TEMPLATE_JSON,
        "margin": {"l": 48, "r": 12, "t": 8, "b": 40},
        "showlegend": True,
        "legend": {
            "orientation": "h",
            "x": 0,
            "y": 1.02,
            "yanchor": "bottom",
            "itemsizing": "constant",
            "font": {"size": 11},
            "itemwidth": 30,
            "tracegroupgap": 0,
        },
        "hovermode": "closest",
        "xaxis": {"title": {"text": ""}, "zeroline": False},
        "yaxis": {"title": {"text": ""}, "zeroline": False},
    }
    if projection is None:
        layout["xaxis"]["visible"] = layout["yaxis"]["visible"] = False
        layout["annotations"] = [
            {
                "text": "No embedding snapshots in the selected runs.",
                "xref": "paper",
                "yref": "paper",
                "x": 0.5,
                "y": 0.5,
                "showarrow": False,
                "font": {"size": 13, "color": MUTED},
            }
        ]
        return {"data": [], "layout": layout}
    layout["xaxis"]["title"]["text"] = projection.axis_titles[0]
    layout["yaxis"]["title"]["text"] = projection.axis_titles[1]
    layout["uirevision"] = f"{run_name}:{projection.method}"
    if projection.extent is not None:
        # Fixed axes across the slider: a collapsing run's cloud visibly shrinks.
        (x0, x1), (y0, y1) = projection.extent
        layout["xaxis"].update(range=[x0, x1], autorange=False)
        layout["yaxis"].update(range=[y0, y1], autorange=False, scaleanchor="x")
    xy, labels = projection.xy, projection.labels
    data: list[dict[str, Any]] = []
    base = {"type": "scatter", "mode": "markers"}
    if labels is None:
        data.append(
            {
                **base,
                "x": _values(xy[:, 0]),
                "y": _values(xy[:, 1]),
                "name": "embeddings",
                "marker": {"size": 6, "color": RUN_COLOURS[0], "opacity": 0.75},
                "hovertemplate": "(%{x:.3g}, %{y:.3g})<extra></extra>",
            }
        )
        layout["showlegend"] = False
        return {"data": data, "layout": layout}
    classes = np.unique(labels)
    if len(classes) > MAX_LABEL_TRACES:
        # Too many classes to tell apart by colour: one trace on a sequential scale.
        codes = np.searchsorted(classes, labels)
        data.append(
            {
                **base,
                "x": _values(xy[:, 0]),
                "y": _values(xy[:, 1]),
                "name": "embeddings",
                "text": [str(v) for v in labels.tolist()],
                "marker": {
                    "size": 6,
                    "color": codes.tolist(),
                    "colorscale": "Cividis",
                    "opacity": 0.8,
                    "showscale": False,
                },
                "hovertemplate": "label %{text}<extra></extra>",
            }
        )
        layout["showlegend"] = False
        return {"data": data, "layout": layout}
    for i, label in enumerate(classes.tolist()):
        mask = labels == label
        data.append(
            {
                **base,
                "x": _values(xy[mask, 0]),
                "y": _values(xy[mask, 1]),
                "name": str(label),
                "marker": {
                    "size": 7,
                    "color": LABEL_COLOURS[i % len(LABEL_COLOURS)],
                    "symbol": LABEL_SYMBOLS[i % len(LABEL_SYMBOLS)],
                    "opacity": 0.8,
                    "line": {"width": 0.5, "color": "#ffffff"},
                },
                "hovertemplate": f"label {label}<br>(%{{x:.3g}}, %{{y:.3g}})<extra></extra>",
            }
        )
    return {"data": data, "layout": layout}


def embedding_caption(projection: Projection | None) -> str:
    """One line under the scatter: step, point count and the cloud's real size."""
    if projection is None:
        return ""
    shown = (
        f"{len(projection.xy):,} of {projection.n_points:,} points"
        if len(projection.xy) < projection.n_points
        else f"{projection.n_points:,} points"
    )
    size = f"RMS radius {projection.radius:.3g}"
    if projection.reference_radius and math.isfinite(projection.reference_radius):
        size += f" ({projection.radius / projection.reference_radius:.1%} of the first snapshot)"
    text = f"Step {projection.step:,} · {shown} · {size}"
    if projection.method == "tsne":
        text += " · t-SNE keeps neighbourhoods, not scale: judge collapse by the radius"
    return text
