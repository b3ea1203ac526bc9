# One entry point for everything: `make run`, `make test`. Each target
# creates .venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint format clean venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -qq --upgrade pip
	$(PIP) install -qq -e '.[test]'  # -qq: errors only (no setuptools advice box)
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# `make run` needs the package only (h11), not the test tools: one quiet
# `pip install -e .` on first use (-qq: errors only, so neither pip's notices
# nor setuptools' editable-install advice box). A venv made for `make test`
# already has it.
RUN_STAMP := $(VENV)/.run-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(RUN_STAMP): pyproject.toml
	@if [ -e $(STAMP) ]; then touch $@; exit 0; fi; \
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || exit 1; \
	echo "make run: installing muxserver into $(VENV) (first run only)"; \
	$(PIP) install -qq --disable-pip-version-check -e . || exit 1; \
	rm -f $(VENV)/.run-*; touch $@

# Exit status 1 is "could not start" (port in use, unreadable TLS file...):
# say how options reach the server through make.
run: $(RUN_STAMP)
	@$(VENV)/bin/muxserver $(ARGS); status=$$?; \
	if [ $$status -eq 1 ]; then \
	  echo 'make run: pass options with ARGS, e.g. make run ARGS="--port 7879"' >&2; \
	fi; exit $$status

test: $(STAMP)
	$(VENV)/bin/ruff check muxserver tests loadtests tools bench
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check muxserver tests loadtests tools bench
	$(VENV)/bin/ruff format --check muxserver tests

format: $(STAMP)
	$(VENV)/bin/ruff format muxserver tests
	$(VENV)/bin/ruff check --fix muxserver tests

# ---- benchmarks (docs/benchmarks.md) ------------------------------------
# The bench extra on top of the test one, plus redis-server and nats-server
# from apt when we are root and they are missing, socket.io from npm (a peer
# that is still missing is reported as "not installed", never left out silently).
# BENCH_ARGS go to bench.run (e.g. --systems muxserver,redis --workloads 1-1),
# MICRO_ARGS to pytest (e.g. --benchmark-compare).
BENCH_STAMP := $(VENV)/.bench-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
MICRO := $(PY) -m pytest tests/benchmarks -o python_files='bench_*.py' -q \
	--benchmark-columns=mean,median,ops,rounds --benchmark-sort=name

.PHONY: bench bench-quick bench-deps bench-cluster

$(BENCH_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[test,bench]'
	rm -f $(VENV)/.bench-*
	touch $@

bench-deps: $(BENCH_STAMP)
	@for pkg in redis-server nats-server; do \
	  if command -v $$pkg >/dev/null || test -x /usr/sbin/$$pkg; then continue; fi; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "bench: apt-get install $$pkg"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkg; } \
	      >/dev/null 2>&1 || echo "bench: could not install $$pkg: it will be reported as not installed"; \
	  else echo "bench: $$pkg is missing (not root or no apt-get): it will be reported as not installed"; fi; \
	done
	@# socket.io 4 on Node, the WebSocket peer, into the ignored .bench-node/ folder.
	@if command -v node >/dev/null && command -v npm >/dev/null; then \
	  test -d .bench-node/node_modules/socket.io || { echo "bench: npm install socket.io@4"; \
	    npm install --silent --no-audit --no-fund --prefix .bench-node socket.io@4 >/dev/null 2>&1 \
	      || echo "bench: npm could not install socket.io: it will be reported as not installed"; }; \
	else echo "bench: node or npm is missing: socket.io will be reported as not installed"; fi

bench: bench-deps
	mkdir -p reports
	$(MICRO) --benchmark-autosave --benchmark-json=reports/micro.json $(MICRO_ARGS)
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.cluster --json reports/bench-cluster.json

# Cluster cells only (docs/cluster.md): 2 and 4 nodes on one redis-server.
bench-cluster: bench-deps
	mkdir -p reports
	$(PY) -m bench.cluster --json reports/bench-cluster.json

bench-quick: bench-deps
	mkdir -p reports
	$(MICRO) --benchmark-max-time=0.05 --benchmark-min-rounds=3 \
	  --benchmark-json=reports/micro-quick.json $(MICRO_ARGS)
	$(PY) -m bench.run --quick $(BENCH_ARGS)

# ---- load test (docs/loadtesting.md) -------------------------------------
# A muxserver on a free loopback port, Locust headless against it for
# DURATION, reports in reports/loadtest-<scenario>*; exits non-zero on any
# failure or loss. e.g.
#   make loadtest USERS=2000 RATE=5 DURATION=60s SCENARIO=broadcast PROCESSES=2
#   make loadtest TRANSPORT=ws   (the users speak WebSocket, as browsers do)
# LOADTEST_ARGS go to loadtests/run.py (e.g. --rooms 10 --size 512 -- --loglevel DEBUG).
USERS ?= 200
DURATION ?= 30s
SCENARIO ?= chat
RATE ?= 1
PROCESSES ?= 1
TRANSPORT ?= tcp
LOADTEST_STAMP := $(VENV)/.loadtest-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: loadtest

$(LOADTEST_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[test,loadtest]'
	rm -f $(VENV)/.loadtest-*
	touch $@

loadtest: $(LOADTEST_STAMP)
	$(PY) loadtests/run.py --scenario $(SCENARIO) --users $(USERS) --duration $(DURATION) \
	  --rate $(RATE) --processes $(PROCESSES) --transport $(TRANSPORT) $(LOADTEST_ARGS)

# ---- hardening harnesses (docs/security.md) --------------------------------
# Each starts its own server on a free loopback port, is bounded in time,
# prints a summary and exits non-zero when an invariant breaks. e.g.
#   make conns CLIENTS=19000    make fuzz SECONDS=600 SEED=42    make soak MINUTES=10
#   make partial ATTACKERS=3000 (the partial-frame attack against --max-input-memory)
# Short versions of conns, fuzz and soak run inside `make test` (tests/test_hardening.py).
.PHONY: conns fuzz soak partial

conns: $(STAMP)
	$(PY) -m tools.conns --clients $(or $(CLIENTS),19000)

fuzz: $(STAMP)
	$(PY) -m tools.fuzz --seconds $(or $(SECONDS),600) $(if $(SEED),--seed $(SEED))

soak: $(STAMP)
	$(PY) -m tools.soak --minutes $(or $(MINUTES),10)

partial: $(STAMP)
	$(PY) -m tools.partial --attackers $(or $(ATTACKERS),3000)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis reports
