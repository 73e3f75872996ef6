# `make serve` and `make test` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel here; on a CUDA box use e.g. `make TORCH_SPEC='torch>=2.3' serve` (or a cu12x index).
TORCH_SPEC ?= torch==2.13.0
DEMO_MODEL := models/digits.pt2
CONFIG ?= configs/default.toml

.PHONY: serve test lint typecheck unit integration gpu docs bench bench-peers perf-analyzer clean

# Serving needs the runtime and the demo's scikit-learn only; the test tools, Ray and the
# linters come with `make test`.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so that resolving the project never pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev,demo]"
	touch $@

$(DEMO_MODEL): scripts/make_demo_model.py | $(VENV)/.installed
	$(PY) scripts/make_demo_model.py --out $(dir $(DEMO_MODEL))

# More flags for `make serve`: make serve ARGS="--port 9000"
ARGS ?=

serve: $(VENV)/.installed $(DEMO_MODEL)
	$(PY) -m gpuserve serve --config $(CONFIG) $(ARGS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.dev-installed
	$(VENV)/bin/mypy

# The tiers (tests/tiers.py): unit needs no sockets or processes and takes seconds;
# integration starts real servers, processes and clients on loopback.
unit: $(VENV)/.dev-installed $(DEMO_MODEL)
	$(PY) -m pytest -m unit

integration: $(VENV)/.dev-installed $(DEMO_MODEL) perf-analyzer
	$(PY) -m pytest -m integration

# The GPU check's correctness sections as tests, on a machine with a CUDA GPU.
gpu: $(VENV)/.dev-installed $(DEMO_MODEL)
	$(PY) -m pytest -m gpu

# Everything: the linters, the type check and every tier.
test: lint typecheck $(DEMO_MODEL) perf-analyzer
	$(PY) -m pytest

# The settings table of docs/configuration.md, from the settings classes' descriptions.
docs: $(VENV)/.installed
	$(PY) -m gpuserve.settings_docs docs/configuration.md

# Triton's perf_analyzer in .perf/, for its test; never fails: where it cannot be installed,
# .perf/why says why and the test skips saying so.
perf-analyzer: $(VENV)/.installed
	PYTHON=$(PY) scripts/perf_analyzer_setup.sh

# Needs wrk (Debian: apt-get install wrk). bench: the quick load test; bench-peers: the full
# side-by-side comparison with LitServe and a naive server (about 15 minutes).
bench: $(VENV)/.dev-installed $(DEMO_MODEL)
	$(PY) scripts/load_test.py

bench-peers: $(VENV)/.dev-installed
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) scripts/bench.py --repeats 2

clean:
	rm -rf $(VENV) models .mypy_cache .ruff_cache .pytest_cache .perf
