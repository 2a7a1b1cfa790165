# presence-bridge developer commands. `make run` and `make test` are the two that matter.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
# checkov gets its own environment: its pins conflict with requirements-dev.txt (tests/infra).
CHECKOV_VENV := $(VENV)/tools/checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
# Three workers on two cores: the end-to-end tests mostly wait (for timers, retries, the vendors'
# limits), ~1.2 cores busy in all; 11.5 min with two workers, 8.5 with three.
PYTEST_WORKERS ?= 3
# The headless browser of the status-page test: Debian's Chromium, driven by Playwright.
CHROMIUM ?= /usr/bin/chromium

.PHONY: run test lint clean bench soak fuzz deps browser

$(STAMP): requirements.txt requirements-dev.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

$(CHECKOV_STAMP): infra/requirements-checkov.txt $(STAMP)
	test -d $(CHECKOV_VENV) || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet -r infra/requirements-checkov.txt
	touch $(CHECKOV_STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

deps: $(STAMP) $(NODE_STAMP) $(CHECKOV_STAMP)

## make browser: Chromium for the status-page test (apt, when missing and we are root).
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "Chromium is required at $(CHROMIUM): install the 'chromium' package (apt-get install chromium)"; exit 1; fi

## make run: the whole local world (Azurite, Zoom and Entra/Graph emulators, the local
## Functions host), a seeded organisation and a scripted day of presence, with a live view.
run: deps
	$(PY) -m sandbox.run

## make test: lint and the whole test suite (unit, integration on Azurite, end-to-end on the sandbox).
test: deps browser lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: deps
	$(PY) -m bench.run

# Each soak test in its own process: the steady soak measures its process's threads, sockets
# and memory, which another test's world would muddy.
soak: deps
	$(PY) -m pytest -q -s -m soak --run-soak tests/soak/test_soak.py
	$(PY) -m pytest -q -s -m soak --run-soak tests/soak/test_faults_long.py

# Ten times the cases of make test: an endpoint whose cases each reach Azurite outlasts the
# 300 s per-test limit of pyproject.toml, so the fuzz run gets an hour per test.
fuzz: deps
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q --timeout=3600 tests/fuzz

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache .hypothesis .sandbox
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
