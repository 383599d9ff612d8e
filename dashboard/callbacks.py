"""Callbacks: thin Dash wrappers around plain functions that take and return plain data.

The ``*_update`` functions hold the logic and are what the unit tests call; the callbacks
registered by :func:`register_callbacks` only translate ``None`` into ``dash.no_update``.

Live panels (:func:`panels_update`): the figure is rebuilt — every series decimated to
``max_points`` — when the page loads, when the selection changes, when a run gains an event
or a new column, or, for a run already longer than ``max_points`` rows, once the rows
appended since the last rebuild pass a quarter of ``max_points`` (so the exact live tail
never grows without bound). Every other tick sends only the new rows, exactly, through the
graph's ``extendData``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dash
from dash import Input, Output, State

from .data import InvalidRunIdError, RunCache, RunListing, RunView
from .figures import (
    NeedsRebuildError,
    embedding_caption,
    embedding_figure,
    panels_extension,
    panels_figure,
    run_colours,
    run_signature,
)
from .layout import (
    ID,
    PANELS_HEIGHT,
    TABLE_MIN_RUNS,
    banners,
    error_card,
    events_table,
    run_option,
    run_table,
)

DEFAULT_SELECTION = 4  # runs plotted when the page first finds some
MAX_SLIDER_MARKS = 6


# ---------------------------------------------------------------------------------------
# Run list, banners, error cards
# ---------------------------------------------------------------------------------------


@dataclass
class RunListUpdate:
    """The run list's outputs; None leaves one as the page shows it."""

    options: list[dict[str, Any]] | None
    value: list[str] | None  # None: leave the selection alone
    ready: bool | None
    banners: list | None
    errors: list | None
    count: str | None
    status: str
    hint: str | None = ""
    fingerprint: str | None = None  # what the page shows after this update


def default_selection(listing: RunListing, limit: int = DEFAULT_SELECTION) -> list[str]:
    """The most recently updated readable runs, for a page that has selected nothing yet."""
    recency = [
        (e.summary.last_time or e.summary.recorded_steps or 0, e.run_id)
        for e in listing.entries
        if e.summary is not None
    ]
    recency.sort(key=lambda pair: pair[0], reverse=True)  # stable: ties stay by run id
    return sorted(run_id for _, run_id in recency[:limit])


def run_list_update(
    cache: RunCache,
    selected: Sequence[str] | None,
    ready: bool,
    now: float | None = None,
    shown: str | None = None,
) -> RunListUpdate:
    """The run list, banners and error cards for the runs now in the log directory.

    The first time readable runs appear, the most recent ones are selected; after that the
    user's selection is only trimmed of runs whose files went away. For a sweep (from
    ``TABLE_MIN_RUNS`` runs) whose listing and selection are those of ``shown`` (the
    fingerprint of the last update the page got) only the status line is sent; a shorter
    list is always sent, as its ages ("42 s ago") move on.
    """
    now = time.time() if now is None else now
    status = f"updated {time.strftime('%H:%M:%S', time.localtime(now))}"
    listing = cache.run_list()
    present = {e.run_id for e in listing.entries if e.summary is not None}
    selected = [s for s in _as_list(selected) if isinstance(s, str)]
    value: list[str] | None = None
    if not ready and present:
        value, ready = default_selection(listing), True
    elif any(s not in present for s in selected):
        value = [s for s in selected if s in present]
    plotted = set(value if value is not None else selected) & present
    n = len(listing.entries)
    fingerprint = None
    if n >= TABLE_MIN_RUNS:
        # Everything a sweep's update shows follows from these; its options are empty.
        fingerprint = _digest([listing.version, sorted(plotted), ready])
        if fingerprint == shown and value is None:
            return RunListUpdate(None, None, None, None, None, None, status, None, fingerprint)
    colours = run_colours([e.run_id for e in listing.entries])
    options, hint = [], ""
    if n < TABLE_MIN_RUNS:
        options = [
            run_option(e, colours[e.run_id] if e.run_id in plotted else None, now)
            for e in listing.entries
        ]
    else:  # a sweep: the checklist keeps the selection, the run table shows the runs
        hint = f"{len(plotted):,} of {n:,} runs plotted: tick them in the run table."
    errors = [
        error_card("Cannot read run", e.run_id, e.error or "") for e in listing.entries if e.error
    ]
    if listing.error:
        errors.insert(0, error_card("Cannot read the log directory", None, listing.error))
    count = f"({n})" if n else "(none yet: waiting for runs to appear)"
    return RunListUpdate(
        options, value, ready, banners(listing.entries), errors, count, status, hint, fingerprint
    )


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------
# Run table (sweeps)
# ---------------------------------------------------------------------------------------


