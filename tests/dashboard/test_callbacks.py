"""Callback logic, called as plain functions, and the callbacks wired into a real app."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from collapsewatch.dashboard import create_app
from collapsewatch.dashboard.callbacks import (
    default_selection,
    embedding_controls_update,
    embedding_update,
    panels_update,
    run_list_update,
    slider_marks,
)
from collapsewatch.dashboard.data import RunCache
from collapsewatch.dashboard.layout import ID

from collapsewatch.store import RunReader, RunWriter
from tests.dashboard.runs import (
    collapsed_event,
    metrics_frame,
    recovered_event,
    settle,
    warning_event,
    write_broken,
    write_run,
)


def _raw_text(component: Any) -> str:
    if component is None:
        return ""
    if isinstance(component, str | int | float):
        return str(component)
    if isinstance(component, list | tuple):
        return " ".join(_raw_text(c) for c in component)
    return _raw_text(getattr(component, "children", None))


def _text(component: Any) -> str:
    """All the text in a Dash component tree, whitespace collapsed."""
    return " ".join(_raw_text(component).split())


def _props(component: Any, name: str) -> list:
    """Values of a (data-*) property anywhere in a component tree."""
    found = []
    if isinstance(component, list | tuple):
        for child in component:
            found += _props(child, name)
    elif hasattr(component, "to_plotly_json"):
        props = component.to_plotly_json()["props"]
        if name in props:
            found.append(props[name])
        found += _props(props.get("children"), name)
    return found


# -- run list, banners, error cards ------------------------------------------------------


def test_run_list_selects_recent_runs_once_then_leaves_the_selection_alone(logdir: Path) -> None:
    cache = RunCache(logdir, list_ttl=0)
    first = run_list_update(cache, [], ready=False)
    assert first.value is None and first.ready is False and first.options == []
    assert "waiting" in first.count

    write_run(logdir, "a")
    write_run(logdir, "b")
    update = run_list_update(cache, [], ready=False)
    assert update.value == ["a.cwrun", "b.cwrun"] and update.ready is True
    # The user unticks everything: that choice stands.
    assert run_list_update(cache, [], ready=True).value is None
    # A run whose file disappears leaves the selection.
    os.remove(logdir / "b.cwrun")
    assert run_list_update(cache, ["a.cwrun", "b.cwrun"], ready=True).value == ["a.cwrun"]


def test_default_selection_prefers_recently_updated_runs(logdir: Path) -> None:
    for i in range(6):
        write_run(logdir, f"r{i}", metadata={})
    listing = RunCache(logdir).run_list()
    assert len(default_selection(listing, limit=4)) == 4


def test_run_list_rows_show_state_loss_margin_steps_and_age(logdir: Path) -> None:
    write_run(logdir, "collapsing", steps=80, collapse_at=40, status="running")
    write_run(logdir, "fine", steps=30)
    write_broken(logdir, "broken")
    update = run_list_update(RunCache(logdir), ["fine.cwrun"], ready=True)
    by_value = {o["value"]: o for o in update.options}
    assert set(by_value) == {"broken.cwrun", "collapsing.cwrun", "fine.cwrun"}
    text = _text(by_value["collapsing.cwrun"]["label"])
    for piece in ("collapsing", "collapsed", "loss 0.2", "margin 0.2", "step 79", "running"):
        assert piece in text
    assert "✖" in text  # the state is a symbol and a word, not just a colour
    assert _props(by_value["fine.cwrun"]["label"], "data-state")[0] == "healthy"
    assert by_value["broken.cwrun"]["disabled"] is True
    assert "error" in _text(by_value["broken.cwrun"]["label"])
    # The plotted run shows its plot colour; the others an empty swatch.
    swatches = _props(by_value["fine.cwrun"]["label"], "style")
    assert any("background" in s for s in swatches)


def test_banner_for_a_collapsed_run_and_none_for_a_healthy_one(logdir: Path) -> None:
    write_run(logdir, "collapsing", steps=80, collapse_at=42)
    write_run(logdir, "fine", steps=30)
    write_run(logdir, "recovered", steps=80, collapse_at=20, recover_at=50)
    update = run_list_update(RunCache(logdir), [], ready=False)
    assert len(update.banners) == 1
    banner = update.banners[0]
    assert _props(banner, "data-run") == ["collapsing.cwrun"]
    text = _text(banner)
    assert "collapsing" in text and "collapsed at step 42" in text
    assert _props(banner, "data-onset") == ["42"]
    # The evidence and what to try.
    for piece in ("loss / margin 1", "mean pairwise distance 0.002", "peak mean pairwise"):
        assert piece in text
    assert "Try:" in text and "Lower the learning rate." in text


def test_a_run_in_warning_gets_a_smaller_banner(logdir: Path) -> None:
    write_run(logdir, "warned", events=[warning_event(10)])
    update = run_list_update(RunCache(logdir), [], ready=False)
    assert [b.to_plotly_json()["props"]["data-state"] for b in update.banners] == ["warning"]
    assert "warning at step 10" in _text(update.banners)


def test_broken_run_files_become_error_cards(logdir: Path) -> None:
    write_run(logdir, "fine")
    write_broken(logdir, "garbage", "garbage")
    write_broken(logdir, "foreign", "foreign")
    update = run_list_update(RunCache(logdir), [], ready=False)
    assert update.value == ["fine.cwrun"]  # unreadable runs are never selected
    assert [_props(c, "data-run") for c in update.errors] == [["foreign.cwrun"], ["garbage.cwrun"]]
    assert "not a collapsewatch run" in _text(update.errors)


# -- panels ----------------------------------------------------------------------------


def test_panels_rebuild_then_extend_then_rebuild_on_a_new_event(logdir: Path) -> None:
    writer = RunWriter(logdir / "live.cwrun", {"margin": 0.2, "embedding_dim": 8})
    writer.append_metrics(metrics_frame(range(10)))
    writer.commit()
    cache = RunCache(logdir, min_refresh=0)

    first = panels_update(cache, ["live.cwrun"], None, 2000)
    assert first.rebuilt and first.figure is not None and first.extend is None
    state = json.loads(json.dumps(first.state))  # it round-trips through the browser
    assert state["runs"]["live.cwrun"]["last"] == 9

    idle = panels_update(cache, ["live.cwrun"], state, 2000)
    assert (idle.figure, idle.extend, idle.state) == (None, None, None)

    writer.append_metrics(metrics_frame(range(10, 14)))
    writer.commit()
    grown = panels_update(cache, ["live.cwrun"], state, 2000)
    assert grown.figure is None and not grown.rebuilt
    update, indices = grown.extend
    ratio = state["runs"]["live.cwrun"]["traces"]["loss_margin_ratio"]
    assert update["x"][indices.index(ratio)] == [10, 11, 12, 13]
    assert grown.errors is None and grown.events is None  # untouched on an extension
    state = json.loads(json.dumps(grown.state))
    assert state["runs"]["live.cwrun"]["last"] == 13
    assert state["runs"]["live.cwrun"]["appended"] == 4

    writer.append_metrics(metrics_frame(range(14, 16), collapse_at=14))
    writer.append_events([collapsed_event(14)])
    writer.commit()
    flagged = panels_update(cache, ["live.cwrun"], state, 2000)
    assert flagged.rebuilt and flagged.extend is None  # the shading needs a new layout
    assert "collapsed" in _text(flagged.events)
    writer.close()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s["runs"].clear(),
        lambda s: s["runs"]["a.cwrun"].update(last="x", appended=None),
        lambda s: s["runs"]["a.cwrun"].update(traces=[]),
        lambda s: s.update(runs=None),
    ],
)
def test_a_mangled_panel_state_from_the_browser_just_rebuilds(logdir: Path, mangle) -> None:
    write_run(logdir, "a")
    cache = RunCache(logdir, min_refresh=0)
    state = json.loads(json.dumps(panels_update(cache, ["a.cwrun"], None, 2000).state))
    mangle(state)
    writer = RunWriter(logdir / "b.cwrun", {})  # unrelated activity in the log directory
    writer.close()
    update = panels_update(cache, ["a.cwrun"], state, 2000)
    assert update.rebuilt or (update.figure, update.extend) == (None, None)


def test_a_selection_change_rebuilds(logdir: Path) -> None:
    write_run(logdir, "a")
    write_run(logdir, "b")
    cache = RunCache(logdir)
    state = panels_update(cache, ["a.cwrun"], None, 2000).state
    both = panels_update(cache, ["a.cwrun", "b.cwrun"], state, 2000)
    assert both.rebuilt
    names = {t["name"] for t in both.figure["data"] if t.get("showlegend")}
    assert names == {"a", "b"}


def test_a_long_run_is_rebuilt_once_its_live_tail_outgrows_a_quarter_budget(logdir: Path) -> None:
    max_points = 100
    writer = RunWriter(logdir / "long.cwrun", {"margin": 0.2})
    writer.append_metrics(metrics_frame(range(1000)))
    writer.commit()
    cache = RunCache(logdir, min_refresh=0)
    state = panels_update(cache, ["long.cwrun"], None, max_points).state
    step = 1000
    for _ in range(2):  # 2 × 10 new rows: under the 25-row allowance, extended
        writer.append_metrics(metrics_frame(range(step, step + 10)))
        writer.commit()
        step += 10
        update = panels_update(cache, ["long.cwrun"], state, max_points)
        assert update.extend is not None and not update.rebuilt
        state = update.state
    writer.append_metrics(metrics_frame(range(step, step + 10)))
    writer.commit()
    update = panels_update(cache, ["long.cwrun"], state, max_points)
    assert update.rebuilt and update.state["runs"]["long.cwrun"]["appended"] == 0
    for trace in update.figure["data"]:
        assert len(trace["x"]) <= 2 * max_points
    writer.close()


def test_panels_of_a_growing_run_equal_panels_from_a_full_read(
    logdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decimation, measured columns and off-scale marks folded poll after poll (each
    paying for its new rows) draw exactly what one read of the whole run draws."""
    max_points, n = 60, 3000
    frame = metrics_frame(range(n), collapse_at=1500, recover_at=1900, diverge_at=2700)
    frame.loc[frame["step"] < 700, "effective_rank"] = np.nan  # a column appearing late
    writer = RunWriter(logdir / "live.cwrun", {"margin": 0.2, "embedding_dim": 8})
    live = RunCache(logdir, min_refresh=0)
    rng = np.random.default_rng(0)
    state, done, rebuilt = None, 0, 0
    while done < n:
        size = int(rng.choice([1, 3, 20, 90, 400]))
        writer.append_metrics(frame.iloc[done : done + size])
        events = {1500: collapsed_event(1500), 1900: recovered_event(1900)}
        writer.append_events([e for s, e in events.items() if done <= s < done + size])
        writer.commit()
        done += size
        update = panels_update(live, ["live.cwrun"], state, max_points)
        state = update.state or state
        if update.figure is not None:
            rebuilt += 1
            fresh = panels_update(RunCache(logdir), ["live.cwrun"], None, max_points)
            assert update.figure == fresh.figure
            assert update.state == fresh.state
    assert rebuilt >= 10  # the collapse, the recovery, the blow-up, and the tail outgrowing
    writer.close()
    # Nothing changed since: the poll sends nothing and opens no file.
    settle(logdir)
    panels_update(live, ["live.cwrun"], state, max_points)
    opened: list[Path] = []
    original = RunReader.__init__
    monkeypatch.setattr(
        RunReader, "__init__", lambda self, path: (opened.append(path), original(self, path))[1]
    )
    quiet = panels_update(live, ["live.cwrun"], state, max_points)
    assert (quiet.figure, quiet.extend, quiet.state, opened) == (None, None, None, [])


