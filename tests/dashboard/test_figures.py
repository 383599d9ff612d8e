"""Figures: the step-aligned panels, their live extension, the embedding scatter."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import plotly.io as pio
import pytest
from collapsewatch.dashboard.data import RunCache
from collapsewatch.dashboard.figures import (
    COLLAPSE_FILL,
    EVENT_STYLE,
    LABEL_COLOURS,
    OKABE_ITO,
    PANELS,
    RUN_COLOURS,
    STATE_COLOURS,
    TEMPLATE_NAME,
    NeedsRebuildError,
    base_axis,
    data_axis,
    embedding_caption,
    embedding_figure,
    panels_extension,
    panels_figure,
    register_template,
    run_colours,
)

from collapsewatch.store import Event, RunWriter
from tests.dashboard.runs import collapsed_event, metrics_frame, recovered_event, write_run

PANEL = {panel.key: i for i, panel in enumerate(PANELS)}


def _traces(figure: dict, name: str) -> list[dict]:
    return [t for t in figure["data"] if t.get("name") == name]


def _by_axis(figure: dict, axis: str) -> list[dict]:
    return [t for t in figure["data"] if t["yaxis"] == axis]


def _series(figure: dict, panel: str) -> dict[str, dict]:
    """The data traces of ``panel`` by their hover label."""
    traces = _by_axis(figure, data_axis(PANEL[panel]))
    return {t["hovertemplate"].split(" %")[0]: t for t in traces if "hovertemplate" in t}


def _layout_axis(figure: dict, axis: str) -> dict:
    return figure["layout"][f"yaxis{axis[1:]}"]


def test_one_template_registered_once_and_used() -> None:
    template = register_template()
    assert register_template() is template is pio.templates[TEMPLATE_NAME]
    figure, _ = panels_figure([], {}, 100)
    assert figure["layout"]["template"]["layout"]["colorway"] == list(RUN_COLOURS)
    assert embedding_figure(None)["layout"]["template"] == figure["layout"]["template"]


def test_palette_keeps_collapse_red_for_collapse_and_states_are_distinct() -> None:
    assert len(set(RUN_COLOURS)) == len(RUN_COLOURS) == 10  # ten runs, ten colours
    assert OKABE_ITO["vermillion"] not in RUN_COLOURS  # the collapse shading's colour
    assert OKABE_ITO["yellow"] not in RUN_COLOURS  # too light on white
    assert len(set(STATE_COLOURS.values())) == len(STATE_COLOURS)
    assert "diverged" in STATE_COLOURS and "diverged" in EVENT_STYLE
    assert len(set(LABEL_COLOURS)) == len(LABEL_COLOURS)
    assert run_colours(["b", "a"]) == {"a": RUN_COLOURS[0], "b": RUN_COLOURS[1]}
    # Event kinds: one marker symbol and one text glyph each, none shared.
    assert len({s[0] for s in EVENT_STYLE.values()}) == len(EVENT_STYLE)
    assert len({s[1] for s in EVENT_STYLE.values()}) == len(EVENT_STYLE)


def test_a_runs_colour_does_not_depend_on_what_else_is_plotted(logdir: Path) -> None:
    for name in ("batchhard", "scaled", "zeta"):
        write_run(logdir, name, steps=5)
    cache = RunCache(logdir)
    listed = [e.run_id for e in cache.run_list().entries]
    colours = run_colours(listed)
    alone, _ = panels_figure([cache.view("scaled.cwrun")], colours, 100)
    both, _ = panels_figure(
        [cache.view("batchhard.cwrun"), cache.view("scaled.cwrun")], colours, 100
    )
    colour_of = lambda figure: {  # noqa: E731
        t["name"]: t["line"]["color"] for t in figure["data"] if t.get("showlegend")
    }
    assert colour_of(alone)["scaled"] == colour_of(both)["scaled"] == RUN_COLOURS[1]
    assert colour_of(both)["batchhard"] == RUN_COLOURS[0]


def _bands(figure: dict) -> list[tuple[float, float]]:
    """Each panel's (bottom, top) as its base and data axes declare it."""
    bands = []
    for i in range(len(PANELS)):
        base, data = _layout_axis(figure, base_axis(i)), _layout_axis(figure, data_axis(i))
        assert base["domain"] == data["domain"] and data["overlaying"] == base_axis(i)
        bands.append(tuple(base["domain"]))
    return bands


