# `make demo` and `make test` bootstrap what they need into .venv on a machine that has only
# Python 3: the demo the package and its runtime dependencies, the tests the test extras too.
# Torch is installed first, on its own, so that pip never resolves the plain `torch`
# requirement to a multi-GB CUDA build: PyTorch's CPU-only index is offered beside the
# package index (where it cannot be reached, the package index or a local wheel is used).
# A CUDA build: `make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128` (or
# TORCH_INDEX= for whatever the package index gives); TORCH_SPEC picks the version.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
RUNTIME_STAMP := $(VENV)/.collapsewatch-runtime
STAMP := $(VENV)/.collapsewatch-installed
PYTEST_ARGS ?=
WHERE := @echo "the collapsewatch command: $(BIN)/collapsewatch (or first: source $(BIN)/activate)"

.PHONY: install install-runtime test lint demo bench browser clean

install: $(STAMP)
install-runtime: $(RUNTIME_STAMP)

$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install \
		--retries 0 --timeout 10 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
		"$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e .
	touch $@
	$(WHERE)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/python -m pip install -e ".[test]"
	touch $@
	$(WHERE)

# Debian's Chromium for the end-to-end dashboard tests; without it (and without root to
# install it) those tests skip, unless COLLAPSEWATCH_REQUIRE_BROWSER=1 makes them fail.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y --no-install-recommends chromium chromium-driver \
		|| { apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver; }; \
	else echo "chromium not found and cannot be installed here: browser tests will skip"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy

test: $(STAMP) browser lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Two digits runs side by side, the dashboard served while they train (Ctrl-C to stop).
demo: $(RUNTIME_STAMP)
	$(BIN)/collapsewatch demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_losses.py
	$(BIN)/python benchmarks/bench_watch.py

# docs/dashboard.png (the README's) and docs/screenshots/*.png, the cases the readability
# tests assert on, regenerated from the code in headless Chromium.
.PHONY: screenshot
screenshot: $(STAMP)
	$(BIN)/python -m tests.dashboard.screenshot --out docs/dashboard.png
	COLLAPSEWATCH_SCREENSHOTS=docs/screenshots COLLAPSEWATCH_REQUIRE_BROWSER=1 \
		$(BIN)/python -m pytest -q tests/dashboard/test_readability.py tests/test_report.py \
		tests/dashboard/test_browser.py -k "1024 or 200_run_sweep"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
