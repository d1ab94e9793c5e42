# Conveyor: `make run` carries the demo task through the whole pipeline; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench up install system-deps clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# From Debian, installed only when missing (needs root): bubblewrap and git for the pipeline,
# /usr/bin/python3 for the sandbox tests' in-sandbox probes.
system-deps:
	@command -v bwrap >/dev/null && command -v git >/dev/null && test -x /usr/bin/python3 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap git python3 >/dev/null)

run: system-deps $(STAMP)
	$(BIN)/conveyor demo

up: system-deps $(STAMP)
	$(BIN)/conveyor up

test: system-deps $(STAMP)
	$(BIN)/pytest -q

bench: system-deps $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
