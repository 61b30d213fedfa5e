# kiln: `make demo` shows it working, `make test` proves it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := mmdebstrap bubblewrap podman runc uidmap haproxy wrk python3-venv git ca-certificates
STAMP := $(VENV)/.kiln-installed

.PHONY: setup demo test lint types pytest bench soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: setup
	@bash examples/demo.sh

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

types: setup
	$(VENV)/bin/mypy

pytest: setup
	$(VENV)/bin/pytest

test: lint types pytest

bench: setup
	$(PY) -m benchmarks

# The long fault runs: 200 releases of each strategy and 200 rollbacks under
# load, then repeated instance kills; memory rows show any leak.
soak: setup
	KILN_BENCH_ZERO_RELEASES=200 KILN_BENCH_ZERO_BUDGET=1800 $(PY) -m benchmarks zero heal

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .kiln-demo
