# `make demo` sets up and runs the example tunnels; `make test` runs every check CI runs;
# `make bench` measures the tunnel against stunnel4, nginx and HAProxy (docs/benchmark.md).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# sslyze (for the TLS scan test) lives in its own virtualenv: its pins may clash with ours.
SSLYZE_VERSION := 6.3.1
SSLYZE_STAMP := .venv-sslyze/.installed-$(SSLYZE_VERSION)
# The benchmark has a virtualenv of its own (the tunnel + matplotlib, kept out of the tests').
BENCH_STAMP := .venv-bench/.installed

.PHONY: demo test lint unit bench bench-smoke clean deploy-check image-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

$(SSLYZE_STAMP):
	$(PYTHON) -m venv .venv-sslyze
	.venv-sslyze/bin/pip install --quiet "sslyze==$(SSLYZE_VERSION)"
	touch $(SSLYZE_STAMP)

$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install --quiet --upgrade pip
	.venv-bench/bin/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

demo: $(STAMP)
	./scripts/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint $(SSLYZE_STAMP)
	$(VENV)/bin/pytest

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit

# Installs what is missing with apt-get (stunnel4, nginx + its stream module, haproxy, postgresql,
# redis, gcc, libssl-dev), builds bench/*.c, runs about 10 minutes, writes docs/benchmark.*
bench: $(BENCH_STAMP)
	.venv-bench/bin/python bench/run.py

# Everything once with tiny sizes (under a minute); writes build/bench/, not docs/.
bench-smoke: $(BENCH_STAMP)
	.venv-bench/bin/python bench/run.py --quick

# systemd unit, Dockerfile, compose.yaml (docs/deploy.md, "What CI checks").
deploy-check:
	bash scripts/check-deploy.sh

# Build the image with podman and run it with docs/container/ beside Redis (root only;
# docs/deploy.md, "What CI checks").
image-check:
	bash scripts/check-image.sh

clean:
	rm -rf $(VENV) .venv-sslyze .venv-tools .venv-bench build *.egg-info .pytest_cache .mypy_cache .ruff_cache
