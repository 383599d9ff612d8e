"""The page: its skeleton, and the pieces the callbacks fill in (run rows, banners, cards)."""

from __future__ import annotations

import datetime as dt
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dash import dcc, html
from dash.dash_table.DataTable import DataTable  # dash.dash_table's own module is untyped

from collapsewatch.columns import format_number
from collapsewatch.states import RunState

from .data import Alert, RunEntry, RunView
from .figures import event_style, panels_figure


class ID:
    """Component ids, in one place for the callbacks and the tests."""

    INTERVAL = "cw-interval"
    STATUS = "cw-status"
    RUN_LIST = "cw-run-list"
    RUN_COUNT = "cw-run-count"
    RUN_HINT = "cw-run-hint"
    TABLE_SECTION = "cw-table-section"
    RUN_TABLE = "cw-run-table"
    TABLE_FINGERPRINT = "cw-table-fingerprint"
    LIST_FINGERPRINT = "cw-list-fingerprint"
    SELECTION_READY = "cw-selection-ready"
    BANNERS = "cw-banners"
    ERRORS = "cw-errors"
    PANELS = "cw-panels"
    PANEL_STATE = "cw-panel-state"
    PANEL_ERRORS = "cw-panel-errors"
    EVENTS = "cw-events"
    EMBED_RUN = "cw-embed-run"
    EMBED_METHOD = "cw-embed-method"
    EMBED_SLIDER = "cw-embed-slider"
    EMBED_STEPS = "cw-embed-steps"
    EMBED_GRAPH = "cw-embed-graph"
    EMBED_CAPTION = "cw-embed-caption"
    EMBED_ERRORS = "cw-embed-errors"


STATE_SYMBOLS = {
    RunState.HEALTHY: "✓",
    RunState.WARNING: "!",
    RunState.COLLAPSED: "✖",
    RunState.DIVERGED: "↯",
    RunState.RECOVERED: "↺",
    RunState.EMPTY: "∅",
    "error": "⚠",
}
PANELS_HEIGHT = 1080  # six panels of ~120 px each, legend and step axis
# From this many runs (a sweep) the runs are picked in the table, not the checklist.
TABLE_MIN_RUNS = 12
TABLE_PAGE_SIZE = 25
MAX_FAILED_BANNERS = 3  # beyond that one line counts the rest: the table lists them all

# Evidence keys the detector writes, in reading order, with their display names.
EVIDENCE_LABELS = {
    "loss_margin_ratio": "loss / margin",
    "margin": "margin",
    "mean_pairwise_distance": "mean pairwise distance",
    "peak_mean_pairwise_distance": "peak mean pairwise distance",
    "mean_between_class_distance": "mean distance between classes",
    "peak_mean_between_class_distance": "peak mean distance between classes",
    "peak_step": "peak at step",
    "embedding_variance": "embedding variance",
    "peak_embedding_variance": "peak embedding variance",
    "std_of_l2_normalized": "std of L2-normalised",
    "effective_rank": "effective rank",
    "embedding_dim": "dimensions",
    "nonfinite_count": "non-finite entries",
    "since_step": "since step",
}
# Light tints behind a state cell (the text and symbol carry the state; this only helps).
STATE_TINTS = {
    "collapsed": "#fbe3d6",
    "diverged": "#f7e4ef",
    "warning": "#fdf1d6",
    "recovered": "#dcebf7",
    "error": "#e4e7eb",
}
STEP_KEYS = frozenset({"peak_step", "since_step", "embedding_dim", "nonfinite_count"})