@pytest.mark.parametrize(
    "kind", ["none", "healthy", "collapsed", "margin-free", "one step", "no rows", "diverged"]
)
def test_every_panel_keeps_its_band_whatever_the_runs_hold(logdir: Path, kind: str) -> None:
    options = {
        "healthy": {"steps": 30},
        "collapsed": {"steps": 30, "collapse_at": 10},
        "margin-free": {"steps": 30, "columns": ["loss", "mean_pairwise_distance"]},
        "one step": {"steps": 1},
        "no rows": {"steps": 0},
        "diverged": {"steps": 30, "diverge_at": 20},
    }
    views = []
    if kind != "none":
        write_run(logdir, "r", **options[kind])
        views = [RunCache(logdir).view("r.cwrun")]
    figure, _ = panels_figure(views, {"r.cwrun": RUN_COLOURS[0]}, 100)
    bands = _bands(figure)
    assert len(bands) == len(PANELS) == 6
    assert all(bottom < top for bottom, top in bands)
    for (bottom, _), (_, next_top) in itertools.pairwise(bands):
        assert next_top < bottom  # top to bottom, with a gap for the next title
    assert bands[0][1] == 1 and bands[-1][0] == 0
    # Plotly drops an axis no trace uses, and an overlaying axis whose base went loses
    # its band: every axis carries a trace whatever the runs hold.
    axes = {base_axis(i) for i in range(len(PANELS))} | {data_axis(i) for i in range(len(PANELS))}
    assert {t["yaxis"] for t in figure["data"]} >= axes
    # Panel titles: one per band, at its top.
    titles = [a for a in figure["layout"]["annotations"] if a.get("name", "").startswith("title")]
    assert [a["y"] for a in titles] == [top for _, top in bands]
    json.dumps(figure, allow_nan=False)


def test_panels_for_a_collapsed_run(logdir: Path) -> None:
    write_run(logdir, "c", steps=100, collapse_at=60)
    view = RunCache(logdir).view("c.cwrun")
    figure, trace_map = panels_figure([view], {"c.cwrun": "#0072B2"}, 2000)
    layout = figure["layout"]
    # Six panels on one shared step axis.
    assert {t["xaxis"] for t in figure["data"]} == {"x"}
    assert layout["xaxis"]["title"]["text"] == "training step"
    assert _layout_axis(figure, data_axis(PANEL["spread"]))["type"] == "log"
    assert _layout_axis(figure, data_axis(PANEL["difficulty"]))["tickformat"] == ".0%"
    # The plateau line at loss/margin = 1.0.
    loss = data_axis(PANEL["loss"])
    assert any(s["yref"] == loss and s["y0"] == s["y1"] == 1.0 for s in layout["shapes"])
    # The healthy value of std_of_l2_normalized, 1/√D, in its own panel.
    sphere = data_axis(PANEL["sphere"])
    assert any(
        s["yref"] == sphere and math.isclose(s["y0"], 1 / math.sqrt(8)) for s in layout["shapes"]
    )
    assert set(_series(figure, "sphere")) == {"std of L2-normalised"}
    # The collapse span, shaded in every panel, open to the last step.
    shades = [figure["data"][i] for i in trace_map["c.cwrun"]["shade"]]
    assert [t["yaxis"] for t in shades] == [base_axis(i) for i in range(len(PANELS))]
    assert all(t["fill"] == "tozeroy" and t["x"] == [60, 60, 99] for t in shades)
    assert all(t["fillcolor"] == COLLAPSE_FILL for t in shades)
    assert trace_map["c.cwrun"]["open"] is True
    # Difficulty: lines with markers, never filled (a fill would read as collapse shading).
    difficulty = _series(figure, "difficulty")
    assert set(difficulty) == {"hard", "semi-hard"}
    assert all("fill" not in t and "stackgroup" not in t for t in difficulty.values())
    assert difficulty["hard"]["marker"]["symbol"] != difficulty["semi-hard"]["marker"]["symbol"]
    # Effective rank only where it was computed (every 10th step here).
    assert _series(figure, "rank")["effective rank"]["x"] == list(range(0, 100, 10))
    # The legend names the run once, then the event kind drawn; its events are marked.
    assert [t["name"] for t in figure["data"] if t.get("showlegend")] == ["c", "event: collapsed"]
    key = _traces(figure, "event: collapsed")[0]
    events = _traces(figure, "c events")[0]
    assert events["x"] == [60] and events["marker"]["symbol"] == [key["marker"]["symbol"]]
    assert events["cliponaxis"] is False
    json.dumps(figure)  # plain JSON: no NaN, no NumPy