@dataclass
class RunTableUpdate:
    """The run table's outputs; None leaves one as the page shows it."""

    columns: list[dict[str, Any]] | None
    rows: list[dict[str, Any]] | dash.Patch  # all rows, or the rows that changed
    hidden: bool | None
    fingerprint: str


def run_table_update(cache: RunCache, fingerprint: str | None) -> RunTableUpdate | None:
    """The run table for the runs now listed, or None when the browser already shows it
    (``fingerprint`` is the version of the listing it was made from), so an unchanged
    sweep costs a poll one string comparison, not 1,000 rows built and sent. A page that
    shows the listing before this one gets the changed rows only, as a ``dash.Patch``.
    The listing is the run list's, cached."""
    listing = cache.run_list()
    if listing.version == fingerprint:
        return None
    columns, rows = run_table(listing.entries)
    before = cache.listing_before(fingerprint)
    if before is not None and [e.run_id for e in before.entries] == [
        e.run_id for e in listing.entries
    ]:
        # The page shows the listing before this one: the same runs, some re-read (a
        # growing run in a 1,000-run sweep). Send their rows alone; unchanged entries are
        # the same objects, and equal configs give the same columns.
        changed = [
            i
            for i, (old, new) in enumerate(zip(before.entries, listing.entries, strict=True))
            if old is not new
        ]
        if all(before.entries[i].config == listing.entries[i].config for i in changed):
            patch = dash.Patch()
            for i in changed:
                patch[i] = rows[i]
            return RunTableUpdate(None, patch, None, listing.version)
    hidden = len(listing.entries) < TABLE_MIN_RUNS
    return RunTableUpdate(columns, rows, hidden, listing.version)


def table_selection_update(
    from_table: bool, ticked: Any, selected: Any, rows: Any
) -> tuple[list[str] | None, list[int] | None]:
    """Keep the table's ticks and the run list's selection (the one source of truth) equal.

    Returns (the run list's new value, the table's new ``selected_rows``), None for
    "unchanged". Ticks in the table replace the selection; a selection changed elsewhere
    (the first default one, a vanished run) or new table rows re-tick the table.
    """
    ids = [r.get("id") for r in _as_list(rows) if isinstance(r, dict)]
    current = sorted(s for s in _as_list(selected) if isinstance(s, str))
    if from_table:
        value = sorted(t for t in _as_list(ticked) if t in ids)
        return (None if value == current else value), None
    wanted = set(current)
    return None, [i for i, run_id in enumerate(ids) if run_id in wanted]


# ---------------------------------------------------------------------------------------
# Metric panels
# ---------------------------------------------------------------------------------------


@dataclass
class PanelUpdate:
    figure: dict[str, Any] | None  # a full figure, or None
    extend: list | None  # extendData, or None
    state: dict[str, Any] | None  # the client's new panel state, or None if unchanged
    errors: list | None = None  # error cards, or None if unchanged
    events: Any = None  # the events table, or None if unchanged
    rebuilt: bool = field(default=False)


def load_views(
    cache: RunCache, run_ids: Sequence[Any] | None
) -> tuple[list[RunView], list[tuple[str, str]]]:
    """Views of the requested runs, and (id, message) for each one that cannot be read."""
    views, problems = [], []
    for run_id in _as_list(run_ids):
        try:
            views.append(cache.view(run_id))
        except InvalidRunIdError as error:
            problems.append((str(run_id)[:80], str(error)))
        except Exception as error:  # any unreadable file becomes a card, not a crash
            problems.append((str(run_id), str(error) or type(error).__name__))
    return views, problems


def _as_list(values: Any) -> list:
    """The distinct non-None items of what the browser sent as a list (anything goes)."""
    if values is None:
        return []
    if isinstance(values, str) or not isinstance(values, Sequence):
        values = [values]
    unique: list = []
    for value in values:  # not a set: the browser can send unhashable junk
        if value is not None and value not in unique:
            unique.append(value)
    return unique


def panels_update(
    cache: RunCache, selected: Sequence[Any] | None, state: dict[str, Any] | None, max_points: int
) -> PanelUpdate:
    """The panels for the selected runs: a rebuilt figure, or extendData with new rows."""
    views, problems = load_views(cache, selected)
    views.sort(key=lambda v: v.run_id)
    listed = [e.run_id for e in cache.run_list().entries]
    colours = run_colours(listed + [v.run_id for v in views])  # a run too new to be listed
    signature = [[run_signature(v, colours[v.run_id]) for v in views], problems, max_points]
    if isinstance(state, dict) and state.get("signature") == signature:
        try:
            update = _extend(views, state["runs"], signature, max_points)
        except (KeyError, TypeError, ValueError, IndexError):
            update = None  # a state the browser mangled: rebuild from scratch
        if update is not None:
            return update
    figure, trace_map = panels_figure(views, colours, max_points, height=PANELS_HEIGHT)
    for entry in trace_map.values():
        entry["appended"] = 0
    errors = [error_card("Cannot plot run", run_id, message) for run_id, message in problems]
    return PanelUpdate(
        figure,
        None,
        {"signature": signature, "runs": trace_map},
        errors=errors,
        events=events_table(views),
        rebuilt=True,
    )


