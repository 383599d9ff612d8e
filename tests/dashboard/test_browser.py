"""End to end: the dashboard served on 127.0.0.1 and driven in a real headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from collapsewatch.dashboard.figures import PANELS as PANEL_LIST
from collapsewatch.dashboard.figures import data_axis

from tests.dashboard.plotly_layout import save_screenshot
from tests.dashboard.runs import write_broken, write_run

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
PANELS = "#cw-panels .js-plotly-plot"
LOSS_AXIS = data_axis(0)
# The loss/margin traces (the loss panel's data axis), one per plotted run.
RATIO_POINTS = (
    "() => { const gd = document.querySelector('#cw-panels .js-plotly-plot');"
    f" const t = gd && gd.data && gd.data.find(t => t.yaxis === '{LOSS_AXIS}' && t.x.length);"
    " return t ? t.x.length : 0; }"
)


@pytest.fixture
def expect(browser: Any) -> Callable[..., Any]:
    """Playwright's auto-waiting ``expect`` (after ``browser``, so a missing one skips)."""
    from playwright.sync_api import expect

    return expect


@pytest.fixture(autouse=True)
def no_page_errors(page: Any) -> Iterator[None]:
    """Every test also checks that the page raised no JavaScript error."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield
    assert errors == []


def _row(page: Any, run_id: str) -> Any:
    return page.locator(f'.cw-run[data-run="{run_id}"]')


def _legend(page: Any) -> Any:
    return page.locator("#cw-panels .legend .legendtext")


def test_a_collapsed_run_shows_its_banner_with_the_onset_step(
    page: Any, logdir: Path, serve_dashboard: Callable[..., str], expect: Any
) -> None:
    write_run(logdir, "collapsing", steps=80, collapse_at=42)
    write_run(logdir, "fine", steps=30)
    page.goto(serve_dashboard(logdir))
    banner = page.locator(".cw-banner")
    expect(banner).to_have_count(1)
    expect(banner).to_have_attribute("data-run", "collapsing.cwrun")
    expect(banner.locator(".cw-banner-onset")).to_have_text("collapsed at step 42")
    expect(banner).to_contain_text("mean pairwise distance 0.002")
    expect(banner).to_contain_text("Try: Lower the learning rate.")
    # State as text and symbol in the run list, not colour alone.
    expect(_row(page, "collapsing.cwrun").locator(".cw-badge")).to_have_text("✖ collapsed")
    expect(_row(page, "fine.cwrun").locator(".cw-badge")).to_have_text("✓ healthy")
    # Both runs are plotted, overlaid on the same axes, then the event kind drawn; the
    # collapse is shaded in every panel.
    expect(_legend(page)).to_have_text(["collapsing", "fine", "event: collapsed"])
    assert page.evaluate(
        "() => document.querySelector('#cw-panels .js-plotly-plot').data"
        ".filter(t => t.fill === 'tozeroy').length"
    ) == len(PANEL_LIST)


def test_a_healthy_run_shows_no_banner(
    page: Any, logdir: Path, serve_dashboard: Callable[..., str], expect: Any
) -> None:
    write_run(logdir, "fine", steps=30)
    page.goto(serve_dashboard(logdir))
    expect(_row(page, "fine.cwrun").locator(".cw-badge")).to_have_text("✓ healthy")
    # Banners and the run list come from the same callback: the row being there means
    # the banners have been rendered too.
    expect(page.locator(".cw-banner")).to_have_count(0)
    expect(_legend(page)).to_have_text(["fine"])


def test_runs_are_selectable_and_overlay(
    page: Any, logdir: Path, serve_dashboard: Callable[..., str], expect: Any
) -> None:
    for name in ("a", "b", "c"):
        write_run(logdir, name, steps=20)
    page.goto(serve_dashboard(logdir))
    expect(_legend(page)).to_have_text(["a", "b", "c"])
    page.get_by_role("checkbox").nth(1).uncheck()
    expect(_legend(page)).to_have_text(["a", "c"])
    page.get_by_role("checkbox").nth(1).check()
    expect(_legend(page)).to_have_text(["a", "b", "c"])


@pytest.fixture
def writer_process(logdir: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    processes: list[subprocess.Popen] = []

    def start(name: str, rows: int = 3000, every: float = 0.02) -> subprocess.Popen:
        command = [sys.executable, "-m", "tests.dashboard.grow_run", str(logdir / name)]
        command += ["--rows", str(rows), "--every", str(every)]
        processes.append(subprocess.Popen(command, cwd=REPO))
        return processes[-1]

    yield start
    for process in processes:
        process.kill()
        process.wait(timeout=10)


def test_a_run_appended_by_another_process_grows_on_screen(
    page: Any,
    logdir: Path,
    serve_dashboard: Callable[..., str],
    writer_process: Callable[..., subprocess.Popen],
    expect: Any,
) -> None:
    # Not faster: Dash drops an answer the next tick overtakes, so on a busy machine (load
    # 5 on two cores) panels slower than a 200 ms tick never showed, whatever the code.
    page.goto(serve_dashboard(logdir, interval_ms=1000))
    expect(page.locator("#cw-run-count")).to_contain_text("waiting")
    writer_process("live.cwrun")
    # A run that appears after the page opened is picked up and, as the first, plotted.
    expect(_row(page, "live.cwrun")).to_be_visible()
    expect(_legend(page)).to_have_text(["live"])
    page.wait_for_function(f"() => window.Plotly && ({RATIO_POINTS})() > 0")
    # Count Plotly.extendTraces calls: growth must come from extendData, not rebuilds.
    page.evaluate(
        "() => { window.cwExtends = 0; const original = Plotly.extendTraces;"
        " Plotly.extendTraces = function (...args) { window.cwExtends += 1;"
        " return original.apply(this, args); }; }"
    )
    before = page.evaluate(RATIO_POINTS)
    # On a loaded machine one tick may carry many rows: wait for the growth and for a
    # second extension, whichever comes last.
    page.wait_for_function(f"() => ({RATIO_POINTS})() >= {before + 30} && window.cwExtends >= 2")
    # The other panels grew with it, the stacked fractions included.
    lengths = page.evaluate(
        "(axes) => document.querySelector('#cw-panels .js-plotly-plot').data"
        ".filter(t => axes.includes(t.yaxis) && t.name === 'live').map(t => t.x.length)",
        [data_axis(i) for i in range(len(PANEL_LIST))],
    )
    # loss, distance, distance between classes, variance, hard, semi-hard, std; the rank and
    # the class geometry are measured every 10th step only.
    every_step = [n for n in lengths if n >= before + 30]
    assert len(lengths) == 12 and len(every_step) == 7
    # The run list follows too.
    step = _row(page, "live.cwrun").locator(".cw-stat").nth(2)
    first = int(step.inner_text().split()[-1].replace(",", ""))
    expect(step).not_to_have_text(step.inner_text())
    assert int(step.inner_text().split()[-1].replace(",", "")) > first


def test_a_broken_run_file_yields_an_error_card_and_the_rest_still_works(
    page: Any, logdir: Path, serve_dashboard: Callable[..., str], expect: Any
) -> None:
    write_broken(logdir, "broken")
    write_run(logdir, "fine", steps=20)
    page.goto(serve_dashboard(logdir))
    card = page.locator('.cw-error-card[data-run="broken.cwrun"]')
    expect(card).to_contain_text("Cannot read run")
    expect(card).to_contain_text("not a collapsewatch run")
    expect(_row(page, "broken.cwrun").locator(".cw-badge")).to_have_text("⚠ error")
    expect(_legend(page)).to_have_text(["fine"])


def test_the_embedding_slider_shows_the_points_fall_onto_one_spot(
    page: Any, logdir: Path, serve_dashboard: Callable[..., str], expect: Any
) -> None:
    write_run(logdir, "c", steps=100, collapse_at=50, snapshots=[0, 30, 60, 90])
    page.goto(serve_dashboard(logdir))
    caption = page.locator("#cw-embed-caption")
    expect(caption).to_contain_text("Step 90 · 60 points")  # starts on the latest snapshot
    spread = (
        "() => { const gd = document.querySelector('#cw-embed-graph .js-plotly-plot');"
        " const xs = gd.data.flatMap(t => Array.from(t.x));"
        " const r = gd.layout.xaxis.range;"
        " return (Math.max(...xs) - Math.min(...xs)) / (r[1] - r[0]); }"
    )
    expect(page.locator("#cw-embed-graph .scatterlayer .point")).to_have_count(60)
    assert page.evaluate(spread) < 0.01  # collapsed: one spot on the fixed axes
    page.locator("#cw-embed-slider [role=slider]").focus()
    page.keyboard.press("Home")
    expect(caption).to_contain_text("Step 0 · 60 points")
    page.wait_for_function(f"() => ({spread})() > 0.3")  # healthy: spread over the axes


SWEEP_RUNS = 200
LEGEND_NAMES = (
    "() => { const gd = document.querySelector('#cw-panels .js-plotly-plot');"
    " return gd && gd._fullData ? gd._fullData.filter(t => t.showlegend).map(t => t.name)"
    " : null; }"
)


def _legend_is(page: Any, names: list[str]) -> None:
    """Wait until the panels' legend (Plotly's own resolved traces) names exactly ``names``."""
    want = json.dumps(names, separators=(",", ":"))
    try:
        page.wait_for_function(f"(want) => JSON.stringify(({LEGEND_NAMES})()) === want", arg=want)
    except Exception:  # say what the legend held instead of only "timeout"
        raise AssertionError(f"legend {page.evaluate(LEGEND_NAMES)}, wanted {names}") from None


def test_a_200_run_sweep_is_filtered_in_the_table_and_two_ticked_runs_are_plotted(
    page: Any, logdir: Path, serve_dashboard: Callable[..., str], expect: Any
) -> None:
    # Written last to first, so the four newest runs (the page's default selection) are
    # trial000-003; every 4th run and those four collapse.
    for i in reversed(range(SWEEP_RUNS)):
        config = {"lr": [0.01, 0.1, 0.5][i % 3], "loss": {"margin": 0.2, "mining": "hard"}}
        collapse_at = 20 + i % 30 if i % 4 == 0 or i < 4 else None
        write_run(
            logdir,
            f"trial{i:03d}",
            steps=60,
            collapse_at=collapse_at,
            seed=i,
            metadata={"config": config},
        )
    # Polls 2 s apart: the first listing reads 200 files, and Dash drops an answer that a
    # newer poll overtakes (see serve_dashboard).
    page.goto(serve_dashboard(logdir, interval_ms=2000))
    table = page.locator("#cw-run-table")
    expect(page.locator("#cw-table-section")).to_be_visible()
    expect(page.locator("#cw-run-count")).to_have_text(f"({SWEEP_RUNS})")
    expect(table.locator("th.dash-header")).to_contain_text(["state", "run", "onset step"])
    _legend_is(page, ["trial000", "trial001", "trial002", "trial003", "event: collapsed"])
    states = table.locator('td[data-dash-column="state"]')
    expect(states).to_have_count(25)  # one page
    filter_input = table.locator(
        'th.dash-filter[data-dash-column="state"] input:not([class*="dash-filter--case"])'
    )
    filter_input.fill("collapsed")
    filter_input.press("Enter")
    expect(states.first).to_have_text("✖ collapsed")
    expect(states.filter(has_not_text="✖ collapsed")).to_have_count(0)
    expect(states).to_have_count(25)  # 54 collapsed runs: the first page of them
    ticked = table.locator("td.dash-select-cell input:checked")
    expect(ticked).to_have_count(4)  # the default selection, ticked in the table too
    while ticked.count():
        ticked.first.uncheck()
    _legend_is(page, [])
    boxes = table.locator("td.dash-select-cell input")
    runs = table.locator('td[data-dash-column="run"]')
    picks = [runs.nth(5).inner_text(), runs.nth(7).inner_text()]
    assert picks == ["trial008", "trial016"]
    boxes.nth(5).check()
    boxes.nth(7).check()
    _legend_is(page, [*picks, "event: collapsed"])
    expect(ticked).to_have_count(2)
    page.locator("#cw-table-section").scroll_into_view_if_needed()
    save_screenshot(page, "run-table")
