"""The README's promises: its first commands, its example, and the demo's verdicts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import collapsewatch as cw
from tests.recorded import assert_recorded

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_make_demo_and_make_test():
    first = README.split("```")[1]
    assert first.startswith("bash\n")
    commands = [line.split("#")[0].strip() for line in first.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]
    assert README.index("```") < README.index("collapsewatch catches")


def test_readme_example_is_short_and_shows_the_collapse():
    """tests/test_docs.py runs it and checks what it prints (its ``# ->`` comment) and the
    commands after it; here: that it stays a 10-line example ending in the verdict."""
    example = code_blocks("python")[0]
    body = [
        line
        for line in example.splitlines()
        if line.strip() and not line.startswith(("import", "from"))
    ]
    assert len(body) <= 12  # "a 10-line example", plus the print
    assert "cw.watch(" in example
    assert body[-1].endswith("# -> collapsed")


@pytest.mark.slow
def test_demo_without_serving_prints_both_verdicts(tmp_path):
    logdir = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "collapsewatch",
            "demo",
            "--no-serve",
            "--no-progress",
            "--steps",
            "120",
            "--logdir",
            str(logdir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "Collapse at step" in result.stdout  # the detector's live warning
    verdicts = {}
    for path in cw.list_runs(logdir):
        run = cw.load_run(path)
        verdicts[run.name] = cw.analyze(run.metrics).state
        assert_recorded(run, 120)
    assert verdicts == {"batch-hard": "collapsed", "batch-hard-scaled": "healthy"}
    table = result.stdout[result.stdout.index("demo verdicts") :]
    assert re.search(r"batch-hard\s.*collapsed", table)
    assert re.search(r"batch-hard-scaled\s.*healthy", table)
