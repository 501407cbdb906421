# The two commands a newcomer needs: `make demo` and `make test`.
# Both build .venv from scratch with nothing but python3 (>= 3.11) and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test lint bench scale scale-sim clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

$(VENV)/.installed-examples: $(VENV)/.installed
	$(PIP) install --quiet -e '.[examples]'
	touch $@

demo: $(VENV)/.installed-examples
	$(PY) scripts/demo.py

test: $(VENV)/.installed-dev
	$(PY) -m pytest -n 2 tests

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check distckpt tests scripts examples
	$(VENV)/bin/ruff format --check distckpt tests scripts examples
	$(VENV)/bin/mypy

bench: $(VENV)/.installed-dev
	$(PY) scripts/bench.py

# 1,024 simulated hosts save a 70B train state, 512 restore it (no data; a few
# minutes of CPU; docs/scale_simulation.md). Not part of `make test`, which runs
# its small version (tests/test_scale_sim.py).
scale-sim: $(VENV)/.installed
	$(PY) scripts/scale_sim.py

# Save and restore at 2..32 processes, weak and strong scaling (docs/scale.md); ~10 min.
scale: $(VENV)/.installed-dev
	$(PY) scripts/scale.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
