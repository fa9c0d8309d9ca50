# p2v — set-up and test entry points.  `make demo` and `make test` are the two
# commands the README opens with; both install what they need, idempotently.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
PYTEST_ARGS ?=

.PHONY: all deps venv images demo test test-unit test-integration test-vm lint bench clean

all: test

$(STAMPS):
	mkdir -p $(STAMPS)

deps: | $(STAMPS)
	bash scripts/install-deps.sh

$(STAMPS)/venv: pyproject.toml | $(STAMPS)
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c 'import guestfs, hivex, nbd' || { echo "venv cannot import guestfs/hivex/nbd: is it built on /usr/bin/python3 with --system-site-packages?" >&2; exit 1; }
	touch $@

venv: deps $(STAMPS)/venv

images: venv
	$(PY) -m images build debian-physical-bios debian-uefi-lvm

demo: venv
	$(PY) -m images build debian-physical-bios
	$(PY) scripts/demo.py

lint: venv
	$(VENV)/bin/ruff check p2v tests images bench scripts
	$(VENV)/bin/mypy p2v

test: venv lint
	P2V_REQUIRE_TIERS=unit,integration,vm $(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: venv
	$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)

test-integration: venv
	$(VENV)/bin/pytest -m integration $(PYTEST_ARGS)

test-vm: venv
	$(VENV)/bin/pytest -m vm $(PYTEST_ARGS)

bench: venv
	$(PY) bench/convert.py

clean:
	rm -rf $(STAMPS) demo-out .pytest_cache .mypy_cache .ruff_cache
