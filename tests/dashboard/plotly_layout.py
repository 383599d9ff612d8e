"""Reading a rendered plotly figure back in the browser: where each panel really is.

Plotly computes each axis's pixel band (``_offset`` from the top, ``_length``) in
``gd._fullLayout``; these helpers read those bands, the traces with data on each panel's
axis, and the on-screen boxes of the titles, legends and toolbar, and assert what a reader
needs: every panel in its own band, showing its data, nothing cut or covered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from collapsewatch.dashboard.figures import PANELS, data_axis

# For a figure div ``gd`` and the panels' data axis names: each panel's band and how many
# of its traces hold ≥ 2 finite points; every annotation's box; the legends' and toolbar's
# boxes; the figure's box. Boxes are client rectangles {left, top, right, bottom}.
READ_LAYOUT = """
([selector, axes]) => {
  const gd = document.querySelector(selector);
  const L = gd._fullLayout;
  const box = (el) => { const r = el.getBoundingClientRect();
    return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; };
  const finite = (t) => Array.from(t.y || []).filter(v => v !== null && Number.isFinite(+v)).length;
  const panels = axes.map(name => {
    const ax = L['yaxis' + name.slice(1)];
    if (!ax) return {axis: name, missing: true, withData: -1};
    const traces = gd._fullData.filter(t => t.yaxis === name && t.visible === true);
    return {axis: name, offset: ax._offset, length: ax._length, range: ax.range,
            withData: traces.filter(t => finite(t) >= 2).length};
  });
  return {
    panels,
    figure: box(gd.querySelector('.main-svg')),
    annotations: [...gd.querySelectorAll('.annotation')].map(a => ({
      text: a.textContent, box: box(a.querySelector('.annotation-text') || a)})),
    legends: [...gd.querySelectorAll('.legend')].map(box),
    modebar: gd.querySelector('.modebar') ? box(gd.querySelector('.modebar')) : null,
    // Event and off-scale markers: drawn unclipped, their centres inside the figure.
    marks: gd._fullData.filter(t => / (events|off scale)$/.test(t.name)).map(t => {
      const xa = L.xaxis, ya = L['yaxis' + t.yaxis.slice(1)];
      return {name: t.name, cliponaxis: t.cliponaxis,
              x: Array.from(t.x).map(v => xa._offset + xa.l2p(v)),
              y: Array.from(t.y).map(v => ya._offset + ya.l2p(v))}; }),
    width: L.width, height: L.height,
  };
}
"""


# Ten runs rebuilt after each click on a machine shared by many: generous, and a condition
# that holds ends the wait at once.
WAIT_MS = 45_000


def read_layout(page: Any, selector: str) -> dict[str, Any]:
    """What :data:`READ_LAYOUT` reports for the figure matched by ``selector``."""
    axes = [data_axis(i) for i in range(len(PANELS))]
    return page.evaluate(READ_LAYOUT, [selector, axes])


def wait_for_panels(page: Any, selector: str, with_data: dict[str, int]) -> dict[str, Any]:
    """Wait until each panel holds ``with_data[key]`` traces with data (others none), then
    return :func:`read_layout`. A condition, not a fixed sleep: a busy machine only waits
    longer."""
    axes = [data_axis(i) for i in range(len(PANELS))]
    wanted = [with_data.get(p.key, 0) for p in PANELS]
    page.wait_for_function(
        f"([selector, axes, wanted]) => {{ const gd = document.querySelector(selector);"
        f" if (!gd || !gd._fullLayout || !gd._fullData) return false;"
        f" const r = ({READ_LAYOUT})([selector, axes]);"
        f" return r.panels.every((p, i) => p.withData === wanted[i]); }}",
        arg=[selector, axes, wanted],
        timeout=WAIT_MS,
    )
    return read_layout(page, selector)


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return (
        a["left"] < b["right"]
        and b["left"] < a["right"]
        and a["top"] < b["bottom"]
        and (b["top"] < a["bottom"])
    )


def assert_readable(layout: dict[str, Any], with_data: dict[str, int]) -> None:
    """Every panel has its own band, in panel order, holding the data it should; every
    annotation (titles, notes, reference labels) lies whole inside the figure; no legend
    sits under the toolbar."""
    panels = layout["panels"]
    assert len(panels) == len(PANELS)
    for panel, above, below in zip(PANELS, panels, [*panels[1:], None], strict=True):
        assert above["length"] > 40, (panel.key, above)  # a band a person can read
        if below is not None:  # bands top to bottom, none overlapping the next
            assert above["offset"] + above["length"] < below["offset"], (panel.key, panels)
    for panel, found in zip(PANELS, panels, strict=True):
        assert found["withData"] == with_data.get(panel.key, 0), (panel.key, found)
    figure = layout["figure"]
    for annotation in layout["annotations"]:
        b = annotation["box"]
        inside = b["left"] >= figure["left"] - 0.5 and b["right"] <= figure["right"] + 0.5
        assert inside, f"clipped: {annotation['text']!r} {b} in {figure}"
    for marks in layout["marks"]:
        assert marks["cliponaxis"] is False, marks["name"]
        assert all(6 <= x <= layout["width"] - 6 for x in marks["x"]), marks
        assert all(6 <= y <= layout["height"] - 6 for y in marks["y"]), marks
    if layout["modebar"] is not None:
        for legend in layout["legends"]:
            assert not _overlap(legend, layout["modebar"]), (legend, layout["modebar"])


def save_screenshot(page: Any, name: str) -> None:
    """Save the page as ``$COLLAPSEWATCH_SCREENSHOTS/name.png`` when that is set (``make
    screenshots`` sets it to docs/screenshots); otherwise do nothing."""
    folder = os.environ.get("COLLAPSEWATCH_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        try:  # 256 colours: a third of the size, and these are flat-coloured charts
            from PIL import Image
        except ImportError:
            return
        with Image.open(path) as image:
            small = image.convert("RGB").quantize(256)
        small.save(path, optimize=True)