def test_panels_reject_traversal_ids_with_an_error_card(logdir: Path) -> None:
    write_run(logdir, "a")
    (logdir.parent / "secret.cwrun").write_text("not for the browser")
    cache = RunCache(logdir)
    bad = ["../../etc/passwd", "../secret.cwrun", "/etc/passwd", None, 7, "a.cwrun"]
    bad += [{"id": "a.cwrun"}, ["a.cwrun"], "x" * 100_000 + ".cwrun", "a.cwrun"]
    update = panels_update(cache, bad, None, 2000)
    assert update.rebuilt
    assert len(update.errors) == 7  # None and the repeated id are dropped; the rest rejected
    assert all(len(_text(card)) < 300 for card in update.errors)  # no echo of huge input
    assert "invalid run id" in _text(update.errors) or "outside" in _text(update.errors)
    assert {t["name"] for t in update.figure["data"] if t.get("showlegend")} == {"a"}


def test_a_selection_that_is_not_a_list_is_handled(logdir: Path) -> None:
    write_run(logdir, "a")
    cache = RunCache(logdir)
    figure = panels_update(cache, "a.cwrun", None, 2000).figure
    assert [t["name"] for t in figure["data"] if t.get("showlegend")] == ["a"]
    assert panels_update(cache, {"a": 1}, None, 2000).errors
    assert run_list_update(cache, "a.cwrun", ready=True).value is None
    assert run_list_update(cache, {"a": 1}, ready=True).value is None


