# Thin targets; .ci/run and the README call these.
PY ?= .venv/bin/python

.PHONY: bootstrap demo test lint typecheck images bench

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

bench:
	$(PY) benchmarks/workspace_bench.py