def test_a_closed_span_is_shaded_between_collapse_and_recovery(logdir: Path) -> None:
    write_run(logdir, "r", steps=100, collapse_at=30, recover_at=50)
    view = RunCache(logdir).view("r.cwrun")
    figure, trace_map = panels_figure([view], {"r.cwrun": "#000000"}, 2000)
    shade = figure["data"][trace_map["r.cwrun"]["shade"][0]]
    assert shade["x"] == [30, 30, 50, 50] and shade["y"] == [0, 1, 1, 0]
    assert trace_map["r.cwrun"]["open"] is False


def _rescue_event(step: int, kind: str = "rescued") -> Event:
    # As collapsewatch.rescue records it: the detector's state (still collapsed) at the step.
    return Event(step, kind, "collapsed", f"{kind} at step {step}", "", {"collapse_step": 40})


def test_a_rescued_run_is_shaded_from_the_onset_to_the_rescue_and_marked(logdir: Path) -> None:
    # The detector says "recovered" only at 75; the rescue restored a healthy state at 50.
    events = [collapsed_event(40), _rescue_event(50), recovered_event(75)]
    write_run(logdir, "r", steps=100, collapse_at=40, recover_at=50, events=events)
    view = RunCache(logdir).view("r.cwrun")
    figure, trace_map = panels_figure([view], {"r.cwrun": "#000000"}, 2000)
    shades = [figure["data"][i] for i in trace_map["r.cwrun"]["shade"]]
    assert len(shades) == len(PANELS)
    assert all(t["x"] == [40, 40, 50, 50] and t["y"] == [0, 1, 1, 0] for t in shades)
    assert all(t["fillcolor"] == COLLAPSE_FILL for t in shades)
    assert trace_map["r.cwrun"]["open"] is False
    marks = _traces(figure, "r events")[0]
    assert marks["x"] == [40, 50, 75]
    assert marks["marker"]["symbol"][1] == EVENT_STYLE["rescued"][0] == "cross"
    keys = [t["name"] for t in figure["data"] if t.get("showlegend")]
    assert keys == ["r", "event: collapsed", "event: recovered", "event: rescued"]


def test_a_failed_rescue_reopens_the_collapse_span(logdir: Path) -> None:
    events = [collapsed_event(40), _rescue_event(50), _rescue_event(90, "rescue_failed")]
    write_run(logdir, "f", steps=100, collapse_at=40, events=events)
    view = RunCache(logdir).view("f.cwrun")
    figure, trace_map = panels_figure([view], {"f.cwrun": "#000000"}, 2000)
    shade = figure["data"][trace_map["f.cwrun"]["shade"][0]]
    # [40, 50] closed by the rescue, then from the failed rescue on, open to the last step.
    assert shade["x"] == [40, 40, 50, 50, 90, 90, 99] and shade["y"] == [0, 1, 1, 0, 0, 1, 1]
    assert trace_map["f.cwrun"]["open"] is True
    symbols = _traces(figure, "f events")[0]["marker"]["symbol"]
    assert symbols == ["x", "cross", EVENT_STYLE["rescue_failed"][0]]


def test_panels_survive_missing_columns(logdir: Path) -> None:
    write_run(logdir, "sparse", steps=20, columns=["loss", "mean_pairwise_distance"])
    write_run(logdir, "bare", steps=3, columns=[], metadata={"embedding_dim": None})
    cache = RunCache(logdir)
    views = [cache.view("bare.cwrun"), cache.view("sparse.cwrun")]
    figure, trace_map = panels_figure(views, run_colours(["bare.cwrun", "sparse.cwrun"]), 100)
    assert trace_map["bare.cwrun"]["traces"] == {}
    assert set(trace_map["sparse.cwrun"]["traces"]) == {
        "loss_margin_ratio",  # derived from loss / margin
        "mean_pairwise_distance",
    }
    json.dumps(figure)