def build_layout(logdir: str, interval_ms: int) -> html.Div:
    """The whole page; every data-bearing part starts empty and is filled by callbacks."""
    empty_figure, _ = panels_figure([], {}, 1, height=PANELS_HEIGHT)
    graph_config: dcc.Graph.Config = {"displaylogo": False, "responsive": True}
    return html.Div(
        className="cw-page",
        children=[
            html.Header(
                className="cw-header",
                children=[
                    html.Div(
                        [
                            html.H1("collapsewatch", className="cw-title"),
                            html.Span("embedding-collapse monitor", className="cw-subtitle"),
                        ]
                    ),
                    html.Div(
                        [
                            html.Code(logdir, className="cw-logdir", title="log directory"),
                            html.Span(
                                f"live · polls every {interval_ms / 1000:g} s",
                                className="cw-live",
                            ),
                            html.Span(id=ID.STATUS, className="cw-status"),
                        ],
                        className="cw-header-right",
                    ),
                ],
            ),
            html.Div(id=ID.BANNERS, className="cw-banners", role="alert"),
            html.Div(id=ID.ERRORS, className="cw-errors"),
            _table_section(),
            html.Main(
                className="cw-main",
                children=[
                    html.Aside(
                        className="cw-side",
                        children=[
                            html.Section(
                                className="cw-card",
                                children=[
                                    html.H2(["Runs ", html.Span(id=ID.RUN_COUNT)]),
                                    dcc.Checklist(
                                        id=ID.RUN_LIST,
                                        options=[],
                                        value=[],
                                        className="cw-run-list",
                                        labelClassName="cw-run-option",
                                        inputClassName="cw-run-check",
                                    ),
                                    html.P(id=ID.RUN_HINT, className="cw-muted"),
                                ],
                            ),
                            _embedding_card(graph_config),
                        ],
                    ),
                    html.Section(
                        className="cw-card cw-panels-card",
                        children=[
                            html.Div(id=ID.PANEL_ERRORS, className="cw-errors"),
                            dcc.Graph(
                                id=ID.PANELS,
                                figure=empty_figure,
                                config=graph_config,
                                style={"height": f"{PANELS_HEIGHT}px"},
                            ),
                            html.H2("Detector events"),
                            html.Div(id=ID.EVENTS, className="cw-events"),
                        ],
                    ),
                ],
            ),
            dcc.Interval(id=ID.INTERVAL, interval=interval_ms, n_intervals=0),
            dcc.Store(id=ID.SELECTION_READY, data=False),
            dcc.Store(id=ID.PANEL_STATE, data=None),
            dcc.Store(id=ID.EMBED_STEPS, data=[]),
            dcc.Store(id=ID.TABLE_FINGERPRINT, data=None),
            dcc.Store(id=ID.LIST_FINGERPRINT, data=None),
        ],
    )


def _data_table(**props: Any) -> DataTable:
    # Dash 4 warns that DataTable will leave its built-in components some day; it is still
    # built in and needs no new dependency, which is why it was chosen. Hide that one note.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"\s*The dash_table.DataTable will be removed", DeprecationWarning
        )
        return DataTable(**props)


def _table_section() -> html.Details:
    """The runs of a sweep as a sortable, filterable table; ticking rows plots the runs.

    Hidden until the log directory holds :data:`TABLE_MIN_RUNS` runs; a ``<details>`` so
    it can be folded away to give the panels the screen."""
    return html.Details(
        id=ID.TABLE_SECTION,
        className="cw-card cw-table-card",
        open=True,
        hidden=True,
        children=[
            html.Summary(html.H2("All runs: sort, filter, tick to plot", className="cw-inline")),
            _data_table(
                id=ID.RUN_TABLE,
                columns=[],
                data=[],
                sort_action="native",
                sort_mode="multi",
                filter_action="native",
                filter_options={"case": "insensitive"},
                row_selectable="multi",
                selected_rows=[],
                page_action="native",
                page_size=TABLE_PAGE_SIZE,
                style_table={"overflowX": "auto"},
                style_cell={
                    "fontFamily": "inherit",
                    "fontSize": "13px",
                    "padding": "3px 8px",
                    "textAlign": "left",
                    "whiteSpace": "nowrap",
                },
                style_header={"fontWeight": "600", "background": "#f5f7fa"},
                style_data_conditional=[
                    {
                        "if": {"filter_query": f'{{state}} contains "{state}"'},
                        "backgroundColor": colour,
                    }
                    for state, colour in STATE_TINTS.items()
                ],
            ),
        ],
    )


