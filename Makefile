# Two commands on a fresh machine: `make run` and `make test`. Python 3.11+ is all they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PYTEST_ARGS ?=
.DEFAULT_GOAL := help

up: ## the full stack in Docker: Kafka (KRaft), Kafka UI, PostgreSQL, services, Prometheus, Grafana
	docker compose up -d --build

down: ## stop the Docker stack
	docker compose down

.PHONY: up down asyncapi run test test-unit test-integration test-e2e migrate bench install install-test clean help

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,embedded]'
	touch $(STAMP) $@

install: $(STAMP) ## create the virtualenv and install the project

install-test: $(TEST_STAMP) ## install the project with its test dependencies

run: $(STAMP) ## run everything on embedded defaults (or DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS)
	$(BIN)/python -m devstack run

asyncapi: $(STAMP) ## regenerate docs/asyncapi.yaml from the FastStream app of the topics
	$(BIN)/python -m shared.asyncapi

migrate: $(STAMP) ## apply pending migrations
	$(BIN)/python -m devstack migrate

test: $(TEST_STAMP) ## run the whole test suite (starts its own broker and database)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(TEST_STAMP) ## unit tests only
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(TEST_STAMP) ## integration tests only
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: $(TEST_STAMP) ## end-to-end tests only
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

bench: $(STAMP) ## run every benchmark in bench/ and print their ratios (about 15 minutes; reads need wrk)
	for script in consumer_throughput consumer_latency read_throughput report_stream expiry rollout_create; do \
		$(BIN)/python -m bench.$$script || exit 1; done

clean: ## remove the virtualenv and local data (as root also the embedded PostgreSQL's data under /var/lib)
	if [ -x $(BIN)/python ]; then $(BIN)/python -m devstack clean; fi
	rm -rf $(VENV) .data .pytest_cache .hypothesis
