"""``collapsewatch report``: one run as a self-contained HTML page that opens offline.

The metric panels and the embedding view are the dashboard's own figures, built through the
dashboard's data layer, so a report and the live dashboard always draw the same thing.
plotly.js is inlined once; the page loads nothing from the network.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import plotly.io as pio

from collapsewatch.detect import Verdict
from collapsewatch.states import RunState
from collapsewatch.store import Run

STATE_COLOURS = {  # Okabe–Ito, always shown together with the state's name
    RunState.HEALTHY: "#009E73",
    RunState.RECOVERED: "#0072B2",
    RunState.WARNING: "#E69F00",
    RunState.COLLAPSED: "#D55E00",
    RunState.DIVERGED: "#CC79A7",
    RunState.EMPTY: "#9AA5B1",
}
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
pre { background: #f5f7fa; padding: 10px; border-radius: 6px; overflow-x: auto; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _e(value)


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
        f'<section class="card verdict" style="--state:{STATE_COLOURS.get(state, "#616e7c")}">',
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


def _events_table(verdict: Verdict) -> str:
    from collapsewatch.dashboard.figures import event_style

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
            rows.append(
                f"<tr><td>{_e(column)}</td><td class='num'>{_number(float(values.iloc[0]))}</td>"
                f"<td class='num'>{_number(float(values.iloc[-1]))}</td></tr>"
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
        f"margin {_number(meta.get('margin'))}",
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


def write_report(run: Run, verdict: Verdict, output: str | Path) -> Path:
    """Write ``run``'s report, with ``verdict`` (from :func:`collapsewatch.analyze`), to
    ``output`` and return its path."""
    from collapsewatch.dashboard.data import RunCache, run_id_of
    from collapsewatch.dashboard.figures import (
        embedding_caption,
        embedding_figure,
        panels_figure,
        register_template,
        run_colours,
    )

    register_template()
    cache = RunCache(run.path.parent)
    run_id = run_id_of(run.path.parent, run.path)
    view = cache.view(run_id)
    # The run's colour in the dashboard: by its place among the runs of its directory.
    colours = run_colours([e.run_id for e in cache.run_list().entries] + [run_id])
    panels, _ = panels_figure([view], colours, max_points=4000, height=PANELS_HEIGHT)
    sections = [_figure_html(panels, first=True, height=PANELS_HEIGHT)]
    snapshots = []
    for step in _snapshot_steps(view.snapshot_steps, verdict):
        projection = cache.projection(run_id, step, "pca")
        snapshots.append(
            f"<div>{_figure_html(embedding_figure(projection, view.name), False, 420)}"
            f'<p class="muted">{_e(embedding_caption(projection))}</p></div>'
        )
    config = json.dumps(run.metadata.get("config", {}), indent=2, sort_keys=True)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>collapsewatch report: {_e(run.name)}</title>
<style>{_CSS}</style></head>
<body><main>
<h1>{_e(run.name)}</h1>
<p class="muted">{_run_facts(run)}<br>{_e(run.path)}</p>
{_verdict_section(verdict)}
<h2>Events</h2>
<section class="card">{_events_table(verdict)}</section>
<h2>Metrics</h2>
<section class="card">
<p class="muted">Shaded: steps the detector flagged as collapsed.</p>
{sections[0]}</section>
<h2>Embeddings</h2>
<section class="card">{
        '<div class="snapshots">' + "".join(snapshots) + "</div>"
        if snapshots
        else '<p class="muted">No embedding snapshots in this run.</p>'
    }</section>
<h2>First and last values</h2>
<section class="card">{_final_table(run)}</section>
<h2>Configuration</h2>
<section class="card"><pre>{_e(config)}</pre></section>
<p class="muted">Generated by collapsewatch {_e(run.metadata.get("collapsewatch_version", ""))}.
</p>
</main></body></html>
"""
    output = Path(output)
    output.write_text(page, encoding="utf-8")
    return output
