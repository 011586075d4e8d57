# Quick start: `make train` (set up, then train the default model) and `make test` (set up, then test).
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/custom-llm

.PHONY: setup train test test-slow bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

train: setup
	$(CLI) train $(ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# Checks that take minutes on 2 cores (compiled feature combinations, llama.cpp); CI runs them too.
test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

bench: setup
	$(CLI) bench $(ARGS)

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