def test_the_spread_panel_draws_the_spread_between_classes_where_it_is_known(
    logdir: Path,
) -> None:
    write_run(logdir, "labelled", steps=30)
    unlabelled = metrics_frame(range(30))
    unlabelled["mean_between_class_distance"] = np.nan  # explicit triplets: unknown
    writer = RunWriter(logdir / "unlabelled.cwrun", {"margin": 0.2})
    writer.append_metrics(unlabelled)
    writer.close()
    cache = RunCache(logdir)
    for name, drawn in (("labelled", True), ("unlabelled", False)):
        view = cache.view(f"{name}.cwrun")
        figure, _ = panels_figure([view], {f"{name}.cwrun": "#000000"}, 100)
        spread = _series(figure, "spread")
        assert ("mean distance between classes" in spread) is drawn, name
        assert {"mean pairwise distance", "embedding variance"} <= set(spread)
        if drawn:
            between = spread["mean distance between classes"]
            frame = view.metrics.set_index("step")["mean_between_class_distance"]
            assert between["y"] == pytest.approx(frame.loc[between["x"]].tolist())


def test_nan_becomes_null_not_invalid_json(logdir: Path) -> None:
    writer = RunWriter(logdir / "n.cwrun", {"margin": 0.2})
    frame = metrics_frame(range(5))
    frame.loc[2, "mean_pairwise_distance"] = np.nan
    frame.loc[3, "loss_margin_ratio"] = np.inf
    writer.append_metrics(frame)
    writer.close()
    figure, _ = panels_figure([RunCache(logdir).view("n.cwrun")], {"n.cwrun": "#000000"}, 100)
    assert _series(figure, "spread")["mean pairwise distance"]["y"][2] is None
    ratio = _series(figure, "loss")["loss / margin"]
    assert ratio["y"][ratio["x"].index(3)] is None if 3 in ratio["x"] else True
    # The infinite loss is marked on the panel's top edge instead.
    (off,) = _traces(figure, "n off scale")
    assert off["x"] == [3] and off["yaxis"] == base_axis(PANEL["loss"])
    json.dumps(figure, allow_nan=False)


def test_a_diverged_run_is_marked_and_sets_no_range_for_the_others(logdir: Path) -> None:
    write_run(logdir, "fine", steps=40)
    write_run(logdir, "blown", steps=40, diverge_at=25)
    cache = RunCache(logdir)
    views = [cache.view("blown.cwrun"), cache.view("fine.cwrun")]
    figure, _ = panels_figure(views, run_colours(["blown.cwrun", "fine.cwrun"]), 2000)
    # No drawn value is off its panel's scale: the 1e14 loss and 1e39 variance are not
    # on any line, so the axes autorange on the healthy values (loss/margin ≤ 0.6 here).
    for i, panel in enumerate(PANELS):
        low, high = panel.off_scale
        for trace in _by_axis(figure, data_axis(i)):
            assert all(low <= y <= high for y in trace["y"] if y is not None), trace
    loss = [y for t in _by_axis(figure, data_axis(PANEL["loss"])) for y in t["y"] if y]
    assert max(loss) < 1
    # ✱ at every blown step where a value is infinite or beyond the panel's bounds (NaN
    # alone is a value not measured, not a blow-up), and a note saying what ✱ means.
    marks = {t["yaxis"]: t["x"] for t in _traces(figure, "blown off scale")}
    assert marks == {
        base_axis(PANEL["loss"]): [25, 26, 27],  # 1e14, then NaN
        base_axis(PANEL["spread"]): list(range(25, 40)),  # inf distance, 1e39 variance
    }
    assert all(t["cliponaxis"] is False for t in _traces(figure, "blown off scale"))
    notes = [a["name"] for a in figure["layout"]["annotations"] if "off-scale" in a.get("name", "")]
    assert notes == ["off-scale:loss", "off-scale:spread"]
    assert "1e+14" in _traces(figure, "blown off scale")[0]["text"][0]
    assert not _traces(figure, "fine off scale")
    json.dumps(figure, allow_nan=False)


