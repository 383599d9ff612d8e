"""The dashboard read back from a real Chromium at 1024 px: every panel in its own band
showing its data, whatever runs are plotted; nothing clipped or under the toolbar."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from collapsewatch.dashboard.figures import EVENT_STYLE, PANELS, data_axis

from tests.dashboard.plotly_layout import (
    assert_readable,
    read_layout,
    save_screenshot,
    wait_for_panels,
)
from tests.dashboard.runs import READABILITY_CASES, write_case, write_run

pytestmark = pytest.mark.browser

PANELS_GRAPH = "#cw-panels .js-plotly-plot"
EMBED_GRAPH = "#cw-embed-graph .js-plotly-plot"
NARROW = {"width": 1024, "height": 900}


def _legend_runs(page: Any) -> list[str]:
    return page.evaluate(
        f"() => document.querySelector('{PANELS_GRAPH}')._fullData"
        ".filter(t => t.showlegend && t.legendrank === 1).map(t => t.name)"
    )


@pytest.mark.parametrize("case", READABILITY_CASES)
def test_every_panel_has_its_band_and_its_data_at_1024_px(
    page: Any, logdir: Path, serve_dashboard: Callable[..., str], case: str
) -> None:
    run_ids, with_data = write_case(logdir, case)
    page.set_viewport_size(NARROW)
    page.goto(serve_dashboard(logdir, interval_ms=1000))
    checks = page.get_by_role("checkbox")
    checks.first.wait_for()
    for i in range(checks.count()):  # the page selects the latest four: plot them all
        checks.nth(i).check()
    layout = wait_for_panels(page, PANELS_GRAPH, with_data)
    assert sorted(_legend_runs(page)) == sorted(r.removesuffix(".cwrun") for r in run_ids)
    assert_readable(layout, with_data)
    if case == "diverged":
        # The blown run (1e14, NaN, 1e39) sets no range: the healthy loss reads at full size.
        loss = next(p for p in layout["panels"] if p["axis"] == data_axis(0))
        assert loss["range"][1] < 2
        notes = [a["text"] for a in layout["annotations"] if a["text"].startswith("✱")]
        assert len(notes) == 2
    if case in ("healthy", "collapsed"):
        page.locator(f"{EMBED_GRAPH} .scatterlayer .point").first.wait_for()
        embed = read_layout(page, EMBED_GRAPH)
        assert embed["modebar"] is not None and embed["legends"]
        for legend in embed["legends"]:
            assert legend["bottom"] <= embed["modebar"]["top"] or (
                legend["top"] >= embed["modebar"]["bottom"]
            ), (legend, embed["modebar"])
    save_screenshot(page, f"dashboard-{case.replace(' ', '-')}")


def test_a_runs_colour_stays_whatever_is_selected(
    page: Any, logdir: Path, serve_dashboard: Callable[..., str]
) -> None:
    for name in ("batchhard", "scaled"):
        write_run(logdir, name, steps=20)
    page.goto(serve_dashboard(logdir))
    colour = (
        f"(name) => {{ const gd = document.querySelector('{PANELS_GRAPH}');"
        " const t = gd && gd._fullData && gd._fullData.find("
        "t => t.showlegend && t.name === name); return t ? t.line.color : null; }"
    )
    page.wait_for_function(f"() => ({colour})('scaled') && ({colour})('batchhard')")
    both = page.evaluate(colour, "scaled")
    swatch = page.locator('.cw-run[data-run="scaled.cwrun"] .cw-swatch')
    swatch_colour = swatch.evaluate("e => e.style.background")
    page.get_by_role("checkbox").first.uncheck()  # batchhard off: scaled alone
    page.wait_for_function(
        f"() => document.querySelector('{PANELS_GRAPH}')._fullData"
        ".filter(t => t.showlegend && t.legendrank === 1).length === 1"
    )
    assert page.evaluate(colour, "scaled") == both
    assert swatch.evaluate("e => e.style.background") == swatch_colour


def test_event_kinds_look_the_same_in_panels_legend_and_table(
    page: Any, logdir: Path, serve_dashboard: Callable[..., str]
) -> None:
    write_run(logdir, "c", steps=60, collapse_at=30, recover_at=45)
    page.goto(serve_dashboard(logdir))
    page.locator(".cw-events-table").wait_for()
    # The table and the figure come from separate callbacks: wait for the drawn events.
    page.wait_for_function(
        f"() => {{ const gd = document.querySelector('{PANELS_GRAPH}');"
        " return !!(gd && gd._fullData && gd._fullData.some(t => t.name === 'c events')); }"
    )
    drawn = page.evaluate(
        f"() => {{ const d = document.querySelector('{PANELS_GRAPH}')._fullData;"
        " const ev = d.find(t => t.name === 'c events');"
        " const keys = d.filter(t => t.legendrank === 2);"
        " return {events: Array.from(ev.marker.symbol),"
        " legend: Object.fromEntries(keys.map(t => [t.name, t.marker.symbol]))}; }"
    )
    assert drawn["events"] == [EVENT_STYLE["collapsed"][0], EVENT_STYLE["recovered"][0]]
    assert drawn["legend"] == {f"event: {k}": EVENT_STYLE[k][0] for k in ("collapsed", "recovered")}
    glyphs = page.locator(".cw-events-table .cw-event-glyph").all_inner_texts()
    assert glyphs == [EVENT_STYLE["recovered"][1], EVENT_STYLE["collapsed"][1]]  # newest first
    assert len(PANELS) == 6