def _embedding_card(graph_config: dcc.Graph.Config) -> html.Section:
    return html.Section(
        className="cw-card cw-embedding-card",
        children=[
            html.H2("Embeddings"),
            html.Div(
                className="cw-embed-controls",
                children=[
                    dcc.Dropdown(
                        id=ID.EMBED_RUN,
                        options=[],
                        value=None,
                        clearable=False,
                        placeholder="run with snapshots",
                        className="cw-embed-run",
                    ),
                    dcc.RadioItems(
                        id=ID.EMBED_METHOD,
                        options=[
                            {"label": "PCA", "value": "pca"},
                            {"label": "t-SNE (slow)", "value": "tsne"},
                        ],
                        value="pca",
                        inline=True,
                        className="cw-embed-method",
                    ),
                ],
            ),
            dcc.Loading(
                dcc.Graph(
                    id=ID.EMBED_GRAPH,
                    config=graph_config,
                    style={"height": "340px"},
                ),
                type="circle",
                delay_show=400,
            ),
            html.Div(
                className="cw-slider",
                children=[
                    html.Label("snapshot step", htmlFor=ID.EMBED_SLIDER),
                    dcc.Slider(
                        id=ID.EMBED_SLIDER,
                        min=0,
                        max=0,
                        step=1,
                        value=0,
                        marks={},
                        updatemode="drag",
                        included=False,
                        allow_direct_input=False,
                    ),
                ],
            ),
            html.P(id=ID.EMBED_CAPTION, className="cw-caption"),
            html.Div(id=ID.EMBED_ERRORS, className="cw-errors"),
        ],
    )


# ---------------------------------------------------------------------------------------
# Pieces filled in by callbacks
# ---------------------------------------------------------------------------------------


# HTML attributes whose names are not Python identifiers go to a component as **kwargs.
ARIA_HIDDEN: dict[str, Any] = {"aria-hidden": "true"}  # decoration a screen reader skips


def _data_attributes(**values: str) -> dict[str, Any]:
    """``data-*`` attributes (``run=...`` → ``data-run``), which the tests and CSS select."""
    return {f"data-{name}": value for name, value in values.items()}


def state_badge(state: str) -> html.Span:
    """A run state as symbol + word on a tinted background: never colour alone."""
    return html.Span(
        [html.Span(STATE_SYMBOLS.get(state, "?"), **ARIA_HIDDEN), f" {state}"],
        className=f"cw-badge cw-badge-{state}",
        **_data_attributes(state=state),
    )


def format_age(seconds_ago: float | None) -> str:
    """'just now', '42 s ago', '3 min ago', '5 h ago', '2 d ago'."""
    if seconds_ago is None or not math.isfinite(seconds_ago):
        return "never"
    s = max(0.0, seconds_ago)
    if s < 2:
        return "just now"
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ago"
    if s < 36 * 3600:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} d ago"


def run_option(entry: RunEntry, colour: str | None, now: float) -> dict[str, Any]:
    """One checklist option of the run list: state badge, name, loss, margin, steps, age."""
    state = entry.ui_state
    swatch = html.Span(
        className="cw-swatch",
        style={"background": colour} if colour else {},
        title="colour in the plots" if colour else "not plotted",
    )
    head = html.Div(
        [swatch, html.Span(entry.name, className="cw-run-name"), state_badge(state)],
        className="cw-run-head",
    )
    summary = entry.summary
    if summary is None:
        detail = html.Div(entry.error or "unreadable", className="cw-run-detail cw-run-error")
    else:
        updated = (
            dt.datetime.fromtimestamp(summary.last_time).isoformat(sep=" ", timespec="seconds")
            if summary.last_time
            else "no steps yet"
        )
        detail = html.Div(
            [
                _stat("loss", format_number(summary.last_loss)),
                _stat("margin", format_number(summary.margin)),
                _stat(
                    "last step",
                    format_number(summary.last_step),
                    f"{summary.recorded_steps:,} recorded steps, the last at step "
                    f"{format_number(summary.last_step)}",
                ),
                html.Span(
                    f"{format_age(now - summary.last_time if summary.last_time else None)}"
                    f" · {summary.status}",
                    className="cw-run-age",
                    title=f"last update {updated}",
                ),
            ],
            className="cw-run-detail",
        )
    return {
        "label": html.Div(
            [head, detail],
            className=f"cw-run cw-run-{state}",
            title=entry.run_id,
            **_data_attributes(run=entry.run_id, state=state),
        ),
        "value": entry.run_id,
        "disabled": summary is None,
    }


