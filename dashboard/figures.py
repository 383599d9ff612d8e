"""Plotly figures: the step-aligned metric panels, their live extension, the embedding view.

One template (``collapsewatch``) is registered once and used by every figure. Colours are
Okabe–Ito, which stay distinguishable under the common colour-vision deficiencies; a run's
state is always written out as text too, never shown by colour alone.

Figures are plain dicts (what Dash sends anyway) with lists, not NumPy arrays: plotly.py
would turn arrays into base64 typed arrays, which ``Plotly.extendTraces`` cannot append to.
"""

from __future__ import annotations

import functools
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
from .decimate import Extremes, decimate_frame
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
# Runs: Okabe–Ito, then Paul Tol's muted scheme, ten apart. Vermillion is left out because
# it marks collapse (the shading, the plateau line); yellow is too light on white.
RUN_COLOURS = (
    *(OKABE_ITO[c] for c in ("blue", "orange", "green", "purple", "sky")),
    "#332288",
    "#999933",
    "#882255",
    "#44AA99",
    OKABE_ITO["black"],
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

# kind -> (plotly marker symbol, the same shape as text, colour): the panels, their legend
# and the events tables all draw an event kind with this one shape.
EVENT_STYLE = {
    "warning": ("triangle-up", "▲", OKABE_ITO["orange"]),
    "collapsed": ("x", "✖", OKABE_ITO["vermillion"]),
    "recovered": ("circle", "●", OKABE_ITO["blue"]),
    "cleared": ("circle-open", "○", OKABE_ITO["green"]),
    "dimensional_collapse": ("diamond", "◆", OKABE_ITO["purple"]),
    "dimensional_collapse_cleared": ("diamond-open", "◇", OKABE_ITO["green"]),
    "diverged": ("star", "★", OKABE_ITO["black"]),
    "diverged_cleared": ("star-open", "☆", OKABE_ITO["green"]),
    "rescued": ("cross", "✚", OKABE_ITO["sky"]),
    "rescue_failed": ("x-open", "⊗", OKABE_ITO["black"]),
}
DEFAULT_EVENT_STYLE = ("square", "■", MUTED)


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


def run_colours(listed_ids: Sequence[str]) -> dict[str, str]:
    """A colour per run, by its position among the sorted ids of every run in the log
    directory (not only those plotted), so a run keeps its colour whatever is selected."""
    return {rid: RUN_COLOURS[i % len(RUN_COLOURS)] for i, rid in enumerate(sorted(set(listed_ids)))}


def _values(series: pd.Series | np.ndarray) -> list[float | None]:
    # JSON has no NaN; null makes plotly leave a gap.
    return [None if not math.isfinite(v) else v for v in np.asarray(series, dtype=float).tolist()]


def _steps(series: pd.Series | np.ndarray) -> list[int]:
    return np.asarray(series, dtype=np.int64).tolist()


# ---------------------------------------------------------------------------------------
# Metric panels
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One plotted metric column; ``symbol`` is its marker, named in the panel title."""

    column: str
    label: str  # for hover
    dash: str = "solid"
    symbol: str | None = None  # plotly marker symbol; markers drawn only where set
    fmt: str = ".4g"


@dataclass(frozen=True)
class Panel:
    """One band of the stacked figure: its title, data axis settings and series groups.

    ``off_scale`` bounds the values drawn as lines: a non-finite value, or one outside it
    (an exploding run), is drawn as a ✱ on the panel's top edge instead, so it never sets
    the axis range for the other runs.
    """

    key: str
    title: str
    axis: Mapping[str, Any]
    groups: tuple[tuple[Series, ...], ...]  # columns plotted together share their rows
    off_scale: tuple[float, float] = (-math.inf, math.inf)


# A loss this many margins high is off the loss panel: collapse lives at 1.0 and a healthy
# triplet loss stays within a few margins; beyond that the run is exploding, not training.
LOSS_OFF_SCALE = 10.0
# Distances and variances beyond this are float blow-ups (a diverged run reaches 1e39).
SPREAD_OFF_SCALE = 1e8
OFF_SCALE_SYMBOL = "asterisk-open"
MAX_MARKERS = 12  # per series and run

PANELS: tuple[Panel, ...] = (
    Panel(
        "loss",
        "<b>Loss / margin</b> · 1.0 is the collapse plateau · runs without a margin: loss",
        {"title": {"text": "loss / margin"}, "rangemode": "tozero"},
        ((Series("loss_margin_ratio", "loss / margin", fmt=".4f"),),),
        off_scale=(-LOSS_OFF_SCALE, LOSS_OFF_SCALE),
    ),
    Panel(
        "spread",
        "<b>Spread</b> · mean distance: ● all pairs, ▼ between classes; ■ variance (log)",
        {"title": {"text": "distance, variance"}, "type": "log", "exponentformat": "power"},
        (
            (
                Series("mean_pairwise_distance", "mean pairwise distance", symbol="circle"),
                # What the detector judges where the labels are known (NaN without).
                Series(
                    "mean_between_class_distance",
                    "mean distance between classes",
                    "dashdot",
                    symbol="triangle-down",
                ),
                Series("embedding_variance", "embedding variance", "dot", symbol="square"),
            ),
        ),
        off_scale=(0.0, SPREAD_OFF_SCALE),
    ),
    Panel(
        "difficulty",
        "<b>Triplet difficulty</b> · ● hard, ■ semi-hard (easy: the rest)",
        {"title": {"text": "share of triplets"}, "range": [0, 1.02], "tickformat": ".0%"},
        (
            (
                Series("frac_hard", "hard", symbol="circle", fmt=".1%"),
                Series("frac_semihard", "semi-hard", "dot", symbol="square", fmt=".1%"),
            ),
        ),
        off_scale=(0.0, 1.0),
    ),
    Panel(
        "rank",
        "<b>Effective rank</b> · ● measured, dashed: what the classes need",
        {"title": {"text": "effective rank"}, "rangemode": "tozero"},
        # Measured together on rank steps (NaN between), so they share rows.
        (
            (
                Series("effective_rank", "effective rank", symbol="circle", fmt=".3g"),
                Series("reference_rank", "rank the classes need", "dash", fmt=".0f"),
            ),
        ),
        off_scale=(0.0, math.inf),
    ),
    Panel(
        "sphere",
        "<b>Std of L2-normalised embeddings</b> · dashed grey: healthy 1/√D",
        {"title": {"text": "std"}, "rangemode": "tozero"},
        ((Series("std_of_l2_normalized", "std of L2-normalised"),),),
        off_scale=(0.0, 1.0),
    ),
    Panel(
        "geometry",
        "<b>Classes</b> · ● within-class variance share, ■ alignment, ▼ uniformity",
        {"title": {"text": "share, align., unif."}},
        (
            (
                Series(
                    "within_class_variance_ratio",
                    "within-class variance share",
                    symbol="circle",
                    fmt=".3f",
                ),
                Series("alignment", "alignment", "dash", symbol="square", fmt=".3f"),
                Series("uniformity", "uniformity", "dot", symbol="triangle-down", fmt=".3f"),
            ),
        ),
        off_scale=(-4.0, 4.0),  # alignment ∈ [0, 4], uniformity ∈ [−4, 0] on the sphere
    ),
)
PANEL_GAP = 0.05  # of the plot height, between panels: room for the next panel's title


def panel_domains(count: int = len(PANELS)) -> list[tuple[float, float]]:
    """Each panel's (bottom, top) share of the plot height, top panel first."""
    height = (1 - PANEL_GAP * (count - 1)) / count
    domains = []
    for i in range(count):
        top = 1 - i * (height + PANEL_GAP)
        domains.append((max(0.0, top - height), top))
    return domains


def base_axis(index: int) -> str:
    """The hidden 0..1 axis of panel ``index``: collapse shading, events, off-scale marks."""
    return "y" if index == 0 else f"y{index + 1}"


def data_axis(index: int) -> str:
    """The visible axis of panel ``index``, overlaying its base axis."""
    return f"y{len(PANELS) + index + 1}"


def _layout_key(axis: str) -> str:
    return f"yaxis{axis[1:]}"


PLOTTED_COLUMNS = (
    *(s.column for panel in PANELS for group in panel.groups for s in group),
    "loss",  # drawn instead of loss / margin for a run without a margin
)


def _panel_layout(height: int | None, legend_items: int) -> dict[str, Any]:
    # Runs and event kinds share one legend under the step axis: the top right corner is
    # the toolbar's, and a legend there would sit under it.
    legend_rows = max(1, math.ceil(legend_items / 5))
    layout: dict[str, Any] = {
        "template": _TEMPLATE_JSON,
        "uirevision": "panels",  # keep the user's zoom across rebuilds
        "hovermode": "x unified",
        "showlegend": True,
        "legend": {
            "orientation": "h",
            "xref": "container",
            "x": 0.0,
            "xanchor": "left",
            "yref": "container",
            "y": 0.0,
            "yanchor": "bottom",
            "title": {"text": ""},
        },
        "margin": {"l": 72, "r": 24, "t": 34, "b": 52 + 22 * legend_rows},
        "xaxis": {
            "anchor": base_axis(len(PANELS) - 1),
            "domain": [0.0, 1.0],
            "title": {"text": "training step", "standoff": 4},
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
    # tickmode "auto": overlaying axes otherwise sync their ticks to the hidden 0..1 base.
    data_defaults = {"anchor": "x", "gridcolor": GRID, "automargin": True, "tickmode": "auto"}
    for i, (panel, domain) in enumerate(zip(PANELS, panel_domains(), strict=True)):
        base, axis = base_axis(i), data_axis(i)
        layout[_layout_key(base)] = {
            "domain": list(domain),
            "range": [0, 1],
            "visible": False,
            "fixedrange": True,
            "anchor": "x",
        }
        layout[_layout_key(axis)] = {
            **data_defaults,
            **panel.axis,
            "domain": list(domain),
            "overlaying": base,
        }
        layout["annotations"].append(
            {
                "text": panel.title,
                "name": f"title:{panel.key}",
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
    # The collapse plateau: batch-hard loss equals the margin when all distances are zero.
    loss_axis = data_axis(0)
    layout["shapes"].append(_hline(loss_axis, 1.0, OKABE_ITO["vermillion"]))
    layout["annotations"].append(
        _hline_label(loss_axis, 1.0, "loss = margin", OKABE_ITO["vermillion"])
    )
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


def _hline_label(yref: str, y: float, text: str, colour: str, x: float = 1.0) -> dict[str, Any]:
    return {
        "text": text,
        "xref": "x domain",
        "x": x,
        "xanchor": "right",
        "yref": yref,
        "y": y,
        "yanchor": "bottom",
        "showarrow": False,
        "font": {"size": 11, "color": colour},
    }


MARGIN_FREE_LOSS = Series("loss", "loss (no margin)", "dash", fmt=".4g")


def _panel_groups(panel: Panel, columns: Sequence[str]) -> list[list[Series]]:
    """The panel's series this run has; a run without a margin plots its raw loss."""
    groups = [[s for s in group if s.column in columns] for group in panel.groups]
    groups = [g for g in groups if g]
    if panel.key == "loss" and not groups and "loss" in columns:
        groups = [[MARGIN_FREE_LOSS]]
    return groups


def _measured(frame: pd.DataFrame) -> list[str]:
    """The columns holding at least one value: a column of NaN only (the ratio of a run
    without a margin) counts as absent. A run without rows keeps all its columns."""
    if not len(frame):
        return list(frame.columns)
    return frame.columns[frame.notna().to_numpy().any(axis=0)].tolist()


def _on_scale(values: np.ndarray, panel: Panel) -> np.ndarray:
    low, high = panel.off_scale
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values >= low) & (values <= high)


def _drawn(values: np.ndarray, panel: Panel) -> list[float | None]:
    """The values as the line draws them: null (a gap) where off scale or missing."""
    return [
        v if ok else None for v, ok in zip(values.tolist(), _on_scale(values, panel), strict=True)
    ]


def _off_scale_rows(rows: pd.DataFrame, panel: Panel, group: Sequence[Series]) -> np.ndarray:
    """Rows where some series of ``group`` holds ±inf or a value beyond the panel's bounds.

    NaN alone is "not measured" (rank steps, a loss without a margin), not a blow-up.
    """
    flags = np.zeros(len(rows), dtype=bool)
    for series in group:
        values = rows[series.column].to_numpy(dtype=float)
        flags |= ~np.isnan(values) & ~_on_scale(values, panel)
    return flags


def _series_trace(
    view: RunView, colour: str, series: Series, axis: str, panel: Panel, rows: pd.DataFrame
) -> dict:
    values = rows[series.column].to_numpy(dtype=float)
    lone = len(rows) == 1  # one row draws no line: show it as a marker
    markers = series.symbol is not None or lone
    trace: dict[str, Any] = {
        "type": "scatter",
        "mode": "lines+markers" if markers else "lines",
        "x": _steps(rows["step"]),
        "y": _drawn(values, panel),
        "xaxis": "x",
        "yaxis": axis,
        "name": view.name,
        "legendgroup": view.run_id,
        "legendrank": 1,
        "showlegend": panel.key == "loss",
        "line": {"color": colour, "width": 2},
        "hovertemplate": f"{series.label} %{{y:{series.fmt}}}<extra>{view.name}</extra>",
    }
    if series.dash != "solid":
        trace["line"]["dash"] = series.dash
    if markers:
        # A dozen markers along a dense line name the series; one per point would bury it.
        trace["marker"] = {
            "size": 6,
            "color": colour,
            "symbol": series.symbol or "circle",
            "maxdisplayed": MAX_MARKERS,
        }
    return trace


def _fold_off_scale_points(
    found: tuple, rows: pd.DataFrame, offset: int, *, panel: Panel, group: Sequence[Series]
) -> tuple:
    """One step of the off-scale fold: ``found`` and the points of the next ``rows``."""
    return found + _off_scale_points(rows, panel, group)


def _off_scale_points(
    frame: pd.DataFrame, panel: Panel, group: Sequence[Series]
) -> tuple[tuple[int, str], ...]:
    """(step, hover text) of each row of ``frame`` where ``group`` is off ``panel``'s scale."""
    points = []
    for _, row in frame.loc[_off_scale_rows(frame, panel, group)].iterrows():
        values = {s.label: float(row[s.column]) for s in group}
        shown = [
            f"{label} {value:.3g}"
            for label, value in values.items()
            if not math.isnan(value) and not _on_scale(np.array([value]), panel)[0]
        ]
        step = int(row["step"])
        points.append((step, f"off scale at step {step}: " + ", ".join(shown)))
    return tuple(points)


def _off_scale_trace(
    view: RunView, colour: str, panel: Panel, index: int, groups: Sequence[Sequence[Series]]
) -> dict | None:
    """✱ on the panel's top edge at each step where a value is non-finite or off scale."""
    points: list[tuple[int, str]] = []
    for group in groups:
        points += view.folds.fold(
            ("off scale", panel.key, tuple(s.column for s in group)),
            view.metrics,
            tuple,
            functools.partial(_fold_off_scale_points, panel=panel, group=group),
        )
    if not points:
        return None
    steps = [step for step, _ in points]
    text = [line for _, line in points]
    return {
        "type": "scatter",
        "mode": "markers",
        "x": steps,
        "y": [0.97] * len(steps),
        "xaxis": "x",
        "yaxis": base_axis(index),
        "name": f"{view.name} off scale",
        "legendgroup": view.run_id,
        "showlegend": False,
        "cliponaxis": False,
        "marker": {"symbol": OFF_SCALE_SYMBOL, "size": 9, "color": colour, "line": {"width": 1.5}},
        "text": text,
        "hovertemplate": "%{text}<extra>" + view.name + "</extra>",
    }


def _off_scale_note(panel: Panel, index: int) -> dict[str, Any]:
    """What ✱ means, right-aligned in the gap under the panel (its top right holds the ✱)."""
    low, high = panel.off_scale
    if high == math.inf:
        bounds = f"below {low:g}"
    elif low in (0.0, -math.inf):
        bounds = f"above {high:g}"
    else:
        bounds = f"beyond ±{high:g}"
    bottom, top = panel_domains()[index]
    last = index == len(PANELS) - 1  # under the last panel are the step axis's labels
    return {
        "text": f"✱ off scale: ±inf or {bounds}",
        "name": f"off-scale:{panel.key}",
        "xref": "paper",
        "yref": "paper",
        "x": 1,
        "y": top if last else bottom,
        "xanchor": "right",
        "yanchor": "bottom" if last else "top",
        "yshift": 0 if last else -2,
        "showarrow": False,
        "font": {"size": 11, "color": INK},
    }


def _frame_traces(index: int) -> list[dict[str, Any]]:
    # Every panel owns an empty trace on each of its two axes: plotly drops an axis no
    # trace uses, and an overlaying axis whose base was dropped loses its band. So the
    # panels keep their place and their ticks whatever the plotted runs hold (no collapse
    # to shade, no rows at all, no column for this panel).
    return [
        {
            "type": "scatter",
            "x": [],
            "y": [],
            "xaxis": "x",
            "yaxis": axis,
            "name": f"panel:{PANELS[index].key}",
            "showlegend": False,
            "hoverinfo": "skip",
        }
        for axis in (base_axis(index), data_axis(index))
    ]


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


def event_style(kind: str) -> tuple[str, str, str]:
    """(plotly marker symbol, the same shape as text, colour) of a detector event kind."""
    return EVENT_STYLE.get(kind, DEFAULT_EVENT_STYLE)


def _event_trace(view: RunView, colour: str) -> dict | None:
    events = view.events
    if not len(events):
        return None
    kinds = events["kind"].astype(str).tolist()
    styles = [event_style(k) for k in kinds]
    text = [
        f"{glyph} {k.replace('_', ' ')} at step {s}: {m}"
        for (_, glyph, _), k, s, m in zip(
            styles, kinds, events["step"], events["message"], strict=True
        )
    ]
    return {
        "type": "scatter",
        "mode": "markers",
        "x": _steps(events["step"]),
        "y": [0.9] * len(events),
        "xaxis": "x",
        "yaxis": base_axis(0),
        "name": f"{view.name} events",
        "legendgroup": view.run_id,
        "showlegend": False,
        "cliponaxis": False,  # an event at the first or last step is drawn whole
        "marker": {
            "symbol": [s[0] for s in styles],
            "color": [s[2] for s in styles],
            "size": 11,
            "line": {"color": colour, "width": 1.5},
        },
        "text": text,
        "hovertemplate": "%{text}<extra>" + view.name + "</extra>",
    }


def _event_key_trace(kind: str) -> dict[str, Any]:
    """A legend entry (no points) showing an event kind's marker as the panels draw it."""
    symbol, _, colour = event_style(kind)
    return {
        "type": "scatter",
        "mode": "markers",
        "x": [None],
        "y": [None],
        "xaxis": "x",
        "yaxis": base_axis(0),
        "name": f"event: {kind.replace('_', ' ')}",
        "legendgroup": f"event:{kind}",
        "legendrank": 2,
        "showlegend": True,
        "hoverinfo": "skip",
        "marker": {"symbol": symbol, "color": colour, "size": 10},
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
    """The step-aligned panels (:data:`PANELS`) for ``views``, series decimated to
    ~max_points. Every panel has its band whatever the runs hold.

    Returns the figure and, per run id, where its traces are, for :func:`panels_extension`:
    ``{"last": last step drawn, "traces": {column: index}, "shade": [indices], "open": bool}``.
    """
    kinds = sorted({k for v in views for k in v.events.get("kind", pd.Series()).astype(str)})
    layout = _panel_layout(height, legend_items=len(views) + len(kinds))
    data: list[dict[str, Any]] = [t for i in range(len(PANELS)) for t in _frame_traces(i)]
    trace_map: dict[str, dict[str, Any]] = {}
    dims: set[int] = set()
    off_scale_panels: set[int] = set()
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
            for i in range(len(PANELS)):
                entry["shade"].append(len(data))
                data.append(_shade_trace(view, base_axis(i), xs, ys))
            entry["open"] = collapsed[-1].end is None
        measured = _measured_columns(view)
        for i, panel in enumerate(PANELS):
            groups = _panel_groups(panel, measured)
            for group in groups:
                columns = [s.column for s in group]
                extremes = _extremes(view, columns, max_points)
                rows = decimate_frame(
                    frame, columns, max_points, flagged, event_steps, last, extremes
                )
                for series in group:
                    entry["traces"][series.column] = len(data)
                    data.append(_series_trace(view, colour, series, data_axis(i), panel, rows))
            off = _off_scale_trace(view, colour, panel, i, groups)
            if off is not None:
                data.append(off)
                off_scale_panels.add(i)
        events = _event_trace(view, colour)
        if events is not None:
            data.append(events)
        trace_map[view.run_id] = entry
        if view.embedding_dim:
            dims.add(view.embedding_dim)
    data += [_event_key_trace(kind) for kind in kinds]
    layout["annotations"] += [_off_scale_note(PANELS[i], i) for i in sorted(off_scale_panels)]
    sphere = data_axis(next(i for i, p in enumerate(PANELS) if p.key == "sphere"))
    for n, dim in enumerate(sorted(dims)):
        healthy = healthy_std_of_l2_normalized(dim)
        layout["shapes"].append(_hline(sphere, healthy, MUTED))
        # Staggered along the line: two widths' labels never print over each other.
        label = f"healthy 1/√{dim} = {healthy:.3f}"
        layout["annotations"].append(_hline_label(sphere, healthy, label, MUTED, 1 - 0.3 * n))
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


def _measured_columns(view: RunView) -> list[str]:
    """:func:`_measured` of the view's rows, folded as the run grows."""
    frame = view.metrics
    if not len(frame):
        return _measured(frame)
    seen = view.folds.fold(
        "measured", frame, frozenset, lambda found, rows, _: found | set(_measured(rows))
    )
    return [c for c in frame.columns if c in seen]


def _extremes(view: RunView, columns: Sequence[str], max_points: int) -> Extremes:
    """The decimation of ``columns`` (all present), folded as the run grows."""
    return view.folds.fold(
        ("extremes", tuple(columns), max_points),
        view.metrics,
        lambda: Extremes.start(max_points, len(columns)),
        lambda extremes, rows, offset: extremes.extend(
            rows["step"].to_numpy(), rows[list(columns)].to_numpy(dtype=float), offset
        ),
    )


def _shade_trace(view: RunView, axis: str, xs: list, ys: list) -> dict[str, Any]:
    return {
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


class NeedsRebuildError(Exception):
    """New rows hold something an extension cannot draw (an off-scale value)."""


def panels_extension(
    views: Sequence[RunView], trace_maps: Mapping[str, Mapping[str, Any]]
) -> tuple[list | None, dict[str, int]]:
    """``extendData`` for the rows each run gained since its ``trace_maps[...]["last"]``.

    New rows are appended exactly (no decimation); an open collapse span is stretched to
    the new last step. Returns ``(extendData or None if nothing is new, {run id: rows
    appended})``; raises :class:`NeedsRebuildError` when a new value is off scale (its ✱ and
    the panel's note come with a rebuilt figure).
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
        for panel in PANELS:
            for group in _panel_groups(panel, list(entry["traces"])):
                rows = _group_frame(new, group)
                if not len(rows):
                    continue
                if _off_scale_rows(rows, panel, group).any():
                    raise NeedsRebuildError(view.run_id)
                for series in group:
                    indices.append(entry["traces"][series.column])
                    xs.append(_steps(rows["step"]))
                    ys.append(_drawn(rows[series.column].to_numpy(dtype=float), panel))
        if entry["open"]:
            for index in entry["shade"]:
                indices.append(index)
                xs.append([int(new["step"].iloc[-1])])
                ys.append([1])
    if not indices:
        return None, appended
    return [{"x": xs, "y": ys}, indices], appended


def _group_frame(frame: pd.DataFrame, group: Sequence[Series]) -> pd.DataFrame:
    columns = [s.column for s in group if s.column in frame]
    values = frame[columns].to_numpy(dtype=float)
    return frame.loc[~np.isnan(values).all(axis=1), ["step", *columns]]


# ---------------------------------------------------------------------------------------
# Embedding view
# ---------------------------------------------------------------------------------------


def embedding_figure(projection: Projection | None, run_name: str = "") -> dict[str, Any]:
    """Scatter of a projected snapshot, one trace (colour + marker shape) per label."""
    layout: dict[str, Any] = {
        "template": _TEMPLATE_JSON,
        "margin": {"l": 48, "r": 12, "t": 28, "b": 72},
        "showlegend": True,
        # Under the plot: the toolbar takes the top right corner.
        "legend": {
            "orientation": "h",
            "x": 0,
            "xref": "container",
            "y": 0,
            "yref": "container",
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
