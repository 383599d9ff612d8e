"""The package's import surface: lazy exports, and a read side that never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import collapsewatch
from collapsewatch import columns


def _modules_after(code: str) -> list[str]:
    """The top-level modules a fresh interpreter has imported after running ``code``."""
    report = "import json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    script = f"{code}\n{report}"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        # `collapsewatch --help` exits through SystemExit after printing the usage.
        "import contextlib\nfrom collapsewatch.cli import main\n"
        "with contextlib.suppress(SystemExit):\n    main(['--help'])",
        "import collapsewatch as cw\ncw.load_run, cw.analyze, cw.RunReader, cw.METRIC_COLUMNS",
        "import collapsewatch.dashboard.report",
    ],
    ids=["cli-help", "read-api", "dashboard-and-report"],
)
def test_the_read_side_does_not_import_torch(code: str) -> None:
    assert "torch" not in _modules_after(code)


def test_the_training_side_imports_torch_on_first_use() -> None:
    assert "torch" in _modules_after("import collapsewatch as cw\ncw.watch")


def test_every_export_resolves_to_its_defining_module() -> None:
    for name in collapsewatch.__all__:
        value = getattr(collapsewatch, name)
        assert value is not None, name
    assert collapsewatch.watch.__module__ == "collapsewatch.watch"
    assert collapsewatch.losses.__name__ == "collapsewatch.losses"
    assert set(dir(collapsewatch)) >= set(collapsewatch.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = collapsewatch.nope


def test_column_sets_are_derived_from_one_declaration() -> None:
    names = [c.name for c in columns.COLUMNS]
    assert len(names) == len(set(names))
    assert tuple(names) == columns.METRIC_COLUMNS
    assert set(columns.LABEL_COLUMNS) == {
        "mean_between_class_distance",
        "num_classes",
        "within_class_variance_ratio",
        "alignment",
    }
    assert set(columns.MARGIN_RELATIVE) == {"frac_easy", "frac_semihard", "frac_positive_loss"}
    assert "uniformity" in columns.RANK_STEP_COLUMNS
    assert "uniformity" not in columns.LABEL_COLUMNS
    assert columns.label("loss_margin_ratio") == "loss / margin"
    assert columns.label("some_new_thing") == "some new thing"


def test_importing_the_watch_submodule_first_does_not_shadow_the_function() -> None:
    code = (
        "import collapsewatch.watch as module_first\n"
        "import collapsewatch as cw\n"
        "import sys\n"
        "assert callable(cw.watch) and cw.watch.__name__ == 'watch', cw.watch\n"
        "assert sys.modules['collapsewatch.watch'].watch is cw.watch\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    ("value", "digits", "shown"),
    [
        (None, 4, "–"),
        (float("nan"), 4, "–"),
        (True, 4, "–"),  # a flag is not a measurement
        (0.123456, 4, "0.1235"),
        (0.123456, 3, "0.123"),
        (1234567.0, 4, "1.235e+06"),
        (1234567, 4, "1,234,567"),  # counts and steps in full
        (float("inf"), 4, "inf"),
        (-float("inf"), 4, "-inf"),
        ("n/a", 4, "n/a"),
    ],
)
def test_one_number_format_for_every_medium(value: object, digits: int, shown: str) -> None:
    assert columns.format_number(value, digits) == shown


def test_the_number_format_reads_numpy_scalars_as_numbers() -> None:
    import numpy as np

    assert columns.format_number(np.float32(0.5)) == "0.5"
    assert columns.format_number(np.int64(12345)) == "12,345"
    assert columns.format_number(np.float64("nan")) == "–"
