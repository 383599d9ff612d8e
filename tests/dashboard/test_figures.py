"""Figures: the step-aligned panels, their live extension, the embedding scatter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import plotly.io as pio
import pytest
from collapsewatch.dashboard.data import RunCache
from collapsewatch.dashboard.figures import (
    LABEL_COLOURS,
    OKABE_ITO,
    RUN_COLOURS,
    STATE_COLOURS,
    TEMPLATE_NAME,
    embedding_caption,
    embedding_figure,
    panels_extension,
    panels_figure,
    register_template,
    run_colours,
)

from collapsewatch.store import RunWriter
from tests.dashboard.runs import collapsed_event, metrics_frame, write_run


def _traces(figure: dict, name: str) -> list[dict]:
    return [t for t in figure["data"] if t.get("name") == name]


def _by_axis(figure: dict, axis: str) -> list[dict]:
    return [t for t in figure["data"] if t["yaxis"] == axis]


def test_one_template_registered_once_and_used() -> None:
    template = register_template()
    assert register_template() is template is pio.templates[TEMPLATE_NAME]
    figure, _ = panels_figure([], {}, 100)
    assert figure["layout"]["template"]["layout"]["colorway"] == list(RUN_COLOURS)
    assert embedding_figure(None)["layout"]["template"] == figure["layout"]["template"]


def test_palette_is_okabe_ito_and_states_are_distinct() -> None:
    assert set(RUN_COLOURS) <= set(OKABE_ITO.values())
    assert OKABE_ITO["yellow"] not in RUN_COLOURS  # too light on white
    assert len(set(STATE_COLOURS.values())) == len(STATE_COLOURS)
    assert len(set(LABEL_COLOURS)) == len(LABEL_COLOURS)
    assert run_colours(["b", "a"]) == {"a": RUN_COLOURS[0], "b": RUN_COLOURS[1]}


def test_panels_for_a_collapsed_run(logdir: Path) -> None:
    write_run(logdir, "c", steps=100, collapse_at=60)
    view = RunCache(logdir).view("c.cwrun")
    figure, trace_map = panels_figure([view], {"c.cwrun": "#0072B2"}, 2000)
    layout = figure["layout"]
    # Four panels on one shared step axis.
    assert {t["xaxis"] for t in figure["data"]} == {"x"}
    assert layout["xaxis"]["title"]["text"] == "training step"
    assert layout["yaxis6"]["type"] == "log"
    assert layout["yaxis7"]["range"] == [0, 1]
    # The plateau line at loss/margin = 1.0.
    assert any(s["yref"] == "y5" and s["y0"] == s["y1"] == 1.0 for s in layout["shapes"])
    # The healthy value of std_of_l2_normalized, 1/√D.
    assert any(
        s["yref"] == "y8" and math.isclose(s["y0"], 1 / math.sqrt(8)) for s in layout["shapes"]
    )
    # The collapse span, shaded in all four panels, open to the last step.
    shades = [figure["data"][i] for i in trace_map["c.cwrun"]["shade"]]
    assert [t["yaxis"] for t in shades] == ["y", "y2", "y3", "y4"]
    assert all(t["fill"] == "tozeroy" and t["x"] == [60, 60, 99] for t in shades)
    assert trace_map["c.cwrun"]["open"] is True
    # Stacked difficulty fractions, one stack per run.
    fractions = _by_axis(figure, "y7")
    assert [t["stackgroup"] for t in fractions] == ["difficulty:c.cwrun"] * 3
    # Effective rank only where it was computed (every 10th step here).
    rank = _by_axis(figure, "y9")[0]
    assert rank["x"] == list(range(0, 100, 10))
    # The legend names the run once; its events are marked.
    assert [t["name"] for t in figure["data"] if t.get("showlegend")] == ["c"]
    assert _traces(figure, "c events")[0]["x"] == [60]
    json.dumps(figure)  # plain JSON: no NaN, no NumPy


def test_a_closed_span_is_shaded_between_collapse_and_recovery(logdir: Path) -> None:
    write_run(logdir, "r", steps=100, collapse_at=30, recover_at=50)
    view = RunCache(logdir).view("r.cwrun")
    figure, trace_map = panels_figure([view], {"r.cwrun": "#000000"}, 2000)
    shade = figure["data"][trace_map["r.cwrun"]["shade"][0]]
    assert shade["x"] == [30, 30, 50, 50] and shade["y"] == [0, 1, 1, 0]
    assert trace_map["r.cwrun"]["open"] is False


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


def test_nan_becomes_null_not_invalid_json(logdir: Path) -> None:
    writer = RunWriter(logdir / "n.cwrun", {"margin": 0.2})
    frame = metrics_frame(range(5))
    frame.loc[2, "mean_pairwise_distance"] = np.nan
    frame.loc[3, "loss_margin_ratio"] = np.inf
    writer.append_metrics(frame)
    writer.close()
    figure, _ = panels_figure([RunCache(logdir).view("n.cwrun")], {"n.cwrun": "#000000"}, 100)
    mpd = _by_axis(figure, "y6")[0]
    assert mpd["y"][2] is None
    ratio = _by_axis(figure, "y5")[0]
    assert 3 not in ratio["x"]  # a row with only an infinite value is not plotted
    json.dumps(figure, allow_nan=False)


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
    writer.close()
    json.dumps(extend, allow_nan=False)


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


def test_rank_panel_draws_the_class_geometry_beside_the_rank(logdir: Path) -> None:
    frame = metrics_frame(range(40))
    rank_steps = frame["step"] % 10 == 0
    for column, value in {
        "num_classes": 4.0,
        "within_class_variance_ratio": 0.3,
        "alignment": 0.5,
        "uniformity": -2.5,
    }.items():
        frame[column] = np.where(rank_steps, value, np.nan)
    writer = RunWriter(logdir / "g.cwrun", {"margin": 0.2, "embedding_dim": 8})
    writer.append_metrics(frame)
    writer.close()
    figure, _ = panels_figure([RunCache(logdir).view("g.cwrun")], {"g.cwrun": "#0072B2"}, 2000)
    right = {t["hovertemplate"].split(" %")[0]: t for t in _by_axis(figure, "y9")}
    # The detector's reference, min(C − 1, D, N − 1) = min(3, 8, 31), on the rank's rows.
    assert right["rank the classes need"]["y"] == [3.0] * 4
    assert right["rank the classes need"]["x"] == right["effective rank"]["x"] == [0, 10, 20, 30]
    left = {t["hovertemplate"].split(" %")[0]: t["y"] for t in _by_axis(figure, "y8")}
    assert left["within-class variance share"] == [0.3] * 4
    assert left["alignment"] == [0.5] * 4 and left["uniformity"] == [-2.5] * 4
    json.dumps(figure, allow_nan=False)
