"""How to spell the ``collapsewatch`` command in what the package prints, so that it runs as
printed from the current directory (a newcomer's venv is often not activated)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path


def command_name() -> str:
    """``collapsewatch`` when that is on PATH and is this environment's script; else that
    script's path (e.g. ``.venv/bin/collapsewatch``: the one being run, or the one installed
    beside this interpreter); else ``python -m collapsewatch`` with this interpreter."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    script = (
        program
        if program.name == "collapsewatch" and program.is_file()
        else Path(sysconfig.get_path("scripts")) / "collapsewatch"
    )
    if not script.is_file():
        return f"{shlex.quote(sys.executable)} -m collapsewatch"
    found = shutil.which("collapsewatch")
    if found is not None and Path(found).resolve() == script.resolve():
        return "collapsewatch"
    relative = os.path.relpath(script.absolute())
    return shlex.quote(str(script.absolute()) if relative.startswith("..") else relative)
