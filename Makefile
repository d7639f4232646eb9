# Thin targets; .ci/run and the README call these.
PY ?= .venv/bin/python

.PHONY: bootstrap demo test lint typecheck images bench soak lock lock-upgrade lock-check sdk-latest

bootstrap:            ## venv, Docker engine, images
	scripts/bootstrap.sh

demo: bootstrap       ## the daemon against the local control plane, real containers
	$(PY) -m sandboxd demo

test:                 ## set up (with the test-only tools), then every suite: unit, integration, e2e
	WITH_TEST_TOOLS=1 scripts/bootstrap.sh
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check src tests

typecheck:
	$(PY) -m mypy

images:
	REBUILD=1 scripts/bootstrap.sh

bench:                ## sandbox start-up, burst and idle cost, then workspace and store throughput (< 10 min)
	$(PY) benchmarks/sandbox_bench.py $(SANDBOX_BENCH_ARGS)
	$(PY) benchmarks/workspace_bench.py --runs 1 --commits 1000
	$(PY) benchmarks/store_bench.py --mb 100

soak:                 ## 300 sessions through the real daemon under faults; restarts the Docker engine once
	$(PY) benchmarks/soak.py --sessions 300 $(SOAK_ARGS)

lock:                 ## requirements.lock and requirements-checkov.lock from pyproject.toml, keeping the pins that fit
	scripts/lock.sh $(LOCK_ARGS)

lock-upgrade:         ## the same with the newest release of everything (then make sdk-latest test; commit when green)
	scripts/lock.sh --upgrade $(LOCK_ARGS)

lock-check:           ## fails when the locks are not what `make lock` makes of their inputs
	scripts/lock.sh --check

sdk-latest:           ## the newest anthropic the pyproject range allows, in a throwaway venv: the suites that drive the SDK
	scripts/sdk-latest.sh
