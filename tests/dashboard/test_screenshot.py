"""The README screenshot tool (`tests/dashboard/screenshot.py`): the whole settled page,
written where it is told."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CHROMIUM, browser_required

pytestmark = pytest.mark.browser


def test_the_screenshot_is_the_whole_page_written_where_told(tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file() and not browser_required():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    out = tmp_path / "shot.png"  # never docs/dashboard.png from a test
    command = [sys.executable, "-m", "tests.dashboard.screenshot", "--out", str(out)]
    command += ["--chromium", CHROMIUM]
    # From the checkout's root, as `make screenshot` runs it: the tool is not in the package.
    root = Path(__file__).resolve().parents[2]
    subprocess.run(command, check=True, timeout=300, capture_output=True, cwd=root)
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])  # the IHDR chunk
    assert width == 1400 and height > 1200  # the full page, not the 1000 px viewport
