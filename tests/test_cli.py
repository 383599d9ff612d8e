"""The command line as a person meets it: help with defaults, one-line errors that name the
next command, output that survives a closed pipe and odd run names, counts that say what
they count, and the commands the demo prints working as printed."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from collapsewatch import cli
from tests.dashboard.runs import write_run

SCRIPT = Path(sysconfig.get_path("scripts")) / "collapsewatch"


def _cli(*argv: str, cwd: Path | None = None, **options) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *argv], capture_output=True, text=True, cwd=cwd, timeout=300, **options
    )


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_help_shows_every_default(name: str) -> None:
    command = _subcommands()[name]
    text = " ".join(command.format_help().split())  # unwrap argparse's line breaks
    with_defaults = [
        a
        for a in command._actions
        if a.option_strings and a.default not in (None, False, [], argparse.SUPPRESS)
    ]
    for action in with_defaults:
        assert f"(default: {action.default})" in text, (name, action.dest)
    assert "(default: False)" not in text and "(default: [])" not in text


def test_demo_help_names_the_defaults_a_newcomer_asks_about() -> None:
    text = " ".join(_subcommands()["demo"].format_help().split())
    for default in ("(default: 600)", "(default: runs/demo)", "(default: 8050)"):
        assert default in text


@pytest.mark.parametrize("command", ["analyze", "compare", "report", "export"])
def test_a_directory_given_as_a_run_points_to_the_runs_command(tmp_path, command) -> None:
    write_run(tmp_path, "a", steps=5)
    argv = [command, str(tmp_path)] + (["--to", "csv", "out.csv"] if command == "export" else [])
    result = _cli(*argv)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "is a directory" in lines[0]
    # The command it suggests works as printed.
    suggested = lines[0].split("list its runs with: ")[1]
    listed = subprocess.run(shlex.split(suggested), capture_output=True, text=True, check=True)
    assert "a" in listed.stdout


def test_a_missing_run_file_points_to_the_runs_of_its_directory(tmp_path) -> None:
    write_run(tmp_path, "present", steps=5)
    result = _cli("analyze", str(tmp_path / "absent.cwrun"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no such run file" in result.stderr
    suggested = result.stderr.strip().split("log directory with: ")[1]
    listed = subprocess.run(shlex.split(suggested), capture_output=True, text=True, check=True)
    assert "present" in listed.stdout


def test_report_without_output_writes_beside_the_run_and_says_where(tmp_path) -> None:
    path = write_run(tmp_path / "runs", "beside", steps=10)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = _cli("report", str(path), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    written = path.with_suffix(".html")
    assert written.is_file() and not list(elsewhere.iterdir())
    assert " ".join(result.stdout.split()).endswith(f"report written to {written.resolve()}")


def test_a_closed_pipe_ends_quietly_with_sigpipes_status(tmp_path) -> None:
    # Well over a pipe's 64 KiB buffer, so the writer is still writing when head leaves.
    runs = [str(write_run(tmp_path, "one", steps=5))] * 300
    pipeline = f"{shlex.quote(str(SCRIPT))} compare --json {' '.join(runs)} | head -c 10"
    result = subprocess.run(
        ["bash", "-c", f'{pipeline}; echo "${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout == "[\n  {\n    "  # the first 10 characters
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "141"


def test_run_names_with_rich_markup_print_as_written(tmp_path, capsys) -> None:
    path = write_run(tmp_path, "[red]odd name", steps=5)
    assert cli.main(["runs", str(tmp_path)]) == 0
    assert "[red]odd name" in capsys.readouterr().out
    assert cli.main(["analyze", str(path)]) == 0
    assert "[red]odd name" in capsys.readouterr().out
    assert cli.main(["compare", str(path)]) == 0
    assert "[red]odd name" in capsys.readouterr().out


def test_recorded_steps_and_the_last_step_are_kept_apart(tmp_path, capsys) -> None:
    # Recorded every 4th step of 80: 20 rows, last step 76.
    path = write_run(tmp_path, "sparse", steps=range(0, 80, 4))
    assert cli.main(["runs", str(tmp_path), "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["recorded_steps"], listed["last_step"]) == (20, 76)
    assert cli.main(["compare", str(path), "--json"]) == 0
    [compared] = json.loads(capsys.readouterr().out)
    assert (compared["recorded_steps"], compared["last_step"]) == (20, 76)
    assert cli.main(["analyze", str(path), "--json"]) == 0
    analysed = json.loads(capsys.readouterr().out)
    assert (analysed["recorded_steps"], analysed["last_step"]) == (20, 76)
    assert cli.main(["analyze", str(path)]) == 0
    assert "after 20 recorded steps (last step 76" in capsys.readouterr().out


def test_the_existing_run_message_counts_recorded_steps_and_the_last_step(tmp_path) -> None:
    import torch

    import collapsewatch as cw

    write_run(tmp_path, "taken", steps=range(0, 80, 4))
    with pytest.raises(FileExistsError, match=r"20 recorded steps up to step 76, finished"):
        cw.watch(torch.nn.Linear(2, 2), torch.nn.TripletMarginLoss(), logdir=tmp_path, run="taken")


def test_the_command_name_is_spelled_so_it_works_from_here(tmp_path, monkeypatch) -> None:
    from collapsewatch import command

    monkeypatch.chdir(SCRIPT.parent.parent)
    monkeypatch.setattr(sys, "argv", [os.path.join(SCRIPT.parent.name, "collapsewatch")])
    monkeypatch.setenv("PATH", str(tmp_path))  # not on PATH: its path from here
    assert command.command_name() == f"{SCRIPT.parent.name}/collapsewatch"
    monkeypatch.setenv("PATH", str(SCRIPT.parent))  # on PATH: its name
    assert command.command_name() == "collapsewatch"
    # From a training script (watch(dashboard=...)): this environment's script.
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert command.command_name() == "collapsewatch"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert command.command_name() == f"{SCRIPT.parent.name}/collapsewatch"
    monkeypatch.chdir(tmp_path)  # far from it: its absolute path
    assert command.command_name() == str(SCRIPT)
    # No script installed at all: this interpreter runs the module.
    monkeypatch.setattr(command.sysconfig, "get_path", lambda name: str(tmp_path))
    assert command.command_name() == f"{shlex.quote(sys.executable)} -m collapsewatch"


@pytest.mark.slow
def test_every_command_the_demo_prints_works_as_printed(tmp_path) -> None:
    # As `make demo` runs it: the venv's script by its relative path, the venv not active.
    venv = SCRIPT.parent.parent
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    demo = ["--steps", "40", "--logdir", str(tmp_path / "demo")]
    result = subprocess.run(
        [f"{SCRIPT.parent.name}/collapsewatch", "demo", "--no-serve", "--no-progress", *demo],
        capture_output=True,
        text=True,
        cwd=venv,
        env=env,
        timeout=600,
        check=True,
    )
    printed = result.stdout[result.stdout.index("inspect them with:") :].splitlines()[1:]
    commands = [line.strip() for line in printed if line.strip()]
    assert [shlex.split(c)[1] for c in commands] == ["analyze", "analyze", "compare"]
    for command in commands:
        ran = subprocess.run(
            shlex.split(command), capture_output=True, text=True, cwd=venv, env=env, timeout=300
        )
        assert ran.returncode == 0, (command, ran.stderr)
        assert "batch-hard" in ran.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dashboard", "{dir}", "--port", "99999"], "a port must be from 1 to 65535, got 99999"),
        (["dashboard", "{dir}", "--port", "-1"], "a port must be from 1 to 65535, got -1"),
        (["dashboard", "{dir}", "--interval", "0"], "the interval must be at least 100, got 0"),
        (["demo", "--steps", "0"], "steps must be at least 1, got 0"),
        (["demo", "--port", "http"], "a port must be an integer, got 'http'"),
        (["report", "{run}", "-o", "{file}/r.html"], "cannot write '{file}/r.html'"),
        (["export", "{run}", "--to", "csv", "{file}/x.csv"], "cannot write '{file}/x.csv'"),
    ],
)
def test_bad_options_and_unwritable_outputs_are_one_line_errors(tmp_path, argv, message) -> None:
    run = write_run(tmp_path, "run", steps=5)
    a_file = tmp_path / "a-file"  # a regular file: nothing can be written under it
    a_file.write_text("")
    fill = {"dir": str(tmp_path), "run": str(run), "file": str(a_file)}
    result = _cli(*(part.format(**fill) for part in argv))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message.format(**fill) in result.stderr.strip().splitlines()[-1]
