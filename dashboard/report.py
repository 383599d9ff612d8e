"""``collapsewatch report``: one run, or several side by side, as a self-contained HTML page
that opens offline.

The metric panels and the embedding view are the dashboard's own figures, built through the
dashboard's data layer, so a report and the live dashboard always draw the same thing (and
the dependency runs one way: the report is part of the dashboard package, the core package
never imports it).
plotly.js is inlined once; the page loads nothing from the network.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.io as pio

from collapsewatch.columns import format_number
from collapsewatch.detect import Verdict
from collapsewatch.states import RunState
from collapsewatch.store import Run

from .data import RunCache, run_id_of
from .figures import (
    MUTED,
    STATE_COLOURS,
    embedding_caption,
    embedding_figure,
    event_style,
    panels_figure,
    register_template,
    run_colours,
)

PANELS_HEIGHT = 1100

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2933;
       margin: 0; background: #f5f7fa; }
main { max-width: 1200px; margin: 0 auto; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
.muted { color: #616e7c; } .card { background: #fff; border-radius: 8px; padding: 16px 20px;
       box-shadow: 0 1px 3px rgba(0,0,0,.08); margin-top: 16px; }
.verdict { border-left: 6px solid var(--state); }
.badge { display: inline-block; padding: 2px 10px; border-radius: 12px; color: #fff;
         background: var(--state); font-weight: 600; margin-right: 8px; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left;
        padding: 6px 10px; border-bottom: 1px solid #e4e7eb; vertical-align: top; }
th { font-weight: 600; color: #3e4c59; } td.num { text-align: right;
        font-variant-numeric: tabular-nums; }
.snapshots { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px;
          margin-right: 6px; vertical-align: -1px; }
pre { background: #f5f7fa; padding: 10px; border-radius: 6px; overflow-x: auto; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _state(verdict: Verdict) -> str:
    return verdict.display_state.value


def _headline(verdict: Verdict) -> str:
    if verdict.state == RunState.DIVERGED:
        return f"Diverged at step {verdict.diverged_step} and still diverged at the last step."
    if verdict.collapsed_at_end:
        return f"Collapsed at step {verdict.onset_step} and still collapsed at the last step."
    if verdict.collapsed:
        return (
            f"Collapsed at step {verdict.onset_step}, recovered at step {verdict.recovered_step}."
        )
    if verdict.state == "warning":
        return "No collapse, but a warning is active at the last step."
    return "No collapse detected."


def _verdict_section(verdict: Verdict) -> str:
    state = _state(verdict)
    parts = [
        f'<section class="card verdict" style="--state:{STATE_COLOURS.get(state, MUTED)}">',
        f'<span class="badge">{_e(state)}</span><strong>{_e(_headline(verdict))}</strong>',
    ]
    collapse = next((e for e in verdict.events if e.kind in ("diverged", "collapsed")), None)
    if collapse is not None:
        parts.append(f"<p>{_e(collapse.message)}</p>")
    suggestions = dict.fromkeys(e.suggestion for e in verdict.events if e.suggestion)
    if suggestions:
        parts.append("<p><strong>What to try:</strong></p><ul>")
        parts += [f"<li>{_e(s)}</li>" for s in suggestions]
        parts.append("</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def _verdicts_table(
    runs: Sequence[Run], verdicts: Sequence[Verdict], colours: dict[str, str], ids: list[str]
) -> str:
    """One row per run: its colour in the panels, state, headline and first advice."""
    rows = []
    for run, verdict, run_id in zip(runs, verdicts, ids, strict=True):
        state = _state(verdict)
        advice = next((e.suggestion for e in verdict.events if e.suggestion), "")
        rows.append(
            f'<tr class="verdict" data-run="{_e(run.name)}" '
            f'style="--state:{STATE_COLOURS.get(state, MUTED)}">'
            f"<td><span class='swatch' style='background:{colours[run_id]}'></span>"
            f"{_e(run.name)}</td><td><span class='badge'>{_e(state)}</span></td>"
            f"<td>{_e(_headline(verdict))}</td><td>{_e(advice)}</td></tr>"
        )
    return (
        '<section class="card"><table><tr><th>run</th><th>state</th><th>verdict</th>'
        f"<th>what to try</th></tr>{''.join(rows)}</table></section>"
    )


def _events_table(verdict: Verdict) -> str:
    if not verdict.events:
        return '<p class="muted">The detector recorded no events.</p>'
    rows = "".join(
        # The shape and colour the panels mark this kind of event with.
        f"<tr><td class='num'>{e.step}</td><td><span class='glyph' aria-hidden='true'"
        f" style='color:{event_style(e.kind)[2]}'>{event_style(e.kind)[1]}</span>"
        f" {_e(e.kind.replace('_', ' '))}</td><td>{_e(e.state)}</td>"
        f"<td>{_e(e.message)}</td></tr>"
        for e in verdict.events
    )
    return (
        "<table><tr><th>step</th><th>event</th><th>state after</th><th>what happened</th></tr>"
        f"{rows}</table>"
    )


def _final_table(run: Run) -> str:
    metrics = run.metrics
    if not len(metrics):
        return '<p class="muted">No steps recorded.</p>'
    rows = []
    for column in metrics.columns:
        if column in ("step", "time"):
            continue
        values = metrics[column].dropna()
        if len(values):
            first, last = (format_number(float(v)) for v in (values.iloc[0], values.iloc[-1]))
            rows.append(
                f"<tr><td>{_e(column)}</td><td class='num'>{first}</td>"
                f"<td class='num'>{last}</td></tr>"
            )
    return (
        "<table><tr><th>metric</th><th>first recorded</th><th>last recorded</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _run_facts(run: Run) -> str:
    meta = run.metadata
    created = meta.get("created")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created)) if created else "?"
    steps = len(run.metrics)
    last = int(run.metrics["step"].iloc[-1]) if steps else None
    facts = [
        f"{_e(meta.get('model_class', '?'))} + {_e(meta.get('loss_class', '?'))}",
        f"margin {_e(format_number(meta.get('margin')))}",
        f"{steps} recorded steps (last step {last})",
        f"status {_e(meta.get('status', '?'))}",
        f"started {when}",
        f"world size {_e(meta.get('world_size', 1))}",
    ]
    return " · ".join(facts)


def _snapshot_steps(steps: tuple[int, ...], verdict: Verdict) -> list[int]:
    """The first snapshot, the first one inside the first collapse (if any), the last."""
    if not steps:
        return []
    chosen = [steps[0]]
    if verdict.collapse_spans:
        onset, end = verdict.collapse_spans[0]
        inside = [s for s in steps if s >= onset and (end is None or s < end)]
        chosen += inside[:1]
    chosen.append(steps[-1])
    return list(dict.fromkeys(chosen))


def _figure_html(figure: dict[str, Any], first: bool, height: int) -> str:
    return pio.to_html(
        figure,
        include_plotlyjs=first,  # inline plotly.js once: the report opens offline
        full_html=False,
        default_height=f"{height}px",
        config={"displaylogo": False, "responsive": True},
    )


def write_report(
    runs: Run | Sequence[Run], verdicts: Verdict | Sequence[Verdict], output: str | Path
) -> Path:
    """Write the report of one run, or of several runs overlaid in the same panels, with
    their verdicts (from :func:`collapsewatch.analyze`, one per run) to ``output``; return
    its path. A report of one run also shows its embedding snapshots and configuration."""
    runs = [runs] if isinstance(runs, Run) else list(runs)
    verdicts = [verdicts] if isinstance(verdicts, Verdict) else list(verdicts)
    if not runs or len(runs) != len(verdicts):
        raise ValueError(f"one verdict per run: got {len(runs)} runs, {len(verdicts)} verdicts")
    register_template()
    caches = {folder: RunCache(folder) for folder in dict.fromkeys(r.path.parent for r in runs)}
    run_ids = [run_id_of(run.path.parent, run.path) for run in runs]
    if len(set(run_ids)) < len(run_ids):
        raise ValueError("the runs of one report need distinct names (file names)")
    views = [caches[run.path.parent].view(rid) for run, rid in zip(runs, run_ids, strict=True)]
    # Each run's colour in the dashboard: by its place among the runs of its directory.
    listed = [e.run_id for cache in caches.values() for e in cache.run_list().entries]
    colours = run_colours(listed + run_ids)
    panels, _ = panels_figure(views, colours, max_points=4000, height=PANELS_HEIGHT)
    one = len(runs) == 1
    run, verdict = runs[0], verdicts[0]
    if one:
        title, facts = run.name, f"{_run_facts(run)}<br>{_e(run.path)}"
    else:
        title = f"{len(runs)} runs compared"
        facts = " · ".join(_e(r.name) for r in runs)
    if one:
        verdict_cards = _verdict_section(verdict)
        events = f'<section class="card">{_events_table(verdict)}</section>'
    else:
        # Many runs: one compact table first, so the panels are not pages down.
        verdict_cards = _verdicts_table(runs, verdicts, colours, run_ids)
        events = (
            "".join(
                f'<section class="card"><h3>{_e(r.name)}</h3>{_events_table(v)}</section>'
                for r, v in zip(runs, verdicts, strict=True)
                if v.events
            )
            or '<section class="card"><p class="muted">No run has events.</p></section>'
        )
    if one:
        snapshots = []
        for step in _snapshot_steps(views[0].snapshot_steps, verdict):
            projection = caches[run.path.parent].projection(run_ids[0], step, "pca")
            snapshots.append(
                f"<div>{_figure_html(embedding_figure(projection, views[0].name), False, 420)}"
                f'<p class="muted">{_e(embedding_caption(projection))}</p></div>'
            )
        embeddings = (
            '<div class="snapshots">' + "".join(snapshots) + "</div>"
            if snapshots
            else '<p class="muted">No embedding snapshots in this run.</p>'
        )
        config = json.dumps(run.metadata.get("config", {}), indent=2, sort_keys=True)
        details = (
            f'<h2>Embeddings</h2>\n<section class="card">{embeddings}</section>\n'
            f'<h2>First and last values</h2>\n<section class="card">{_final_table(run)}'
            f'</section>\n<h2>Configuration</h2>\n<section class="card"><pre>{_e(config)}'
            "</pre></section>"
        )
    else:
        details = "<h2>Runs</h2>\n" + "".join(
            f'<section class="card"><h3>{_e(r.name)}</h3><p class="muted">{_run_facts(r)}'
            f"<br>{_e(r.path)}</p><details><summary>first and last values</summary>"
            f"{_final_table(r)}</details></section>"
            for r in runs
        )
    metrics = (
        '<h2>Metrics</h2>\n<section class="card">\n'
        '<p class="muted">Shaded: steps the detector flagged as collapsed.</p>\n'
        f"{_figure_html(panels, first=True, height=PANELS_HEIGHT)}</section>"
    )
    version = run.metadata.get("collapsewatch_version", "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>collapsewatch report: {_e(title)}</title>
<style>{_CSS}</style></head>
<body><main>
<h1>{_e(title)}</h1>
<p class="muted">{facts}</p>
{verdict_cards}
{metrics if not one else ""}
<h2>Events</h2>
{events}
{metrics if one else ""}
{details}
<p class="muted">Generated by collapsewatch {_e(version)}.
</p>
</main></body></html>
"""
    output = Path(output)
    output.write_text(page, encoding="utf-8")
    return output
