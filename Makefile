# `make run`  : set up (first time) and launch the app on the bundled example data.
# `make test` : set up (first time) and run every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
HOST ?= 0.0.0.0
PORT ?= 7860
# Optional torch wheel index, e.g. https://download.pytorch.org/whl/cpu (default: pip's index).
TORCH_INDEX ?=

.PHONY: setup setup-test run test bench-cpu clean

setup: $(STAMP)

$(STAMP): requirements.txt .ci/install-python-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PYTHON=$(PY) bash .ci/install-python-deps all $(TORCH_INDEX)
	touch $@

setup-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP) requirements-dev.txt requirements-batch.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	bash .ci/install-test-tools
	touch $@

run: setup
	$(PY) app.py --host $(HOST) --port $(PORT)

test: setup-test
	$(PY) -m pytest -q --durations=20 tests

bench-cpu: setup
	$(PY) bench/render_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache tests/_out