def _extend(
    views: Sequence[RunView], runs: dict[str, Any], signature: list, max_points: int
) -> PanelUpdate | None:
    """The extendData update, or None when the rebuild rule says rebuild."""
    allowance = max(1, max_points // 4)
    for view in views:
        # Checked before the extension is built: a long run growing fast rebuilds each poll.
        new = len(view.rows_after(runs[view.run_id]["last"]))
        if len(view.metrics) > max_points and runs[view.run_id]["appended"] + new > allowance:
            return None
    try:
        extend, appended = panels_extension(views, runs)
    except NeedsRebuildError:
        return None
    if extend is None:
        return PanelUpdate(None, None, None)
    for view in views:
        entry = runs[view.run_id]
        entry["appended"] = int(entry["appended"]) + appended[view.run_id]
        entry["last"] = view.last_step
    return PanelUpdate(None, extend, {"signature": signature, "runs": runs})


# ---------------------------------------------------------------------------------------
# Embedding view
# ---------------------------------------------------------------------------------------


@dataclass
class EmbeddingControls:
    options: list[dict[str, Any]]
    run: str | None
    steps: list[int]
    slider_max: int
    marks: dict[int, str]
    index: int


def slider_marks(steps: Sequence[int], limit: int = MAX_SLIDER_MARKS) -> dict[int, str]:
    """At most ``limit`` evenly spread marks, always the first and last snapshot."""
    if not steps:
        return {}
    last = len(steps) - 1
    stride = max(1, math.ceil(last / max(1, limit - 1)))
    picks = list(range(0, last + 1, stride))
    # The last snapshot always gets a mark; it replaces a regular one that sits too close.
    if picks[-1] != last:
        if last - picks[-1] < stride / 2 and len(picks) > 1:
            picks.pop()
        picks.append(last)
    return {i: f"{steps[i]:,}" for i in picks}


def embedding_controls_update(
    cache: RunCache,
    selected: Sequence[Any] | None,
    current_run: str | None,
    current_index: int | None,
    current_steps: Sequence[int] | None,
) -> EmbeddingControls | None:
    """Which runs offer snapshots and the slider over the chosen run's snapshot steps.

    Returns None when nothing changed. A new run starts on its latest snapshot; a slider
    resting on the latest snapshot follows new ones as they arrive.
    """
    views, _ = load_views(cache, selected)
    views = sorted((v for v in views if v.snapshot_steps), key=lambda v: v.run_id)
    options = [{"label": v.name, "value": v.run_id} for v in views]
    by_id = {v.run_id: v for v in views}
    # Show a collapsed run first if there is one: that is the picture worth seeing.
    collapsed = [v for v in views if v.spans() and v.spans()[-1].end is None]
    default = (collapsed or views)[0].run_id if views else None
    run = current_run if current_run in by_id else default
    steps = list(by_id[run].snapshot_steps) if run else []
    old = list(current_steps or [])
    if run == current_run and steps == old:
        return None
    if run != current_run or current_index is None or current_index >= len(old) - 1:
        index = max(0, len(steps) - 1)
    else:
        index = min(int(current_index), max(0, len(steps) - 1))
    return EmbeddingControls(
        options, run, steps, max(0, len(steps) - 1), slider_marks(steps), index
    )


def embedding_update(
    cache: RunCache,
    run_id: str | None,
    index: int | None,
    steps: Sequence[int] | None,
    method: str | None,
) -> tuple[dict[str, Any], str, list]:
    """The scatter and caption for snapshot ``steps[index]`` of ``run_id``."""
    if not run_id or not steps:
        return embedding_figure(None), "", []
    try:
        step = int(steps[min(max(int(index or 0), 0), len(steps) - 1)])
        projection = cache.projection(run_id, step, method or "pca")
        name = cache.view(run_id).name
    except Exception as error:  # a bad id, a vanished snapshot or a broken file
        message = str(error) or type(error).__name__
        return embedding_figure(None), "", [error_card("Cannot show embeddings", run_id, message)]
    return embedding_figure(projection, name), embedding_caption(projection), []


# ---------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------


def _or_no_update(value: Any) -> Any:
    return dash.no_update if value is None else value


def register_callbacks(app: dash.Dash, cache: RunCache, max_points: int) -> None:
    """Attach the dashboard's callbacks to ``app``."""

    @app.callback(
        Output(ID.RUN_LIST, "options"),
        Output(ID.RUN_LIST, "value"),
        Output(ID.SELECTION_READY, "data"),
        Output(ID.BANNERS, "children"),
        Output(ID.ERRORS, "children"),
        Output(ID.RUN_COUNT, "children"),
        Output(ID.STATUS, "children"),
        Output(ID.RUN_HINT, "children"),
        Output(ID.LIST_FINGERPRINT, "data"),
        Input(ID.INTERVAL, "n_intervals"),
        Input(ID.RUN_LIST, "value"),
        State(ID.SELECTION_READY, "data"),
        State(ID.LIST_FINGERPRINT, "data"),
    )
    def _run_list(_n: int, selected: list[str] | None, ready: bool, shown: str | None) -> tuple:
        u = run_list_update(cache, selected, bool(ready), shown=shown)
        shown_now = (u.options, u.value, u.ready, u.banners, u.errors, u.count, u.status, u.hint)
        return (*map(_or_no_update, shown_now), u.fingerprint)

    @app.callback(
        Output(ID.RUN_TABLE, "columns"),
        Output(ID.RUN_TABLE, "data"),
        Output(ID.TABLE_SECTION, "hidden"),
        Output(ID.TABLE_FINGERPRINT, "data"),
        Input(ID.INTERVAL, "n_intervals"),
        State(ID.TABLE_FINGERPRINT, "data"),
    )
    def _run_table(_n: int, fingerprint: str | None) -> tuple:
        u = run_table_update(cache, fingerprint)
        if u is None:
            return (dash.no_update,) * 4
        return _or_no_update(u.columns), u.rows, _or_no_update(u.hidden), u.fingerprint

    # The run list's value stays the one selection; this callback alone writes both ways.
    # Its inputs are not outputs of a callback that reads the value, so there is no cycle.
    @app.callback(
        Output(ID.RUN_LIST, "value", allow_duplicate=True),
        Output(ID.RUN_TABLE, "selected_rows"),
        Input(ID.RUN_TABLE, "selected_row_ids"),
        Input(ID.RUN_LIST, "value"),
        Input(ID.RUN_TABLE, "data"),
        prevent_initial_call=True,
    )
    def _table_selection(ticked: list | None, selected: list | None, rows: list | None) -> tuple:
        from_table = f"{ID.RUN_TABLE}.selected_row_ids" in dash.ctx.triggered_prop_ids
        value, ticks = table_selection_update(from_table, ticked, selected, rows)
        return _or_no_update(value), _or_no_update(ticks)

    @app.callback(
        Output(ID.PANELS, "figure"),
        Output(ID.PANELS, "extendData"),
        Output(ID.PANEL_STATE, "data"),
        Output(ID.PANEL_ERRORS, "children"),
        Output(ID.EVENTS, "children"),
        Input(ID.RUN_LIST, "value"),
        Input(ID.INTERVAL, "n_intervals"),
        State(ID.PANEL_STATE, "data"),
    )
    def _panels(selected: list[str] | None, _n: int, state: dict | None) -> tuple:
        u = panels_update(cache, selected, state, max_points)
        return tuple(map(_or_no_update, (u.figure, u.extend, u.state, u.errors, u.events)))

    @app.callback(
        Output(ID.EMBED_RUN, "options"),
        Output(ID.EMBED_RUN, "value"),
        Output(ID.EMBED_STEPS, "data"),
        Output(ID.EMBED_SLIDER, "max"),
        Output(ID.EMBED_SLIDER, "marks"),
        Output(ID.EMBED_SLIDER, "value"),
        Input(ID.RUN_LIST, "value"),
        Input(ID.INTERVAL, "n_intervals"),
        Input(ID.EMBED_RUN, "value"),
        State(ID.EMBED_SLIDER, "value"),
        State(ID.EMBED_STEPS, "data"),
    )
    def _embedding_controls(
        selected: list[str] | None, _n: int, run: str | None, index: int | None, steps: list
    ) -> tuple:
        u = embedding_controls_update(cache, selected, run, index, steps)
        if u is None:
            return (dash.no_update,) * 6
        return u.options, u.run, u.steps, u.slider_max, u.marks, u.index

    @app.callback(
        Output(ID.EMBED_GRAPH, "figure"),
        Output(ID.EMBED_CAPTION, "children"),
        Output(ID.EMBED_ERRORS, "children"),
        Input(ID.EMBED_RUN, "value"),
        Input(ID.EMBED_SLIDER, "value"),
        Input(ID.EMBED_STEPS, "data"),
        Input(ID.EMBED_METHOD, "value"),
    )
    def _embedding(run: str | None, index: int | None, steps: list, method: str) -> tuple:
        return embedding_update(cache, run, index, steps, method)