def test_panels_show_an_error_card_for_a_broken_run(logdir: Path) -> None:
    write_run(logdir, "a")
    write_broken(logdir, "broken")
    update = panels_update(RunCache(logdir), ["a.cwrun", "broken.cwrun"], None, 2000)
    assert _props(update.errors, "data-run") == ["broken.cwrun"]
    assert len([t for t in update.figure["data"] if t.get("showlegend")]) == 1


# -- embedding -------------------------------------------------------------------------


def test_slider_marks() -> None:
    assert slider_marks([]) == {}
    assert slider_marks([5]) == {0: "5"}
    marks = slider_marks(list(range(0, 300, 30)), limit=6)
    assert min(marks) == 0 and max(marks) == 9 and len(marks) <= 6
    assert marks[9] == "270"
    assert slider_marks(list(range(0, 12_000, 1000)), limit=4)[0] == "0"


def test_embedding_controls_follow_the_latest_snapshot(logdir: Path) -> None:
    write_run(logdir, "plain")  # no snapshots: not offered
    write_run(logdir, "snap", steps=100, collapse_at=50, snapshots=[0, 30, 60])
    cache = RunCache(logdir, min_refresh=0)
    controls = embedding_controls_update(cache, ["plain.cwrun", "snap.cwrun"], None, None, [])
    assert controls.options == [{"label": "snap", "value": "snap.cwrun"}]
    assert controls.run == "snap.cwrun" and controls.steps == [0, 30, 60]
    assert controls.slider_max == 2 and controls.index == 2
    assert controls.marks == {0: "0", 1: "30", 2: "60"}
    # Nothing changed: no update.
    assert embedding_controls_update(cache, ["snap.cwrun"], "snap.cwrun", 0, [0, 30, 60]) is None
    # A new snapshot while the slider is on the latest one: it follows.
    assert embedding_controls_update(cache, ["snap.cwrun"], "snap.cwrun", 1, [0, 30]).index == 2
    assert embedding_controls_update(cache, ["snap.cwrun"], "snap.cwrun", 0, [0, 30]).index == 0
    empty = embedding_controls_update(cache, [], "snap.cwrun", 2, [0, 30, 60])
    assert empty.run is None and empty.steps == [] and empty.options == []


