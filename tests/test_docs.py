"""Every code block of README.md and docs/*.md, run as written.

The fenced blocks are read with markdown-it (the parser rich depends on). Per file:

- ``python`` blocks run in order in one namespace (a later block may use an earlier one's
  names), in a fresh temporary working directory. A line's ``# -> TEXT`` comment is
  output the block prints: the block's standard output must read the concatenated
  ``# ->`` texts, whitespace-normalised, ``...`` matching anything. A ``text`` block right
  after a python block is what that block shows: a warning (``SomeWarning: message``) it
  must emit, or else its standard output.
- ``bash`` / ``console`` / ``sh`` blocks run after the file's python blocks, one item per
  command line, in that directory. A ``collapsewatch`` command runs as printed, through the
  venv's console script, and must exit 0. ``collapsewatch dashboard`` and ``demo`` serve
  until stopped: their ``--help`` is run instead and must list every option the line uses.
  So must ``python benchmarks/...`` scripts' (a benchmark takes minutes). ``make``, ``pip``
  and other programs are not run: those lines are reported as skipped, with the reason.
  In a ``console`` block the lines after ``$ command`` are its output, checked as above.
- A ``text`` block of ``collapsewatch ...`` lines is a synopsis: it must name every
  subcommand and, per subcommand, exactly the options its ``--help`` lists.
- Every ``"watch(): …"`` message quoted in the prose is one that watch() gives in the case
  it describes (reproduced here with small stand-ins of the classes the docs name).
- ``<!-- docs-test: skip (REASON) -->`` right before a block skips it with that reason
  (python blocks are still compiled). Only for what truly needs a GPU, a network or a
  server that never returns.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from markdown_it import MarkdownIt

import collapsewatch as cw
from collapsewatch import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>.+?)\)\s*-->", re.S)
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "console", "sh", "shell"}
OUTPUT = {"text", "output"}
SERVERS = {"dashboard", "demo"}  # subcommands that serve until stopped
# The optional packages doc blocks import (all in the [test] extra), by top-level module:
# a block needing one that is not installed is skipped, saying what to install.
OPTIONAL = {
    "pytorch_metric_learning": "pytorch-metric-learning",
    "lightning": "lightning",
    "sentence_transformers": "sentence-transformers[train]",
    "transformers": "sentence-transformers[train]",
    "datasets": "sentence-transformers[train]",
    "optuna": "optuna (collapsewatch[optuna])",
    "tensorboard": "tensorboard (collapsewatch[tensorboard])",
    "wandb": "wandb (collapsewatch[wandb])",
    "mlflow": "mlflow (collapsewatch[mlflow])",
}
EXTRAS = {"tensorboard": "tensorboard", "parquet": "pyarrow", "wandb": "wandb", "mlflow": "mlflow"}
NOT_RUN = {
    "make": "a make target sets up the venv and runs the demo, the suite or the benchmarks",
    "pip": "installs packages",
    "tensorboard": "serves until stopped",
}
WARNING_LINE = re.compile(r"^(?P<category>\w*Warning): (?P<message>.*)$", re.S)
EXPECTED_COMMENT = re.compile(r"#\s*->\s?(?P<text>.*)$")
COMMAND_TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text, and a skip reason if marked."""

    path: Path
    line: int  # the opening fence's line, 1-based
    language: str
    source: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def collect(path: Path) -> list[Block]:
    """The fenced code blocks of one Markdown file, in order."""
    blocks: list[Block] = []
    skip = None
    for token in MarkdownIt("commonmark").parse(path.read_text()):
        if token.type == "html_block":
            mark = SKIP_MARK.search(token.content)
            skip = mark.group("reason") if mark else None
            continue
        if token.type == "fence":
            language = token.info.split()[0] if token.info.strip() else ""
            blocks.append(Block(path, token.map[0] + 1, language, token.content, skip))
        skip = None
    return blocks


def normalise(text: str) -> str:
    return " ".join(text.split())


def matches(pattern: str, text: str) -> bool:
    """Whether ``text`` reads ``pattern`` up to whitespace, ``...``/``…`` matching anything."""
    pieces = re.split(r"\.\.\.|…", normalise(pattern))
    regex = ".*?".join(re.escape(piece.strip()) for piece in pieces)
    regex = regex.replace(r"\ ", r"\s+")
    return re.fullmatch(regex, normalise(text), flags=re.S) is not None