def test_a_run_without_a_margin_plots_its_loss(logdir: Path) -> None:
    write_run(logdir, "infonce", steps=20, metadata={"margin": None}, columns=["loss"])
    view = RunCache(logdir).view("infonce.cwrun")
    figure, trace_map = panels_figure([view], {"infonce.cwrun": "#000000"}, 100)
    assert set(_series(figure, "loss")) == {"loss (no margin)"}
    assert trace_map["infonce.cwrun"]["traces"] == {"loss": 2 * len(PANELS)}  # after the frames
    assert _series(figure, "loss")["loss (no margin)"]["y"][0] == pytest.approx(
        view.metrics["loss"].iloc[0]
    )


@pytest.mark.parametrize("max_points", [500, 2000])
def test_a_100k_step_run_ships_a_bounded_payload_with_its_extremes(
    logdir: Path, max_points: int
) -> None:
    n = 100_000
    frame = metrics_frame(range(n), collapse_at=70_000)
    rng = np.random.default_rng(0)
    frame["loss_margin_ratio"] = np.where(
        frame["step"] >= 70_000, 1.0, 0.5 + 0.2 * rng.standard_normal(n)
    )
    frame.loc[4321, "loss_margin_ratio"] = 9.0  # the global maximum, one step wide
    frame.loc[54321, "loss_margin_ratio"] = -3.0  # the global minimum
    writer = RunWriter(logdir / "long.cwrun", {"margin": 0.2, "embedding_dim": 8})
    writer.append_metrics(frame)
    writer.append_events([collapsed_event(70_000)])
    writer.close()
    view = RunCache(logdir).view("long.cwrun")
    figure, trace_map = panels_figure([view], {"long.cwrun": "#0072B2"}, max_points)
    for trace in figure["data"]:
        assert len(trace["x"]) <= 2 * max_points, trace["name"]
    ratio = figure["data"][trace_map["long.cwrun"]["traces"]["loss_margin_ratio"]]
    assert ratio["yaxis"] == data_axis(PANEL["loss"])
    assert max(ratio["y"]) == 9.0 and min(ratio["y"]) == -3.0
    assert {0, 4321, 54321, 70_000, n - 1} <= set(ratio["x"])
    # The whole JSON sent to the browser is a small fraction of the table.
    payload = len(json.dumps(figure))
    assert payload < 60 * max_points * len(figure["data"])
    assert sum(len(t["x"]) for t in figure["data"]) < 0.2 * n * len(figure["data"])


def test_extension_appends_only_new_rows_and_stretches_an_open_span(logdir: Path) -> None:
    writer = RunWriter(logdir / "live.cwrun", {"margin": 0.2, "embedding_dim": 8})
    writer.append_metrics(metrics_frame(range(20), collapse_at=15))
    writer.append_events([collapsed_event(15)])
    writer.commit()
    cache = RunCache(logdir, min_refresh=0)
    view = cache.view("live.cwrun")
    _, trace_map = panels_figure([view], {"live.cwrun": "#0072B2"}, 2000)
    assert panels_extension([view], trace_map) == (None, {"live.cwrun": 0})

    writer.append_metrics(metrics_frame(range(20, 23), collapse_at=15))
    writer.commit()
    view = cache.view("live.cwrun")
    extend, appended = panels_extension([view], trace_map)
    assert appended == {"live.cwrun": 3}
    update, indices = extend
    entry = trace_map["live.cwrun"]
    ratio_at = indices.index(entry["traces"]["loss_margin_ratio"])
    assert update["x"][ratio_at] == [20, 21, 22]
    assert update["y"][ratio_at] == [1.0, 1.0, 1.0]
    rank_at = indices.index(entry["traces"]["effective_rank"])
    assert update["x"][rank_at] == [20]  # the only new step with a rank
    for index in entry["shade"]:
        at = indices.index(index)
        assert update["x"][at] == [22] and update["y"][at] == [1]
    assert len(indices) == len(update["x"]) == len(update["y"])
    json.dumps(extend, allow_nan=False)
    # A value off scale needs its ✱ and the panel's note: the figure is rebuilt instead.
    writer.append_metrics(metrics_frame(range(23, 26), diverge_at=23))
    writer.close()
    with pytest.raises(NeedsRebuildError):
        panels_extension([cache.view("live.cwrun")], trace_map)