def _stat(name: str, value: str, title: str | None = None) -> html.Span:
    return html.Span(
        [html.Span(name, className="cw-stat-name"), f" {value}"], className="cw-stat", title=title
    )


def evidence_items(evidence: Mapping[str, Any]) -> list[html.Li]:
    """The detector's numbers, known keys first in a fixed order, with readable names."""
    keys = [k for k in EVIDENCE_LABELS if k in evidence]
    keys += sorted(k for k in evidence if k not in EVIDENCE_LABELS)
    items = []
    for key in keys:
        label = EVIDENCE_LABELS.get(key, key.replace("_", " "))
        value = evidence[key]
        if key in STEP_KEYS and isinstance(value, float) and value.is_integer():
            value = int(value)  # a step or a count: 1,234 rather than 1234.0 or 1.234e+03
        text = format_number(value)
        items.append(html.Li([html.Span(label, className="cw-ev-name"), f" {text}"]))
    return items


def banner(entry: RunEntry) -> html.Div:
    """The alert for a run that is collapsed (or warned): onset step, evidence, what to try."""
    alert: Alert | None = entry.alert
    state = entry.ui_state
    onset = alert.onset_step if alert else None
    title = {"collapsed": "Collapsed", "diverged": "Diverged"}.get(state, "Warning")
    heading = [
        state_badge(state),
        html.Strong(f" {entry.name}", className="cw-banner-run"),
        html.Span(
            f" {title.lower()} at step {onset:,}" if onset is not None else f" {title.lower()}",
            className="cw-banner-onset",
            **_data_attributes(onset="" if onset is None else str(onset)),
        ),
    ]
    children: list[Any] = [html.Div(heading, className="cw-banner-head")]
    if alert is not None:
        if alert.message:
            children.append(html.P(alert.message, className="cw-banner-message"))
        if alert.evidence:
            children.append(html.Ul(evidence_items(alert.evidence), className="cw-evidence"))
        if alert.suggestion:
            children.append(
                html.P([html.Strong("Try: "), alert.suggestion], className="cw-banner-try")
            )
    return html.Div(
        children,
        className=f"cw-banner cw-banner-{state}",
        **_data_attributes(run=entry.run_id, state=state),
    )


def _last_update(entry: RunEntry) -> float:
    """When the run last wrote a row (0 for a run not yet read)."""
    return (entry.summary.last_time if entry.summary else None) or 0.0


def banners(entries: Iterable[RunEntry], limit: int = MAX_FAILED_BANNERS) -> list[html.Div]:
    """A banner for every diverged or collapsed run, then a smaller one for every run in
    warning; in a sweep with more than ``limit`` such runs, the most recently updated
    ``limit`` get one and a line counts the others (the run table lists them all)."""
    entries = list(entries)
    failed = [e for e in entries if e.ui_state in ("diverged", "collapsed")]
    warned = [e for e in entries if e.ui_state == "warning"]
    flagged = failed + warned
    if len(flagged) <= limit:
        return [banner(e) for e in flagged]
    recent = sorted(flagged, key=_last_update, reverse=True)[:limit]
    shown = [e for e in flagged if e in recent]  # failed first, each group by run id
    rest = len(flagged) - limit
    more = html.Div(
        f"… and {rest:,} more run{'s' if rest > 1 else ''} collapsed, diverged or in warning:"
        " filter the run table by state to see them all.",
        className="cw-banner cw-banner-more",
    )
    return [*(banner(e) for e in shown), more]


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A run's config as one level, nested keys joined by dots (``{"opt": {"lr": 0.1}}`` →
    ``{"opt.lr": 0.1}``), every value a JSON-safe scalar a table cell can hold: finite
    numbers and strings as they are, NaN/±inf and None as None, booleans as "true"/"false",
    anything else (lists) as its compact JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, bool):
            flat[name] = "true" if value else "false"
        elif isinstance(value, int | float):
            flat[name] = value if math.isfinite(value) else None
        elif value is None or isinstance(value, str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, separators=(",", ":"), default=str, allow_nan=False)
    return flat


