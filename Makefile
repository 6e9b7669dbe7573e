# Clarion: `make run` runs the whole service on embedded defaults; `make test` runs the suite.
# Both create .venv and install the pinned requirements themselves.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000
export PORT

.PHONY: run test lint format typecheck migrate stop clean venv

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	@touch $(STAMP)

venv: $(STAMP)

migrate: venv
	$(BIN)/python manage.py migrate --noinput

# API + WebSocket server, one worker pool per channel queue, the maintenance pool (sweeper,
# provider events), the webhooks pool (status webhooks out), beat and Flower, from the Procfile. Honcho gives the first process (web) PORT.
run: migrate
	$(BIN)/python manage.py seed_demo
	$(BIN)/python manage.py run_banner
	$(BIN)/honcho start --procfile Procfile --port $(PORT)

# Debian tools some tests need, as command:package: libfaketime (a worker whose clock runs
# ahead), HAProxy and socat (the cluster of tests/cluster), promtool (the alert rules' unit
# tests, docker/prometheus/alerts.test.yml). Installed when missing and running as root.
TEST_TOOLS := haproxy:haproxy socat:socat faketime:faketime promtool:prometheus
.PHONY: tools
tools:
	@missing=""; for pair in $(TEST_TOOLS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing:$$missing (apt-get install -y$$missing, as root)"; fi; \
	fi

# The cluster's long scenarios (marked cluster_full) run under `make cluster` and `make chaos`;
# `make test` runs one scenario and the clean-up checks.
test: venv tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy core notifications workers channels_app project
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest -m "not cluster_full" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: venv
	$(BIN)/mypy core notifications workers channels_app project

# Stop the embedded Redis that `make run` and `make test` leave running under var/.
stop: venv
	$(BIN)/python -m project.embedded_redis stop

clean: stop
	rm -rf var/ $(VENV)

# Throughput, latency and memory, each against a baseline measured in the same run; prints the
# table, writes bench/results.json and refreshes docs/benchmarks.md. Runs on DATABASE_URL and
# REDIS_URL when set (a database `<name>_bench`, a Redis db nobody uses), else embedded.
# Bounded: the bench stops itself after 1,260 s (BENCH_BUDGET_SECONDS: about 9 minutes of
# phases, then the 5-minute WebSocket memory soak, which is cut short rather than run past the
# budget); timeout is the backstop.
.PHONY: bench
bench: venv
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	timeout --signal=TERM --kill-after=30 1530 $(BIN)/python -m bench.run

# Chaos scenarios at full size (tests/chaos: 2,000 deliveries under kill -9, a 5,000-message
# broker backlog lost and recovered, a 60 s provider outage, PostgreSQL restarted under API
# load, ...) and the schema fuzzer at 100 examples per operation. Runs against the machine's
# PostgreSQL and Redis (a database and a Redis db of its own), and RESTARTS THE MACHINE'S
# POSTGRESQL once; every other outage is of processes it starts itself. Prints accepted /
# delivered / duplicated / lost per scenario; `CHAOS_REPORT=file` keeps those lines. The test
# process itself runs without the connection pool, which would hand it back connections that
# the PostgreSQL restart killed; the API under test keeps its pool.
CHAOS_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/clarion_chaos
CHAOS_REDIS_URL    ?= redis://127.0.0.1:6379/13
.PHONY: chaos
chaos: venv tools
	trap '$(BIN)/python -m tests.cluster.net clean' EXIT INT TERM; \
	DATABASE_URL=$(CHAOS_DATABASE_URL) REDIS_URL=$(CHAOS_REDIS_URL) \
	CELERY_BROKER_URL=$(CHAOS_REDIS_URL) SECRET_KEY=chaos-only-not-a-secret \
	CLARION_VAR_DIR=$(CURDIR)/var/chaos CHAOS_FULL=1 CHAOS_RESTART_POSTGRES=1 \
	FUZZ_MAX_EXAMPLES=100 DATABASE_POOL=false \
	timeout --signal=INT --kill-after=60 3600 \
	$(BIN)/pytest -p no:cacheprovider --timeout 1200 -rs tests/chaos tests/api tests/cluster

# Clarion across hosts (tests/cluster, as root): network namespaces on 10.77.0.0/24 joined by
# a bridge, HAProxy in front of two API hosts, two relay hosts, a scheduler host, two worker
# hosts and a WebSocket clients' host, with hosts killed, cut off and with a clock 30 s
# ahead, at full size; then the figures of docs/scaling.md (CLUSTER_FIGURES). Whatever
# happens (a failure, Ctrl-C), the trap removes every namespace, link and process it made.
CLUSTER_FIGURES ?= $(CURDIR)/var/cluster-figures.json
.PHONY: cluster
cluster: venv tools
	@mkdir -p var
	trap '$(BIN)/python -m tests.cluster.net clean' EXIT INT TERM; \
	DATABASE_URL=$(CHAOS_DATABASE_URL) REDIS_URL=$(CHAOS_REDIS_URL) \
	CELERY_BROKER_URL=$(CHAOS_REDIS_URL) SECRET_KEY=chaos-only-not-a-secret \
	CLARION_VAR_DIR=$(CURDIR)/var/cluster CHAOS_FULL=1 DATABASE_POOL=false \
	CLUSTER_FIGURES=$(CLUSTER_FIGURES) \
	timeout --signal=INT --kill-after=60 3600 \
	$(BIN)/pytest -p no:cacheprovider --timeout 1200 -rs tests/cluster
