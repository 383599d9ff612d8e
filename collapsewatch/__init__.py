"""collapsewatch: catch embedding collapse while metric-learning models train.

``watch(model, loss_fn)`` records collapse statistics from an existing training loop into a
run file; ``load_run`` reads it back; the detector flags the loss plateau at the margin.

The exports are loaded on first use (PEP 562): the read side (the CLI, the dashboard, the
report, ``load_run`` and ``analyze``) needs only numpy, pandas and sqlite3, so reading a run
never pays for importing torch. ``watch`` and ``losses`` import it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from collapsewatch._version import __version__

if TYPE_CHECKING:
    from collapsewatch import losses
    from collapsewatch.columns import METRIC_COLUMNS
    from collapsewatch.detect import CollapseDetector, DetectorConfig, Verdict, analyze
    from collapsewatch.options import WatchOptions
    from collapsewatch.rescue import Rescue
    from collapsewatch.store import Run, RunFileError, RunReader, list_runs, load_run
    from collapsewatch.watch import CollapseError, CollapseWarning, Watcher, watch

# Public name → the module that defines it.
_EXPORTS = {
    "METRIC_COLUMNS": "collapsewatch.columns",
    "CollapseDetector": "collapsewatch.detect",
    "CollapseError": "collapsewatch.watch",
    "CollapseWarning": "collapsewatch.watch",
    "DetectorConfig": "collapsewatch.detect",
    "Rescue": "collapsewatch.rescue",
    "Run": "collapsewatch.store",
    "RunFileError": "collapsewatch.store",
    "RunReader": "collapsewatch.store",
    "Verdict": "collapsewatch.detect",
    "WatchOptions": "collapsewatch.options",
    "Watcher": "collapsewatch.watch",
    "analyze": "collapsewatch.detect",
    "list_runs": "collapsewatch.store",
    "load_run": "collapsewatch.store",
    "watch": "collapsewatch.watch",
}
_SUBMODULES = frozenset({"losses"})

__all__ = [
    "METRIC_COLUMNS",
    "CollapseDetector",
    "CollapseError",
    "CollapseWarning",
    "DetectorConfig",
    "Rescue",
    "Run",
    "RunFileError",
    "RunReader",
    "Verdict",
    "WatchOptions",
    "Watcher",
    "__version__",
    "analyze",
    "list_runs",
    "load_run",
    "losses",
    "watch",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"collapsewatch.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'collapsewatch' has no attribute {name!r}")
    loaded = importlib.import_module(module)
    # Bind every export of that module now: importing ``collapsewatch.watch`` has just set the
    # package attribute ``watch`` to the submodule, which must not shadow the function.
    for export, home in _EXPORTS.items():
        if home == module:
            globals()[export] = getattr(loaded, export)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """This package, with one guard: importing the submodule ``collapsewatch.watch`` (from
    anywhere) makes the import system set the package attribute ``watch`` to that module,
    which would shadow the ``watch`` function exported under the same name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return  # the export is bound by __getattr__ on first use
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
