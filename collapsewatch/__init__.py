"""collapsewatch: catch embedding collapse while metric-learning models train.

``watch(model, loss_fn)`` records collapse statistics from an existing training loop into a
run file; ``load_run`` reads it back; the detector flags the loss plateau at the margin.
"""

from collapsewatch import losses
from collapsewatch._version import __version__
from collapsewatch.detect import CollapseDetector, DetectorConfig, Verdict, analyze
from collapsewatch.statistics import METRIC_COLUMNS
from collapsewatch.store import Run, RunFileError, RunReader, list_runs, load_run
from collapsewatch.watch import CollapseError, CollapseWarning, Watcher, watch

__all__ = [
    "METRIC_COLUMNS",
    "CollapseDetector",
    "CollapseError",
    "CollapseWarning",
    "DetectorConfig",
    "Run",
    "RunFileError",
    "RunReader",
    "Verdict",
    "Watcher",
    "__version__",
    "analyze",
    "list_runs",
    "load_run",
    "losses",
    "watch",
]
