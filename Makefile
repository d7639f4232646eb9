# Thin targets; .ci/run and the README call these.
PY ?= .venv/bin/python

.PHONY: bootstrap demo test lint typecheck images bench

bootstrap:            ## venv, Docker engine, images
	scripts/bootstrap.sh

demo: bootstrap       ## the daemon against the local control plane, real containers
	$(PY) -m sandboxd demo

test: bootstrap       ## every suite: unit, integration, e2e
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check src tests

typecheck:
	$(PY) -m mypy

images:
	REBUILD=1 scripts/bootstrap.sh

bench:
	$(PY) benchmarks/workspace_bench.py