def expected_stdout(source: str) -> str | None:
    """The ``# -> TEXT`` comments of a python block, joined; None when it has none."""
    texts = []
    for line in source.splitlines():
        comment = EXPECTED_COMMENT.search(line)
        if comment:
            texts.append(comment.group("text"))
    return " ".join(texts) if texts else None


# ----------------------------------------------------------------------------- per file
@dataclass(frozen=True)
class Result:
    """What a python block did: its output and warnings, and why it failed or was not run."""

    stdout: str = ""
    warnings: tuple[warnings.WarningMessage, ...] = ()
    failure: str | None = None
    not_run: str | None = None  # a skip reason: an optional package missing here


@dataclass
class DocRun:
    """A file's shared namespace and directory, and what its python blocks did so far."""

    path: Path
    blocks: list[Block]
    workdir: Path
    namespace: dict[str, Any] = field(default_factory=dict)
    done: dict[int, Result] = field(default_factory=dict)  # by block index

    def run_python(self, index: int) -> Result:
        """Run python block ``index`` (and every earlier one first), once; its result."""
        skipped_before = None
        for earlier in range(index):
            if self.blocks[earlier].language not in PYTHON:
                continue
            result = self.run_python(earlier)
            where = self.blocks[earlier].where
            if result.failure is not None:
                return Result(failure=f"not run: {where} failed before it")
            if result.not_run is not None:
                skipped_before = f"{where} was not run ({result.not_run})"
        if index not in self.done:
            result = self._execute(self.blocks[index])
            if result.failure is not None and skipped_before is not None:
                # It may need that block's names: a missing package, not a broken doc.
                result = Result(not_run=f"failed after {skipped_before}")
            self.done[index] = result
        return self.done[index]

    def _execute(self, block: Block) -> Result:
        # Padded so that tracebacks give the Markdown file's own line numbers.
        code = compile("\n" * block.line + block.source, str(block.path), "exec")
        if block.skip:
            return Result()
        out = io.StringIO()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with contextlib.redirect_stdout(out):
                    exec(code, self.namespace)
            except BaseException as error:  # a doc block may raise anything
                if isinstance(error, KeyboardInterrupt):
                    raise
                missing = getattr(error, "name", None) or ""
                if isinstance(error, ModuleNotFoundError) and missing.split(".")[0] in OPTIONAL:
                    return Result(not_run=f"needs {OPTIONAL[missing.split('.')[0]]}")
                trace = "".join(traceback.format_exception(error)[-12:])
                return Result(out.getvalue(), tuple(caught), f"{block.where} raised:\n{trace}")
        return Result(out.getvalue(), tuple(caught))


_RUNS: dict[Path, DocRun] = {}


@pytest.fixture
def doc_run(request, tmp_path_factory, monkeypatch) -> Iterator[DocRun]:
    """The DocRun of the item's file, the working directory changed into its folder, the
    venv's bin first on PATH (for the ``collapsewatch`` script), nothing online, and one
    torch thread (two threads on a loaded 2-core machine run the examples 5-40× slower)."""
    block: Block = request.param.block if isinstance(request.param, Command) else request.param
    if block.path not in _RUNS:
        workdir = tmp_path_factory.mktemp(block.path.stem)
        _RUNS[block.path] = DocRun(
            block.path, collect(block.path), workdir, {"__name__": f"docs_{block.path.stem}"}
        )
    run = _RUNS[block.path]
    monkeypatch.chdir(run.workdir)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield run
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ items
def _python_items() -> list[Any]:
    items = []
    for path in DOCS:
        for block in collect(path):
            if block.language in PYTHON:
                marks = [pytest.mark.slow]
                items.append(pytest.param(block, id=f"{block.where} python", marks=marks))
    return items


@dataclass(frozen=True)
class Command:
    """One command line of a shell block, and the output a console block shows for it."""

    block: Block
    line: int
    words: tuple[str, ...]
    shown: str  # the lines after a console block's ``$ command``, up to the next prompt


