# `make demo` sets up and runs the example tunnels; `make test` runs every check CI runs.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# sslyze (for the TLS scan test) lives in its own virtualenv: its pins may clash with ours.
SSLYZE_VERSION := 6.3.1
SSLYZE_STAMP := .venv-sslyze/.installed-$(SSLYZE_VERSION)

.PHONY: demo test lint unit clean deploy-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

$(SSLYZE_STAMP):
	$(PYTHON) -m venv .venv-sslyze
	.venv-sslyze/bin/pip install --quiet "sslyze==$(SSLYZE_VERSION)"
	touch $(SSLYZE_STAMP)

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

# systemd unit, Dockerfile, compose.yaml (docs/deploy.md, "What CI checks").
deploy-check:
	bash scripts/check-deploy.sh

clean:
	rm -rf $(VENV) .venv-sslyze .venv-tools build *.egg-info .pytest_cache .mypy_cache .ruff_cache