CONFIG_COLUMN_PREFIX = "config."
# (column id, header, DataTable type) of the columns every run has.
RUN_TABLE_COLUMNS = (
    ("state", "state", "text"),
    ("run", "run", "text"),
    ("onset_step", "onset step", "numeric"),
    ("last_step", "last step", "numeric"),
    ("final_loss_margin_ratio", "final loss / margin", "numeric"),
    ("final_mean_pairwise_distance", "final mean pairwise distance", "numeric"),
)


def run_table(entries: Sequence[RunEntry]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run table's (columns, rows): one row per run, keyed ``id`` = run id, with state
    as symbol + word, the onset, last step and final values, then one column per config key
    (the union over runs, sorted; a run without the key has None there)."""
    rows, configs = [], []
    for entry in entries:
        summary, state = entry.summary, entry.ui_state
        final = entry.final
        ratio, distance = final.get("loss_margin_ratio"), final.get("mean_pairwise_distance")
        row = {
            "id": entry.run_id,
            "state": f"{STATE_SYMBOLS.get(state, '?')} {state}",
            "run": entry.name,
            "onset_step": entry.onset_step,
            "last_step": summary.last_step if summary is not None else None,
            "final_loss_margin_ratio": _cell_number(ratio),
            "final_mean_pairwise_distance": _cell_number(distance),
        }
        config = flatten_config(entry.config)
        configs.append(config)
        rows.append(row)
    keys = sorted({k for config in configs for k in config})
    for row, config in zip(rows, configs, strict=True):
        row.update({CONFIG_COLUMN_PREFIX + k: config.get(k) for k in keys})
    columns = [{"id": i, "name": name, "type": kind} for i, name, kind in RUN_TABLE_COLUMNS]
    for key in keys:
        values = [c[key] for c in configs if c.get(key) is not None]
        kind = "numeric" if all(isinstance(v, int | float) for v in values) else "text"
        columns.append({"id": CONFIG_COLUMN_PREFIX + key, "name": key, "type": kind})
    return columns, rows


def _cell_number(value: Any) -> float | None:
    # 4 significant digits: the table is for ranking runs by eye, sorting stays numeric.
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(f"{value:.4g}")


def error_card(title: str, run_id: str | None, message: str) -> html.Div:
    """A card saying what could not be read and why; the rest of the app keeps working."""
    children: list[Any] = [html.Span("⚠", className="cw-error-icon"), html.Strong(f" {title}")]
    if run_id:
        children += [" ", html.Code(run_id)]
    return html.Div(
        [html.Div(children), html.P(message, className="cw-error-message")],
        className="cw-error-card",
        **_data_attributes(run=run_id or ""),
    )


def events_table(views: Sequence[RunView], limit: int = 50) -> html.Table | html.P:
    """The latest detector events of the plotted runs, newest first."""
    rows = []
    for view in views:
        for event in view.events.itertuples(index=False):
            rows.append((event.step, event.time, view.name, event.kind, event.message))
    if not rows:
        return html.P("No detector events in the plotted runs.", className="cw-muted")
    rows.sort(key=lambda r: (r[1], r[0]), reverse=True)
    body = [
        html.Tr(
            [
                html.Td(f"{step:,}", className="cw-num"),
                html.Td(name, className="cw-nowrap"),
                html.Td(
                    [
                        html.Span(  # the shape and colour the panels mark this kind with
                            event_style(kind)[1],
                            style={"color": event_style(kind)[2]},
                            className="cw-event-glyph",
                            **ARIA_HIDDEN,
                        ),
                        f" {kind.replace('_', ' ')}",
                    ],
                    className="cw-nowrap",
                ),
                html.Td(message),
            ]
        )
        for step, _, name, kind, message in rows[:limit]
    ]
    head = html.Thead(
        html.Tr([html.Th("step"), html.Th("run"), html.Th("event"), html.Th("message")])
    )
    return html.Table([head, html.Tbody(body)], className="cw-events-table")