def _shell_commands(block: Block) -> list[Command]:
    """The commands of a shell block: comments and ``$`` prompts removed, backslash
    continuations joined; in a console block, the lines after a command are its output."""
    commands: list[Command] = []
    pending, shown = "", []
    for offset, raw in enumerate(block.source.splitlines(), start=1):
        line = raw.strip()
        if block.language == "console":
            if not line.startswith("$") and not pending:
                if commands:
                    shown.append(raw)
                continue
            line = line.removeprefix("$").strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if commands:
            commands[-1] = replace(commands[-1], shown="\n".join(shown))
        words = tuple(shlex.split(pending + line, comments=True))
        commands.append(Command(block, block.line + offset, words, ""))
        pending, shown = "", []
    if commands:
        commands[-1] = replace(commands[-1], shown="\n".join(shown))
    return commands


def _shell_items() -> list[Any]:
    return [
        pytest.param(
            command,
            id=f"{block.path.relative_to(ROOT)}:{command.line} {' '.join(command.words)}",
            marks=pytest.mark.slow,
        )
        for path in DOCS
        for block in collect(path)
        if block.language in SHELL
        for command in _shell_commands(block)
    ]


def _synopsis_items() -> list[Any]:
    items = []
    for path in DOCS:
        for block in collect(path):
            if _is_synopsis(block):
                items.append(pytest.param(block, id=f"{block.where} synopsis"))
    return items


def _is_synopsis(block: Block) -> bool:
    return block.language in OUTPUT and block.source.startswith("collapsewatch ")


def _following_output(run: DocRun, block: Block) -> Block | None:
    """The output block shown right after ``block``, if any."""
    index = run.blocks.index(block)
    if index + 1 < len(run.blocks):
        shown = run.blocks[index + 1]
        if shown.language in OUTPUT and not _is_synopsis(shown):
            return shown
    return None


@pytest.mark.parametrize("doc_run", _python_items(), indirect=True)
def test_python_block(doc_run: DocRun, request) -> None:
    block: Block = request.node.callspec.params["doc_run"]
    index = doc_run.blocks.index(block)
    result = doc_run.run_python(index)
    stdout, caught = result.stdout, result.warnings
    if block.skip:
        pytest.skip(f"{block.where}: {block.skip}")
    if result.not_run is not None:
        pytest.skip(f"{block.where}: {result.not_run}")
    if result.failure is not None:
        pytest.fail(result.failure, pytrace=False)
    expected = expected_stdout(block.source)
    if expected is not None and not matches(expected, stdout):
        pytest.fail(
            f"{block.where}: the block's '# ->' comments say it prints\n  {expected}\n"
            f"but it printed\n  {normalise(stdout)}",
            pytrace=False,
        )
    shown = _following_output(doc_run, block)
    if shown is None:
        return
    if WARNING_LINE.match(shown.source.strip()):
        emitted = [f"{w.category.__name__}: {w.message}" for w in caught]
        if not any(matches(shown.source, text) for text in emitted):
            pytest.fail(
                f"{shown.where} quotes a warning that {block.where} does not emit:\n"
                f"  {normalise(shown.source)}\nit emitted:\n  " + "\n  ".join(emitted),
                pytrace=False,
            )
    elif not matches(shown.source, stdout):
        pytest.fail(
            f"{shown.where} shows the output of {block.where}:\n  {normalise(shown.source)}\n"
            f"but it printed\n  {normalise(stdout)}",
            pytrace=False,
        )


def _help(subcommand: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main([subcommand, "--help"])
    return out.getvalue()


def _options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text)) - {"-h", "--help"}


def _usage(help_text: str) -> str:
    return help_text.split("\n\n")[0]


