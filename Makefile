# Two commands: `make demo` and `make test`. Each creates or updates .venv from a fresh clone.
# CPU machines get the CPU torch wheel (torch==2.13.0) first, so nothing pulls a multi-GB CUDA build.
# GPU users: `make venv TORCH_SPEC=torch` (or install CUDA torch into .venv first; an installed torch is kept).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/extractor demo

bench: $(STAMP)
	$(PY) bench/bench_read_render.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
