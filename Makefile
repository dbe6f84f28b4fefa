# make help: what each target does. Targets install what they need, so they work on a fresh machine.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# The CPU build of torch; on a GPU cluster install the CUDA build that fits your driver first (see README).
TORCH ?= torch==2.13.0
# iproute2 (ip) and util-linux (nsenter, unshare): the two-node sandbox's network namespaces
SLURM_PACKAGES = slurm-wlm slurmdbd munge mariadb-server iproute2 util-linux
# Real headless Chromium for the generation gallery's browser tests (Playwright drives it; no playwright install),
# and zsh, whose completion script the CLI tests run in a real zsh
BROWSER_PACKAGES = chromium chromium-driver zsh
# Parallel test processes (pytest-xdist). More than the 2 cores CI has: the SLURM tests mostly wait (for the
# scheduler, time limits, grace times), so their waits overlap; --dist loadgroup keeps the tests that need
# the SLURM node alone, or the two-node sandbox, on one worker each (tests/conftest.py).
TEST_WORKERS ?= 3

.PHONY: help install install-test slurm-packages browser-packages run test test-fast lint format cluster docs

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install:  ## install sdcluster (editable) with the CPU build of torch
	$(PIP) install -q "$(TORCH)" -e .

install-test:  ## install sdcluster plus test tools
	$(PIP) install -q "$(TORCH)" -e ".[test]"

slurm-packages:  ## install Debian's SLURM, munge and MariaDB (root) for the real-cluster tests
	@if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mysqld_safe >/dev/null || ! command -v ip >/dev/null || ! command -v nsenter >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_PACKAGES) >/dev/null; \
	fi

browser-packages:  ## install Debian's Chromium (root) for the gallery's browser tests, and zsh
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! command -v zsh >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null; \
	fi

run: install  ## fine-tune the tiny model on the sample data and generate images (local executor)
	$(PYTHON) -m sdcluster.launch

test: install-test slurm-packages browser-packages  ## install everything and run the whole suite (starts a real single-node SLURM)
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadgroup

test-fast: install-test browser-packages  ## the suite without the SLURM tests and the whole-job runs (marked slow)
	$(PYTHON) -m pytest -m "not slurm and not slow"

lint:  ## ruff check + format check
	$(PYTHON) -m ruff check sdcluster tests benchmarks hydra_plugins
	$(PYTHON) -m ruff format --check sdcluster tests benchmarks hydra_plugins

format:  ## ruff fix + format
	$(PYTHON) -m ruff check --fix sdcluster tests benchmarks hydra_plugins
	$(PYTHON) -m ruff format sdcluster tests benchmarks hydra_plugins

cluster: slurm-packages  ## start a single-node SLURM on this machine to try sdcluster (prints SLURM_CONF)
	$(PYTHON) -m tests.sandbox start
	@$(PYTHON) -m tests.sandbox env

docs: install-test  ## regenerate the options reference and build the docs site into site/ (open site/index.html)
	$(PYTHON) -m sdcluster.schema_docs --markdown > docs/reference/options.md
	$(PYTHON) -m mkdocs build --strict