@pytest.mark.parametrize("doc_run", _shell_items(), indirect=True)
def test_shell_command(doc_run: DocRun, request) -> None:
    command: Command = request.node.callspec.params["doc_run"]
    words = list(command.words)
    where = f"{command.block.path.relative_to(ROOT)}:{command.line} `{' '.join(words)}`"
    program = words[0]
    if program in NOT_RUN:
        pytest.skip(f"{where}: not run ({NOT_RUN[program]})")
    if program in {"python", "python3"} and len(words) > 1 and words[1].startswith("benchmarks/"):
        # A benchmark takes minutes: check the line's options against its --help.
        unknown = _used_options(words[2:]) - _options(_script_help(words[1]))
        assert not unknown, f"{where}: {words[1]} --help lists no {sorted(unknown)}"
        return
    if program != "collapsewatch":
        pytest.skip(f"{where}: not run ({program} is not collapsewatch)")
    for index, other in enumerate(doc_run.blocks):  # the file's python blocks first
        if other.language in PYTHON:
            result = doc_run.run_python(index)
            if result.not_run is not None:
                pytest.skip(f"{where}: {result.not_run}")
            if result.failure is not None:
                pytest.fail(f"{where} not run: {result.failure}", pytrace=False)
    executable = shutil.which("collapsewatch")
    assert executable is not None, "no collapsewatch script next to the test's Python"
    if len(words) > 1 and words[1] in SERVERS:
        # Serves until stopped: check the line's options against its --help instead.
        result = _run([executable, words[1], "--help"], cwd=doc_run.workdir)
        assert result.returncode == 0, f"{where}: --help failed:\n{result.stderr}"
        unknown = _used_options(words[2:]) - _options(result.stdout)
        assert not unknown, f"{where}: collapsewatch {words[1]} has no {sorted(unknown)}"
        return
    result = _run([executable, *words[1:]], cwd=doc_run.workdir)
    extra = re.search(r"pip install 'collapsewatch\[(\w+)\]'", result.stderr)
    if result.returncode == 2 and extra and importlib.util.find_spec(EXTRAS[extra[1]]) is None:
        pytest.skip(f"{where}: needs collapsewatch[{extra[1]}]")
    assert result.returncode == 0, (
        f"{where} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    )
    if command.shown and not matches(command.shown, result.stdout):
        pytest.fail(
            f"{where}: the docs show the output\n{command.shown}\nbut it printed\n{result.stdout}",
            pytrace=False,
        )


def _used_options(words: list[str]) -> set[str]:
    return {word.split("=")[0] for word in words if word.startswith("-")}


@functools.cache
def _script_help(script: str) -> str:
    result = _run([sys.executable, script, "--help"], cwd=ROOT)
    assert result.returncode == 0, f"{script} --help failed:\n{result.stderr}"
    return result.stdout


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )


@pytest.mark.parametrize("block", _synopsis_items())
def test_cli_synopsis(block: Block) -> None:
    lines = [line.strip() for line in block.source.splitlines() if line.strip()]
    documented = {line.split()[1]: line for line in lines}
    top = cli.build_parser().format_help()
    listed = re.findall(r"^    (\w+)", top.split("positional arguments:")[1], flags=re.M)
    assert set(documented) == set(listed), (
        f"{block.where} lists subcommands {sorted(documented)}; --help lists {sorted(listed)}"
    )
    for subcommand, line in documented.items():
        actual = _options(_usage(_help(subcommand)))
        assert _options(line) == actual, (
            f"{block.where}: `{line}` has options {sorted(_options(line))}; "
            f"`collapsewatch {subcommand} --help` has {sorted(actual)}"
        )


def test_every_code_block_is_collected() -> None:
    """Each block is run, checked as output or a synopsis, or is shell: none is left over."""
    for path in DOCS:
        blocks = collect(path)
        for index, block in enumerate(blocks):
            follows_python = index > 0 and blocks[index - 1].language in PYTHON
            known = block.language in PYTHON | SHELL or _is_synopsis(block)
            known = known or (block.language in OUTPUT and follows_python)
            assert known, f"{block.where}: a `{block.language}` block that no test runs"


# ---------------------------------------------------------------- quoted warnings
QUOTED_WARNING = re.compile(r'"(watch\(\): [^"]*)"')


def _prose(path: Path) -> str:
    """A Markdown file's text outside its code blocks, whitespace-normalised."""
    lines = path.read_text().splitlines()
    for token in MarkdownIt("commonmark").parse("\n".join(lines)):
        if token.type == "fence":
            lines[token.map[0] : token.map[1]] = [""] * (token.map[1] - token.map[0])
    return normalise(" ".join(lines))


def _quote_items() -> list[Any]:
    return [
        pytest.param(quote, id=f"{path.relative_to(ROOT)} {quote[:60]}")
        for path in DOCS
        for quote in QUOTED_WARNING.findall(_prose(path))
    ]


class TripletLoss(torch.nn.TripletMarginLoss):
    """Called as (anchor, positive, negative): no labels (as on integrations.md)."""


class SoftMarginTripletLoss(torch.nn.Module):
    """A soft-margin loss without a margin: its plateau is ln 2."""

    soft_margin = True

    def forward(self, embeddings, labels):
        return torch.nn.functional.softplus(embeddings.pow(2).sum(1)).mean()