def test_embedding_view_opens_on_a_collapsed_run(logdir: Path) -> None:
    write_run(logdir, "a-fine", steps=40, snapshots=[0, 30])
    write_run(logdir, "b-collapsed", steps=40, collapse_at=20, snapshots=[0, 30])
    write_run(logdir, "c-recovered", steps=40, collapse_at=10, recover_at=20, snapshots=[0])
    cache = RunCache(logdir)
    ids = ["a-fine.cwrun", "b-collapsed.cwrun", "c-recovered.cwrun"]
    controls = embedding_controls_update(cache, ids, None, None, [])
    assert controls.run == "b-collapsed.cwrun"
    assert len(controls.options) == 3
    # ...but a run the user picked stays picked.
    assert embedding_controls_update(cache, ids, "a-fine.cwrun", 0, []).run == "a-fine.cwrun"


def test_embedding_update(logdir: Path) -> None:
    write_run(logdir, "snap", steps=100, collapse_at=50, snapshots=[0, 30, 60])
    write_broken(logdir, "broken")
    cache = RunCache(logdir)
    figure, caption, errors = embedding_update(cache, "snap.cwrun", 2, [0, 30, 60], "pca")
    assert caption.startswith("Step 60") and errors == [] and len(figure["data"]) == 3
    figure, caption, errors = embedding_update(cache, None, 0, [], "pca")
    assert figure["data"] == [] and caption == "" and errors == []
    _, _, errors = embedding_update(cache, "../../etc/passwd", 0, [0], "pca")
    assert len(errors) == 1
    _, _, errors = embedding_update(cache, "broken.cwrun", 0, [0], "pca")
    assert _props(errors, "data-run") == ["broken.cwrun"]
    # Junk from the browser becomes an error card, never an exception.
    for index, steps, method in [("x", [0], "pca"), (0, ["x"], "pca"), (0, [7], "pca")]:
        _, _, errors = embedding_update(cache, "snap.cwrun", index, steps, method)
        assert len(errors) == 1
    _, _, errors = embedding_update(cache, "snap.cwrun", 0, [0], "umap")
    assert "unknown projection method" in _text(errors)


