# mmstore: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV := python3 -m uv
VENV := .venv
PY := $(VENV)/bin/python

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

install: ## create .venv with every workspace member, its entry points and the dev tools
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --all-packages

test: install ## install what is needed and run the test suite
	$(VENV)/bin/pytest

REPLICAS ?= 1
ENGINE ?= inference
smoke: install ## the main job: start the local stack, run the multi-turn RL loop, train, summarize (REPLICAS=N, ENGINE=vllm-serve)
	$(VENV)/bin/mmstore-smoke run --replicas $(REPLICAS) --engine $(ENGINE)

up: install ## start mmstore and the inference service in the background (tiny model by default)
	$(VENV)/bin/mmstore-smoke up

down: ## stop what `make up` started
	$(VENV)/bin/mmstore-smoke down

fuzz: install ## property-based conversations through every part, long budget (1000 conversations)
	HYPOTHESIS_PROFILE=long $(VENV)/bin/pytest tests/test_fuzz.py -p no:cacheprovider --timeout 3600

lint: install ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install ## run every benchmark and rewrite its section of bench/RESULTS.md (about 15 min here)
	$(PY) bench/store_bench.py
	$(PY) bench/layout_bench.py
	$(PY) bench/inference_bench.py
	$(PY) bench/openai_bench.py
	$(PY) bench/replicas_bench.py
	$(PY) bench/trainer_bench.py

compose-config: ## validate docker-compose.yml (needs docker-compose)
	MMSTORE_TOKENS=$${MMSTORE_TOKENS:-'{"config-check": ["read"]}'} MODEL_DIR=$${MODEL_DIR:-/models/checkpoint} \
		docker-compose -f docker-compose.yml config --quiet

.PHONY: help install test smoke up down fuzz lint bench compose-config
