# GPU training orchestrator on Apache Airflow 3.
#   make demo            one real training job end to end on the embedded default (local provider)
#   make test            the whole test suite
#   make run CONF='{}'   one job with these params, exactly as the demo runs it
#   make ui              build the Training jobs page (include/ui -> plugins/gpu_training/ui_dist)
#   make up              the production deployment (docker-compose.yaml, CeleryExecutor); secrets in .env
#   make down [V=1]      stop it (V=1: delete its volumes too: databases, MinIO, logs)
#   make cluster [PORT=8080]  the same topology as native processes (no images needed), until Ctrl-C
#   make status [LIMIT=20 PROJECT=x]   recent jobs: state, GPU, nodes, cost
#   make logs JOB=<uuid> follow a job's trainer log live (every node's) until it finishes
#   make validate [TRAINER_IMAGE=x]   check the results DB (migrated), each cloud's credentials, the trainer image
#   make docs            regenerate docs/params.md from the params' definitions
SHELL := /bin/bash
PYTHON ?= python3.11
ifeq (, $(shell command -v $(PYTHON) 2>/dev/null))
PYTHON := python3
endif
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin

export AIRFLOW_HOME ?= $(CURDIR)/airflow_home
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__UNIT_TEST_MODE := False
export AIRFLOW__LOGGING__LOGGING_LEVEL ?= INFO
export PYTHONPATH := $(CURDIR)/plugins
export PIP_DISABLE_PIP_VERSION_CHECK := 1

CONF ?= {}
PYTEST_ARGS ?= --durations=25

.PHONY: help install system-deps migrate demo run cluster test lint bench bench-concurrency bench-cluster bench-soak bench-followers clean status-db ui ui-if-node up down status logs validate docs

help:
	@sed -n '2,12p' Makefile

$(BIN)/.installed: requirements.txt requirements-dev.txt requirements-torch.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-torch.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(BIN)/.installed ui-if-node

