"""After training: load a saved run into pandas, plot it with plotly, ask the detector.

``cw.load_run`` gives the run's metadata and one pandas row of metrics per recorded step;
``cw.analyze`` replays those rows through the same detector that ran live and returns its
verdict. The plot (loss / margin and mean pairwise distance against the step, the collapse
spans shaded) is written as a standalone HTML file that opens offline in any browser.

    python examples/posthoc.py runs/examples/digits-batch-hard-<date-time>.cwrun -o plot.html
    python examples/posthoc.py                 # trains a tiny collapsing digits run first

With no RUN it trains the demo's collapsing setup (plain batch-hard, lr 0.5) for ``--steps``
steps into ``--logdir``, so there is always something to look at.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import collapsewatch as cw

SUMMARY_COLUMNS = [
    "loss",
    "loss_margin_ratio",
    "mean_pairwise_distance",
    "frac_hard",
    "std_of_l2_normalized",
]


def train_demo_run(logdir: str, steps: int) -> Path:
    """A short run of the demo's collapsing setup; returns its path."""
    from collapsewatch.demo import DEMO_RUNS, start_run, train

    trainer = start_run(
        DEMO_RUNS[0],
        logdir=logdir,
        run=f"posthoc-demo-{time.strftime('%Y%m%d-%H%M%S')}",
        on_collapse="ignore",  # this example reads the verdict afterwards instead
    )
    return train(trainer, steps)


def summary(metrics: pd.DataFrame, rows: int = 10) -> str:
    """About ``rows`` evenly spaced steps of the key metrics, as a text table."""
    table = metrics.set_index("step")[SUMMARY_COLUMNS]
    return table.iloc[:: max(1, len(table) // rows)].to_string(float_format="{:.4f}".format)


def figure(run: cw.Run, verdict: cw.Verdict) -> go.Figure:
    """Loss / margin and mean pairwise distance per step; collapse spans shaded red."""
    m = run.metrics
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        subplot_titles=("loss / margin (1 = the collapse plateau)", "mean pairwise distance (log)"),
    )
    fig.add_trace(go.Scatter(x=m.step, y=m.loss_margin_ratio, name="loss / margin"), 1, 1)
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", row=1, col=1)
    fig.add_trace(go.Scatter(x=m.step, y=m.mean_pairwise_distance, name="distance"), 2, 1)
    for onset, end in verdict.collapse_spans:
        # A span still open at the end of the run has no end step: shade to the last step.
        x1 = end if end is not None else m.step.iloc[-1]
        fig.add_vrect(x0=onset, x1=x1, fillcolor="red", opacity=0.15, line_width=0, row="all")
    # Log scale: a collapse takes the distance down by orders of magnitude, not to zero.
    fig.update_yaxes(type="log", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(title=f"{run.name}: {verdict.state}", height=650, showlegend=False)
    return fig


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", type=Path, help="a .cwrun file (default: train one)")
    parser.add_argument("-o", "--output", type=Path, help="HTML file (default: RUN.html)")
    parser.add_argument("--steps", type=int, default=80, help="steps of the demo run (no RUN)")
    parser.add_argument("--logdir", default="runs/examples", help="where the demo run goes")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.run if args.run is not None else train_demo_run(args.logdir, args.steps)

    run = cw.load_run(path)
    meta = run.metadata
    print(
        f"{run.name}: {meta['loss_class']} (margin {meta['margin']}), "
        f"{len(run.metrics)} steps, status {meta['status']}"
    )
    print(summary(run.metrics))

    verdict = cw.analyze(run)
    output = args.output or path.with_suffix(".html")
    figure(run, verdict).write_html(output, include_plotlyjs=True)  # no CDN: works offline
    print(f"plot: {output}")

    spans = ", ".join(f"{a}–{'end' if b is None else b}" for a, b in verdict.collapse_spans)
    print(f"verdict: {verdict.state}" + (f" (collapse spans: steps {spans})" if spans else ""))
    for event in verdict.events:
        print(f"  step {event.step} {event.kind}: {event.message}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
