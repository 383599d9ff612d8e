"""`collapsewatch report`: a self-contained HTML page, checked in a real headless Chromium."""

from __future__ import annotations

import re

import pytest

import collapsewatch as cw
from collapsewatch.cli import main
from collapsewatch.demo import DigitsRun, load_digits_tensors, start_run
from tests.dashboard.runs import READABILITY_CASES


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("report-runs")
    data = load_digits_tensors()
    paths = {}
    for spec in (DigitsRun("collapsing", lr=0.5), DigitsRun("healthy", scaled=True, lr=0.05)):
        trainer = start_run(spec, logdir=logdir, data=data, snapshot_every=20, on_collapse="ignore")
        with trainer.watcher:
            for _ in range(80):
                trainer.step()
        paths[spec.name] = trainer.watcher.path
    return paths


def render(page, path):
    """Open a report from disk; fail on any network request or script error."""
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_function(
        "document.querySelectorAll('.js-plotly-plot .main-svg').length > 0 && "
        "[...document.querySelectorAll('.js-plotly-plot')].every(p => p._fullData)"
    )
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert errors == []
    return page


@pytest.mark.browser
def test_report_of_a_collapsed_run_renders_offline(runs, tmp_path, page, capsys):
    output = tmp_path / "collapsing.html"
    assert main(["report", str(runs["collapsing"]), "-o", str(output)]) == 0
    capsys.readouterr()
    text = output.read_text()
    assert not re.search(r"<script[^>]+src=", text)  # plotly.js is inlined, not fetched
    verdict = cw.analyze(cw.load_run(runs["collapsing"]).metrics)
    render(page, output)
    body = page.inner_text("body")
    assert f"Collapsed at step {verdict.onset_step}" in body
    assert "What to try" in body and "scaled variant" in body
    assert page.inner_text(".badge") == "collapsed"
    # The metric panels and three snapshots: first, inside the collapse, last.
    assert page.locator(".js-plotly-plot").count() == 4
    traces = page.evaluate(
        "[...document.querySelectorAll('.js-plotly-plot')].map(p => p._fullData.length)"
    )
    assert all(count > 0 for count in traces)
    panel_names = page.evaluate(
        "document.querySelector('.js-plotly-plot')._fullData.map(t => t.name)"
    )
    assert any("collapsed" in str(name) for name in panel_names)  # the shaded span


@pytest.mark.browser
def test_report_of_a_healthy_run(runs, tmp_path, page, capsys):
    output = tmp_path / "healthy.html"
    assert main(["report", str(runs["healthy"]), "-o", str(output)]) == 0
    capsys.readouterr()
    render(page, output)
    assert "No collapse detected." in page.inner_text("body")
    assert page.inner_text(".badge") == "healthy"
    assert page.locator(".js-plotly-plot").count() == 3  # panels, first and last snapshot


def test_report_shows_the_class_geometry(runs, tmp_path):
    output = tmp_path / "geometry.html"
    assert main(["report", str(runs["healthy"]), "-o", str(output)]) == 0
    page = output.read_text()
    for column in ("num_classes", "within_class_variance_ratio", "alignment", "uniformity"):
        assert f"<td>{column}</td>" in page  # first and last recorded values
    assert "rank the classes need" in page  # the rank panel's reference, from the dashboard
    last = cw.load_run(runs["healthy"]).metrics["num_classes"].dropna()
    assert (last == 10).all()


@pytest.mark.browser
@pytest.mark.parametrize("case", READABILITY_CASES)
def test_every_report_panel_has_its_band_and_its_data_at_1024_px(tmp_path, page, case, capsys):
    """Each case's runs in one report (a diverged run beside a healthy one, ten runs at
    once), read back from Plotly at 1024 px."""
    from tests.dashboard.plotly_layout import assert_readable, save_screenshot, wait_for_panels
    from tests.dashboard.runs import write_case

    logdir = tmp_path / "runs"
    logdir.mkdir()
    run_ids, with_data = write_case(logdir, case)
    output = tmp_path / f"{case}.html"
    assert main(["report", *(str(logdir / r) for r in run_ids), "-o", str(output)]) == 0
    capsys.readouterr()
    page.set_viewport_size({"width": 1024, "height": 900})
    render(page, output)
    layout = wait_for_panels(page, ".js-plotly-plot", with_data)
    assert_readable(layout, with_data)
    legend = page.evaluate(
        "document.querySelector('.js-plotly-plot')._fullData"
        ".filter(t => t.showlegend && t.legendrank === 1).map(t => t.name)"
    )
    assert sorted(legend) == sorted(r.removesuffix(".cwrun") for r in run_ids)
    # One verdict per run: a card for one run, a table row naming each of several.
    verdicts = page.locator(".verdict")
    assert verdicts.count() == len(run_ids)
    if len(run_ids) > 1:
        named = [verdicts.nth(i).get_attribute("data-run") for i in range(verdicts.count())]
        assert sorted(named) == sorted(legend)
        for i, name in enumerate(named):
            assert verdicts.nth(i).locator("td").first.inner_text() == name
    if case == "diverged":
        assert layout["panels"][0]["range"][1] < 2  # the 1e14 loss is a ✱, not the scale
        assert page.locator("td .glyph").count() >= 1
    save_screenshot(page, f"report-{case.replace(' ', '-')}")