# The Training jobs page (docs/ui.md): sources and lockfile in include/ui, the build
# (git-ignored) in plugins/gpu_training/ui_dist, served by the plugin at /training/ui/. Rebuilt when
# a source changes; needs Node.js >= 18 and npm (.ci/system-deps installs Debian's).
UI_DIR := include/ui
UI_DIST := plugins/gpu_training/ui_dist
UI_SOURCES := $(UI_DIR)/package.json $(UI_DIR)/package-lock.json $(UI_DIR)/vite.config.js $(UI_DIR)/index.html \
  $(wildcard $(UI_DIR)/src/*)

$(UI_DIST)/index.html: $(UI_SOURCES)
	cd $(UI_DIR) && npm ci --no-audit --no-fund --loglevel=error && npm run build
	touch $@

ui: $(UI_DIST)/index.html

# `make install` and `make test` build the page when npm is there; without it the plugin still works
# and /training/ui/ answers 503 (the UI test skips).
ui-if-node:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory ui; \
	else echo "note: npm not found, not building the Training jobs page (make ui)"; fi

$(AIRFLOW_HOME)/.migrated: $(BIN)/.installed $(wildcard plugins/gpu_training/results/migrations/versions/*.py)
	mkdir -p $(AIRFLOW_HOME)
	$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || (tail -30 $(AIRFLOW_HOME)/db-migrate.log; exit 1)
	$(BIN)/python -m gpu_training.results.migrate upgrade
	@# The pool sweeps' trials share (docs/retraining.md); created once, never resized here.
	$(BIN)/airflow pools get gpu_instances >/dev/null 2>&1 || \
	  $(BIN)/airflow pools set gpu_instances 4 "GPU instances held at once by sweep trials" --include-deferred >/dev/null
	touch $@

migrate: $(AIRFLOW_HOME)/.migrated

demo: migrate
	@echo "== running one gpu_training job on the local provider (AIRFLOW_HOME=$(AIRFLOW_HOME))"
	$(BIN)/python -m gpu_training.cli run --conf '{"project_id": "demo"}'

run: migrate
	$(BIN)/python -m gpu_training.cli run --conf '$(CONF)'

# Operator commands on the results DB of this Airflow home (or AIRFLOW_CONN_TRAINING_RESULTS).
LIMIT ?= 20
PROJECT ?=
status: $(BIN)/.installed
	@$(BIN)/python -m gpu_training.cli status --limit $(LIMIT) $(if $(PROJECT),--project '$(PROJECT)')

logs: $(BIN)/.installed
	@test -n "$(JOB)" || { echo "usage: make logs JOB=<job uuid> (make status lists them)" >&2; exit 2; }
	@$(BIN)/python -m gpu_training.cli logs '$(JOB)'

TRAINER_IMAGE ?=
validate: $(BIN)/.installed
	@$(BIN)/python -m gpu_training.cli validate $(if $(TRAINER_IMAGE),--image '$(TRAINER_IMAGE)')

# docker-compose's topology as native processes on 127.0.0.1 (docs/deployment.md): Debian's
# PostgreSQL and Redis, moto's S3 server, api-server (http://localhost:PORT), scheduler,
# dag-processor, triggerer and WORKERS `airflow celery worker` processes, until Ctrl-C. A fresh
# deployment at every start, state and logs in CLUSTER_HOME; sign in as admin with the password it
# prints, generated once and kept in CLUSTER_HOME/admin-password. A taken PORT is an error naming its holder.
CLUSTER_HOME ?= $(CURDIR)/.cluster
WORKERS ?= 2
PORT ?= 8080
cluster: install
	@bash .ci/system-deps
	$(BIN)/python tests/airflow_cluster.py --celery --fresh --workers $(WORKERS) --port $(PORT) $(CLUSTER_HOME)

system-deps:
	@bash .ci/system-deps

# Two pytest processes at once (tests/run_shards.py): the suite mostly waits, so on 2 cores this
# takes about as long as its longer half. `$(BIN)/python -m pytest` runs it in one process.
# RESULTS_DB=sqlite|postgresql|both (default both; `make test RESULTS_DB=postgresql`) picks the results DB.
test: system-deps install
	$(BIN)/python tests/run_shards.py $(PYTEST_ARGS)

bench: migrate
	$(BIN)/python bench/ingest.py
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/python bench/transfer.py; else echo "bench/transfer.py needs root (sshd)"; fi
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/python bench/provision.py; else echo "bench/provision.py needs root (sshd)"; fi
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/params.py
	$(MAKE) --no-print-directory bench-concurrency
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory bench-cluster; else echo "bench/cluster.py needs root (sshd)"; fi

# 50 concurrent runs on a real scheduler + triggerer + api-server, PostgreSQL as metadata DB (~3 min).
bench-concurrency: install
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } || \
	  { echo "bench/concurrency.py needs PostgreSQL (apt-get install postgresql)"; exit 1; }
	$(BIN)/python bench/concurrency.py

# Jobs per minute started/finished and scheduler/triggerer/worker CPU: 20 jobs at once on the fake
# Lambda (boot 0 s) on the CeleryExecutor deployment vs the LocalExecutor, both on PostgreSQL, side by
# side (~8 min on 2 shared cores). CLUSTER_BENCH_ARGS='--jobs 4 --cloud vast'.
CLUSTER_BENCH_ARGS ?=
bench-cluster: install
	@[ "$$(id -u)" = 0 ] || { echo "bench/cluster.py needs root (sshd)"; exit 1; }
	@{ ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; } && command -v redis-server >/dev/null || \
	  apt-get install -y -qq --no-install-recommends postgresql redis-server >/dev/null || \
	  { echo "bench/cluster.py needs PostgreSQL and Redis (apt-get install postgresql redis-server)"; exit 1; }
	$(BIN)/python bench/cluster.py $(CLUSTER_BENCH_ARGS)

# N jobs with random faults (provider faults, trainer crash/stall/OOM, cancels, spot interruptions) on
# a real deployment with the fake Lambda and Vast.ai clouds: leaks, lost/duplicated rows, cancel ->
# terminate (~5-6 min for the default 20 jobs on 2 cores). SOAK_ARGS='--jobs 8 --seed 1'.
SOAK_ARGS ?=
bench-soak: install
	@[ "$$(id -u)" = 0 ] || { echo "bench/soak.py needs root (sshd)"; exit 1; }
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  apt-get install -y -qq --no-install-recommends postgresql >/dev/null || \
	  { echo "bench/soak.py needs PostgreSQL (apt-get install postgresql)"; exit 1; }
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# N jobs (50, 100, 200; half over SSH to the test sshd) followed at once by one triggerer process
# running GlobalJsonTrigger for each on one event loop: its CPU, the loop's longest block, event -> row
# latency, lost/duplicated rows (~11 min per N by default on 2 cores). FOLLOWERS_ARGS='--jobs 50 --minutes 2'.
FOLLOWERS_ARGS ?=
bench-followers: install
	@[ "$$(id -u)" = 0 ] || { echo "bench/followers.py needs root (sshd)"; exit 1; }
	$(BIN)/python bench/followers.py $(FOLLOWERS_ARGS)

# docs/params.md, generated from PARAM_SPECS (plugins/gpu_training/docs.py); tests/test_docs.py fails
# when the committed page differs from what this writes.
docs: $(BIN)/.installed
	$(BIN)/python -m gpu_training.docs params --output docs/params.md

lint: install
	$(BIN)/ruff check plugins dags tests bench include
	$(BIN)/ruff format --check plugins dags tests bench include
	$(BIN)/mypy plugins/gpu_training

clean:
	rm -rf $(AIRFLOW_HOME) $(UI_DIST) $(UI_DIR)/node_modules

# The production deployment (docker-compose.yaml: CeleryExecutor, PostgreSQL, Redis, MinIO, the image
# of include/deploy/Dockerfile). Its secrets live in .env (git-ignored), written once with random
# values and never overwritten: hex (URL-safe, they go into database URLs) and a Fernet key, from the
# standard library only (no venv needed). `docker compose` v2, else `docker-compose` 1.29.
COMPOSE = $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
COMPOSE_SECRETS := POSTGRES_PASSWORD MINIO_ROOT_PASSWORD AIRFLOW_JWT_SECRET AIRFLOW_API_SECRET_KEY AIRFLOW_ADMIN_PASSWORD

.env:
	@umask 077 && $(PYTHON) -c 'import base64, secrets, sys; \
	  print("# Secrets of docker-compose.yaml, written by make up: keep private, never commit."); \
	  [print(f"{name}={secrets.token_hex(32)}") for name in sys.argv[1:]]; \
	  print("AIRFLOW_FERNET_KEY=" + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())' \
	  $(COMPOSE_SECRETS) > $@.tmp && mv $@.tmp $@
	@echo "wrote $@ with random secrets; the UI's login is admin / AIRFLOW_ADMIN_PASSWORD from $@"

up: .env
	$(COMPOSE) up -d --build

down:
	$(COMPOSE) down $(if $(V),--volumes)