def test_embedding_figure_colours_and_shapes_by_label(logdir: Path) -> None:
    write_run(logdir, "c", steps=50, collapse_at=30, snapshots=[0, 40])
    cache = RunCache(logdir)
    projection = cache.projection("c.cwrun", 40)
    figure = embedding_figure(projection, "c")
    assert [t["name"] for t in figure["data"]] == ["0", "1", "2"]
    colours = [t["marker"]["color"] for t in figure["data"]]
    symbols = [t["marker"]["symbol"] for t in figure["data"]]
    assert len(set(colours)) == len(set(symbols)) == 3
    (x0, x1), (y0, y1) = projection.extent
    assert figure["layout"]["yaxis"]["range"] == [y0, y1]
    assert figure["layout"]["xaxis"]["range"] == [x0, x1]
    assert figure["layout"]["yaxis"]["scaleanchor"] == "x"
    caption = embedding_caption(projection)
    assert caption.startswith("Step 40 · 60 points · RMS radius")
    assert "of the first snapshot" in caption
    json.dumps(figure)


def test_embedding_figure_without_labels_or_with_many(logdir: Path) -> None:
    write_run(logdir, "c", steps=5, snapshots=[0])
    projection = RunCache(logdir).projection("c.cwrun", 0)
    unlabelled = embedding_figure(type(projection)(**{**projection.__dict__, "labels": None}), "c")
    assert len(unlabelled["data"]) == 1 and unlabelled["layout"]["showlegend"] is False
    many = np.arange(len(projection.xy))  # one class per point
    crowded = embedding_figure(type(projection)(**{**projection.__dict__, "labels": many}), "c")
    assert len(crowded["data"]) == 1 and crowded["data"][0]["marker"]["colorscale"] == "Cividis"
    empty = embedding_figure(None)
    assert empty["data"] == [] and "No embedding" in empty["layout"]["annotations"][0]["text"]
    assert embedding_caption(None) == ""


def test_rank_and_class_geometry_panels_do_not_share_a_scale(logdir: Path) -> None:
    frame = metrics_frame(range(40))  # num_classes 4 and the geometry on every 10th step
    writer = RunWriter(logdir / "g.cwrun", {"margin": 0.2, "embedding_dim": 8})
    writer.append_metrics(frame)
    writer.close()
    figure, _ = panels_figure([RunCache(logdir).view("g.cwrun")], {"g.cwrun": "#0072B2"}, 2000)
    rank = _series(figure, "rank")
    # The detector's reference, min(C − 1, D, N − 1) = min(3, 8, 31), on the rank's rows.
    assert rank["rank the classes need"]["y"] == [3.0] * 4
    assert rank["rank the classes need"]["x"] == rank["effective rank"]["x"] == [0, 10, 20, 30]
    geometry = {label: t["y"] for label, t in _series(figure, "geometry").items()}
    assert geometry["within-class variance share"] == [0.3] * 4
    assert geometry["alignment"] == [0.6] * 4 and geometry["uniformity"] == [-2.2] * 4
    # Told apart by marker shape as well as dash, and the title names each shape.
    symbols = [t["marker"]["symbol"] for t in _series(figure, "geometry").values()]
    assert len(set(symbols)) == 3
    dashes = [t["line"].get("dash", "solid") for t in _series(figure, "geometry").values()]
    assert len(set(dashes)) == 3
    json.dumps(figure, allow_nan=False)


def test_two_embedding_widths_label_their_healthy_std_apart(logdir: Path) -> None:
    write_run(logdir, "narrow", steps=5, metadata={"embedding_dim": 16})
    write_run(logdir, "wide", steps=5, metadata={"embedding_dim": 32})
    cache = RunCache(logdir)
    views = [cache.view("narrow.cwrun"), cache.view("wide.cwrun")]
    figure, _ = panels_figure(views, run_colours(["narrow.cwrun", "wide.cwrun"]), 100)
    labels = [a for a in figure["layout"]["annotations"] if a["text"].startswith("healthy 1/√")]
    assert [a["text"].split(" =")[0] for a in labels] == ["healthy 1/√16", "healthy 1/√32"]
    assert len({a["x"] for a in labels}) == 2  # side by side, never printed over each other