# -- the wired app -----------------------------------------------------------------------


def test_index_and_layout_are_served(logdir: Path) -> None:
    client = create_app(logdir, interval_ms=1234).server.test_client()
    index = client.get("/")
    assert index.status_code == 200
    assert b"<title>collapsewatch</title>" in index.data
    layout = client.get("/_dash-layout")
    assert layout.status_code == 200
    text = layout.get_data(as_text=True)
    for component_id in (ID.RUN_LIST, ID.PANELS, ID.BANNERS, ID.EMBED_SLIDER):
        assert f'"{component_id}"' in text
    assert '"interval":1234' in text.replace(" ", "")
    assert client.get("/assets/style.css").status_code == 200


def _post_callback(client: Any, output: str, inputs: list, state: list, changed: str) -> Any:
    outputs = [
        {"id": part.rsplit(".", 1)[0], "property": part.rsplit(".", 1)[1]}
        for part in output.strip(".").split("...")
    ]
    body = {
        "output": output,
        "outputs": outputs,
        "inputs": inputs,
        "state": state,
        "changedPropIds": [changed],
    }
    return client.post("/_dash-update-component", json=body)


@pytest.mark.parametrize("max_points", [300, 2000])
def test_the_panel_callback_never_ships_the_whole_table(logdir: Path, max_points: int) -> None:
    n = 100_000
    writer = RunWriter(logdir / "long.cwrun", {"margin": 0.2, "embedding_dim": 8})
    writer.append_metrics(metrics_frame(range(n), collapse_at=80_000))
    writer.append_events([collapsed_event(80_000)])
    writer.close()
    app = create_app(logdir, max_points=max_points)
    output = next(k for k in app.callback_map if f"{ID.PANELS}.figure" in k)
    response = _post_callback(
        app.server.test_client(),
        output,
        inputs=[
            {"id": ID.RUN_LIST, "property": "value", "value": ["long.cwrun"]},
            {"id": ID.INTERVAL, "property": "n_intervals", "value": 0},
        ],
        state=[{"id": ID.PANEL_STATE, "property": "data", "value": None}],
        changed=f"{ID.RUN_LIST}.value",
    )
    assert response.status_code == 200
    figure = response.get_json()["response"][ID.PANELS]["figure"]
    points = [len(t["x"]) for t in figure["data"]]
    assert max(points) <= 2 * max_points
    # ~16 traces × 2 numbers × ≤ 2·max_points points, a few dozen bytes each.
    assert len(response.data) < 40 * 2 * max_points * len(points)
    assert len(response.data) < 5_000_000


def test_the_panel_callback_rejects_traversal_over_http(logdir: Path) -> None:
    app = create_app(logdir)
    output = next(k for k in app.callback_map if f"{ID.PANELS}.figure" in k)
    response = _post_callback(
        app.server.test_client(),
        output,
        inputs=[
            {"id": ID.RUN_LIST, "property": "value", "value": ["../../etc/passwd"]},
            {"id": ID.INTERVAL, "property": "n_intervals", "value": 3},
        ],
        state=[{"id": ID.PANEL_STATE, "property": "data", "value": None}],
        changed=f"{ID.RUN_LIST}.value",
    )
    assert response.status_code == 200
    body = response.get_json()["response"]
    # Nothing plotted: only the empty trace each panel keeps its band with.
    assert [t["x"] for t in body[ID.PANELS]["figure"]["data"]] == [[]] * 12
    (card,) = body[ID.PANEL_ERRORS]["children"]
    assert card["props"]["data-run"] == "../../etc/passwd"
    assert "does not name a .cwrun file" in json.dumps(card)
    assert "root:" not in response.get_data(as_text=True)
