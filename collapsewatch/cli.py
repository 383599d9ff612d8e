"""The ``collapsewatch`` command line: analyze, report, compare, runs, dashboard, demo, export.

Exit status: 0 on success (whatever the verdict), 1 for ``analyze --fail-on-collapse`` on a
run collapsed or diverged at its end, 2 for bad arguments, missing paths or files that are
not runs (one line on stderr, with the command to try next), 141 when the reader of the
output went away (``… | head``), as for other Unix tools killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from collapsewatch._version import __version__
from collapsewatch.columns import format_number
from collapsewatch.command import command_name
from collapsewatch.detect import Verdict, analyze
from collapsewatch.states import RunState, display_state
from collapsewatch.store import (
    Run,
    RunFileError,
    RunReader,
    iter_readable_runs,
    json_safe,
    load_run,
)

STATE_STYLE: dict[str, str] = {  # keyed by RunState, looked up by state strings
    RunState.HEALTHY: "green",
    RunState.WARNING: "yellow",
    RunState.COLLAPSED: "bold red",
    RunState.DIVERGED: "bold magenta",
    RunState.RECOVERED: "cyan",
    RunState.EMPTY: "dim",
}
FINAL_COLUMNS = (
    "loss_margin_ratio",
    "mean_pairwise_distance",
    "embedding_variance",
    "frac_hard",
    "effective_rank",
)


class CommandError(Exception):
    """A problem to report in one line with exit status 2."""


def _check_run_path(path: str) -> None:
    """Name the next command to try when ``path`` cannot be a run file."""
    where = Path(path)
    if where.is_dir():
        raise CommandError(
            f"{path!r} is a directory, not a run file; list its runs with: "
            f"{command_name()} runs {shlex.quote(path)}"
        )
    if not where.exists():
        folder = str(where.parent)
        raise CommandError(
            f"no such run file {path!r}; list the runs of a log directory with: "
            f"{command_name()} runs {shlex.quote(folder)}"
        )


def _load(path: str) -> Run:
    _check_run_path(path)
    try:
        return load_run(path)
    except RunFileError as error:
        raise CommandError(str(error)) from None


def final_metrics(metrics: pd.DataFrame) -> dict[str, float | None]:
    """The last recorded value of each summary column (skipping NaN, e.g. effective_rank)."""
    values: dict[str, float | None] = {}
    for column in FINAL_COLUMNS:
        series = metrics[column].dropna() if column in metrics else pd.Series(dtype=float)
        values[column] = float(series.iloc[-1]) if len(series) else None
    return values


def _state(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{escape(state)}[/]"


def _cannot_write(path: Path, error: OSError) -> str:
    return f"cannot write {str(path)!r}: {error.strerror or error}"


def _step(step: int | None) -> str:
    return "–" if step is None else str(step)


def _json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, allow_nan=False, default=str))


def summary(run: Run, verdict: Verdict) -> dict[str, Any]:
    """The JSON object that ``analyze --json`` prints for a run."""
    return {
        "run": run.name,
        "path": str(run.path),
        "status": run.metadata.get("status"),
        "recorded_steps": len(run.metrics),
        "margin": run.metadata.get("margin"),
        **verdict.as_dict(),
        "final": final_metrics(run.metrics),
    }


def cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    run = _load(args.run)
    verdict = analyze(run)
    if args.json:
        _json(json_safe(summary(run, verdict)))
    else:
        console.print(f"[bold]{escape(run.name)}[/]  {escape(str(run.path))}")
        console.print(
            f"state {_state(verdict.display_state)} after {len(run.metrics)} recorded steps "
            f"(last step {verdict.last_step}, status {escape(str(run.metadata.get('status')))})"
        )
        if verdict.collapsed:
            recovered = (
                f", recovered at step {verdict.recovered_step}" if verdict.recovered_step else ""
            )
            console.print(f"[bold red]collapsed[/] at step {verdict.onset_step}{recovered}")
        else:
            console.print("no collapse detected")
        if verdict.diverged_step is not None:
            console.print(f"[bold magenta]diverged[/] at step {verdict.diverged_step}")
        if verdict.events:
            table = Table("step", "event", "state", "what happened", title="events")
            for event in verdict.events:
                table.add_row(
                    str(event.step), escape(event.kind), _state(event.state), escape(event.message)
                )
            console.print(table)
        suggestions = dict.fromkeys(e.suggestion for e in verdict.events if e.suggestion)
        for suggestion in suggestions:
            console.print(f"[bold]advice:[/] {escape(suggestion)}")
    return 1 if args.fail_on_collapse and verdict.failed_at_end else 0


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    rows: list[dict[str, Any]] = []
    for path in args.runs:
        run = _load(path)
        verdict = analyze(run)
        rows.append(
            {
                "run": run.name,
                "path": str(run.path),
                "state": verdict.display_state.value,
                "collapsed": verdict.collapsed,
                "onset_step": verdict.onset_step,
                "recovered_step": verdict.recovered_step,
                "recorded_steps": len(run.metrics),
                "last_step": verdict.last_step,
                "margin": run.metadata.get("margin"),
                **final_metrics(run.metrics),
            }
        )
    if args.json:
        _json(json_safe(rows))
        return 0
    table = Table(title="runs compared (final recorded values)")
    for column in (
        "run",
        "state",
        "onset",
        "recovered",
        "recorded",
        "last step",
        "loss/margin",
        "mean dist",
        "variance",
        "frac hard",
        "eff. rank",
    ):
        table.add_column(column, justify="left" if column in ("run", "state") else "right")
    for row in rows:
        table.add_row(
            escape(row["run"]),
            _state(row["state"]),
            _step(row["onset_step"]),
            _step(row["recovered_step"]),
            str(row["recorded_steps"]),
            _step(row["last_step"]),
            format_number(row["loss_margin_ratio"]),
            format_number(row["mean_pairwise_distance"]),
            format_number(row["embedding_variance"]),
            format_number(row["frac_hard"], 3),
            format_number(row["effective_rank"], 3),
        )
    console.print(table)
    return 0


def cmd_runs(args: argparse.Namespace, console: Console) -> int:
    try:
        entries = list(iter_readable_runs(args.logdir))
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    rows: list[dict[str, Any]] = []
    for path, reader in entries:
        if isinstance(reader, RunFileError):
            rows.append({"run": path.name, "path": str(path), "error": str(reader)})
            continue
        with reader:
            try:
                s = reader.summary()
            except RunFileError as error:
                rows.append({"run": path.name, "path": str(path), "error": str(error)})
                continue
        state = display_state(s.state, s.ever_collapsed).value
        rows.append(
            {
                "run": s.name,
                "path": str(path),
                "state": state,
                "status": s.status,
                "recorded_steps": s.recorded_steps,
                "last_step": s.last_step,
                "loss": s.last_loss,
                "margin": s.margin,
                "last_update": s.last_time,
            }
        )
    if args.json:
        _json(json_safe(rows))
        return 0
    if not rows:
        console.print(f"no runs in {escape(args.logdir)}")
        return 0
    table = Table(
        "run",
        "state",
        "status",
        "recorded",
        "last step",
        "loss",
        "margin",
        "last update",
        title=f"runs in {escape(args.logdir)}",
    )
    for row in rows:
        if "error" in row:
            table.add_row(
                escape(row["run"]), "[red]unreadable[/]", escape(row["error"]), "", "", "", "", ""
            )
            continue
        updated = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["last_update"]))
            if row["last_update"]
            else "–"
        )
        table.add_row(
            escape(row["run"]),
            _state(row["state"]),
            escape(str(row["status"])),
            str(row["recorded_steps"]),
            _step(row["last_step"]),
            format_number(row["loss"]),
            format_number(row["margin"]),
            updated,
        )
    console.print(table)
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from collapsewatch import trackers

    _check_run_path(args.run)
    try:
        if args.to == "tensorboard":
            trackers.require("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            # The writer is ours here, so it is closed; a live log_to writer is only flushed.
            with SummaryWriter(args.output) as writer:
                trackers.replay(args.run, [trackers.TensorBoardSink(writer)])
        else:
            with RunReader(args.run) as reader:
                metrics = reader.metrics()
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            if args.to == "csv":
                metrics.to_csv(args.output, index=False)
            else:
                trackers.require("pyarrow", "parquet")
                metrics.to_parquet(args.output, index=False)
    except (RunFileError, ImportError) as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        raise CommandError(_cannot_write(Path(args.output), error)) from None
    console.print(f"{escape(args.run)} exported to {args.to}: {escape(str(args.output))}")
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from collapsewatch.dashboard.report import write_report

    if len(args.runs) > 1 and not args.output:
        raise CommandError("a report of several runs needs -o FILE.html (where to write it)")
    runs = [_load(path) for path in args.runs]
    output = Path(args.output) if args.output else Path(args.runs[0]).with_suffix(".html")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_report(runs, [analyze(run) for run in runs], output)
    except ValueError as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        raise CommandError(_cannot_write(output, error)) from None
    console.print(f"report written to {escape(str(output.resolve()))}", soft_wrap=True)
    return 0


def cmd_dashboard(args: argparse.Namespace, console: Console) -> int:
    if not Path(args.logdir).is_dir():
        raise CommandError(f"log directory {args.logdir!r} does not exist")
    from collapsewatch.dashboard import serve
    from collapsewatch.dashboard_process import exit_with

    if args.exit_with is not None:
        exit_with(args.exit_with)
    console.print(f"collapsewatch dashboard: http://{escape(args.host)}:{args.port}")
    serve(
        args.logdir,
        host=args.host,
        port=args.port,
        interval_ms=args.interval,
        allowed_hosts=args.allow_host,
    )
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from collapsewatch.demo import run_demo

    dashboard = None if args.no_serve else args.port
    paths = run_demo(
        steps=args.steps,
        logdir=args.logdir,
        device=args.device,
        dashboard=dashboard,
        progress=not args.no_progress,
        say=console.print,
    )
    table = Table(
        "run",
        "verdict",
        "onset step",
        "final loss/margin",
        "final mean distance",
        title="demo verdicts",
    )
    for path in paths:
        run = _load(str(path))
        verdict = analyze(run)
        final = final_metrics(run.metrics)
        table.add_row(
            escape(run.name),
            _state(verdict.display_state.value),
            str(verdict.onset_step if verdict.onset_step is not None else "–"),
            format_number(final["loss_margin_ratio"]),
            format_number(final["mean_pairwise_distance"]),
        )
    console.print(table)
    command = command_name()
    console.print(f"runs saved in {escape(args.logdir)}; inspect them with:")
    for path in paths:
        # soft_wrap: a long path must not be broken into a command that no longer runs.
        console.print(
            f"  {escape(command)} analyze {escape(shlex.quote(str(path)))}", soft_wrap=True
        )
    every_run = " ".join(shlex.quote(str(path)) for path in paths)
    console.print(f"  {escape(command)} compare {escape(every_run)}", soft_wrap=True)
    if dashboard is not None:
        console.print(f"dashboard still serving at http://127.0.0.1:{args.port} — Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def _bounded(name: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], else a usage error naming the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{name} must be {bounds}, got {value}")
        return value

    return parse


PORT = _bounded("a port", 1, 65535)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help with each option's default, for options that have a meaningful one
    (not flags, not empty lists)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collapsewatch",
        description="Analyse, report on and watch triplet-loss runs for embedding collapse.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"collapsewatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Every subcommand's help shows its defaults too.
    add_command = functools.partial(commands.add_parser, formatter_class=_HelpFormatter)

    p = add_command("analyze", help="the collapse verdict of one run")
    p.add_argument("run", help="a run file (.cwrun)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--fail-on-collapse",
        action="store_true",
        help="exit with status 1 if the run is collapsed or diverged at its last step",
    )
    p.set_defaults(handler=cmd_analyze)

    p = add_command("report", help="a self-contained HTML report of one run, or several compared")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run files (.cwrun)")
    p.add_argument(
        "-o",
        "--output",
        help="HTML file to write (default for one run: beside it, RUN with .html)",
    )
    p.set_defaults(handler=cmd_report)

    p = add_command("compare", help="final metrics and verdicts of runs side by side")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run files (.cwrun)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(handler=cmd_compare)

    p = add_command("runs", help="the runs in a log directory with their state")
    p.add_argument("logdir", help="a log directory (watch(logdir=...))")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(handler=cmd_runs)

    p = add_command("dashboard", help="serve the live dashboard for a log directory")
    p.add_argument("logdir", help="a log directory (watch(logdir=...))")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=PORT, default=8050, help="port to serve on")
    p.add_argument(
        "--interval",
        type=_bounded("the interval", 100),
        default=2000,
        help="polling interval in ms",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for host NAME (repeatable; '*' for any); by default only "
        "127.0.0.1, localhost and ::1, so web pages cannot read the runs by DNS rebinding",
    )
    p.add_argument(
        "--exit-with",
        type=int,
        metavar="PID",
        help="stop serving when process PID exits (used by watch(dashboard=...))",
    )
    p.set_defaults(handler=cmd_dashboard)

    p = add_command("demo", help="train a collapsing and a healthy run on digits")
    p.add_argument("--steps", type=_bounded("steps", 1), default=600, help="training steps per run")
    p.add_argument("--logdir", default="runs/demo", help="where the two runs are written")
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    p.add_argument("--port", type=PORT, default=8050, help="dashboard port")
    p.add_argument(
        "--no-serve",
        action="store_true",
        help="do not serve the dashboard; print the verdicts and exit",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_demo)

    p = add_command(
        "export", help="write a saved run to TensorBoard (scalars, events, projector) or a table"
    )
    p.add_argument("run", help="a run file (.cwrun)")
    p.add_argument(
        "--to",
        required=True,
        choices=("tensorboard", "csv", "parquet"),
        help="tensorboard: OUTPUT is a log directory; csv, parquet: the metrics table's file",
    )
    p.add_argument("output", metavar="OUTPUT", help="where to write (see --to)")
    p.set_defaults(handler=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``collapsewatch`` console script."""
    args = build_parser().parse_args(argv)
    # Piped output (logs, CI) gets a wide table instead of rich's 80-column default.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    try:
        status = args.handler(args, console)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except CommandError as error:
        print(f"collapsewatch {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`… | head`): stop quietly, and keep Python's exit-time flush of
        # stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