class FastAPLoss(torch.nn.Module):
    """A loss without a margin (as pytorch-metric-learning's)."""

    def forward(self, embeddings, labels):
        return embeddings.pow(2).mean()


class LossOutput:
    """An output watch() cannot read a loss value from."""

    def __init__(self, value):
        self.value = value


class WrappedOutputLoss(torch.nn.Module):
    margin = 0.2

    def forward(self, embeddings, labels):
        return LossOutput(embeddings.pow(2).mean())


class Net(torch.nn.Module):
    """A model whose output holds no embeddings watch() can find."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x):
        return {"logits": self.linear(x)}


class PixelLoss(torch.nn.Module):
    """Runs the model itself, on inputs without labels."""

    margin = 0.2

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features):
        return self.model(features["pixels"]).pow(2).mean()


class FeatureLoss(torch.nn.Module):
    """Given neither embeddings nor anything the model made."""

    margin = 0.2

    def forward(self, features):
        return features["value"].pow(2).mean()


class UnreachableWandbRun:
    """Stands for a W&B run whose server cannot be reached."""

    __module__ = "wandb.sdk.wandb_run"

    def log(self, *args, **kwargs):
        raise ConnectionError("wandb server unreachable")

    alert = define_metric = log


def _warnings_watch_gives(logdir: Path) -> list[str]:
    """The messages of the warnings watch() gives in the cases the docs quote."""
    x, y = torch.randn(12, 8), torch.arange(12) % 3
    linear, net = torch.nn.Linear(8, 4), Net()
    bundled, triplet = cw.losses.BatchHardTripletLoss(margin=0.2), TripletLoss()
    soft, fastap, wrapped = SoftMarginTripletLoss(), FastAPLoss(), WrappedOutputLoss()
    pixels, features = PixelLoss(linear), FeatureLoss()
    cases = [  # (model, loss, one training step's loss, watch options)
        (linear, triplet, lambda: triplet(*linear(x).chunk(3)), {}),
        (linear, soft, lambda: soft(linear(x), y), {}),
        (linear, fastap, lambda: fastap(linear(x), y), {}),
        (linear, wrapped, lambda: wrapped(linear(x), y).value, {}),
        (net, bundled, lambda: bundled(net(x)["logits"], y), {}),
        (linear, pixels, lambda: pixels({"pixels": x}), {}),
        (linear, features, lambda: features({"value": x.requires_grad_()}), {}),
        (linear, bundled, lambda: bundled(linear(x), y), {"log_to": UnreachableWandbRun()}),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for model, loss_fn, step, options in cases:
            with cw.watch(model, loss_fn, logdir=logdir, every=1, commit_every=1, **options):
                for _ in range(3):
                    step().backward()
    return [str(warning.message) for warning in caught]


@pytest.fixture(scope="module")
def watch_warnings(tmp_path_factory) -> list[str]:
    return _warnings_watch_gives(tmp_path_factory.mktemp("quoted-warnings"))


@pytest.mark.parametrize("quote", _quote_items())
def test_a_quoted_warning_is_what_watch_says(quote: str, watch_warnings: list[str]) -> None:
    """Each "watch(): …" message the docs quote is one that watch() gives (… for any text)."""
    if not any(matches(quote, message) for message in watch_warnings):
        pytest.fail(
            f"the docs quote\n  {quote}\nwatch() says, in the quoted cases:\n  "
            + "\n  ".join(watch_warnings),
            pytrace=False,
        )


def test_api_md_names_every_key_of_analyze_json(tmp_path) -> None:
    sentence = _prose(ROOT / "docs" / "api.md").split("`analyze --json` prints one object with")
    assert len(sentence) == 2, "docs/api.md no longer says what analyze --json prints"
    documented = re.findall(r"`(\w+)`", sentence[1].split(". Exit")[0])
    model, loss_fn = torch.nn.Linear(8, 4), cw.losses.BatchHardTripletLoss(margin=0.2)
    with cw.watch(model, loss_fn, logdir=tmp_path, run="keys") as watcher:
        for _ in range(3):
            loss_fn(model(torch.randn(12, 8)), torch.arange(12) % 3).backward()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["analyze", "--json", str(watcher.path)]) == 0
    assert sorted(documented) == sorted(json.loads(out.getvalue()))
