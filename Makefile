# ecny-gateway — every target does its own set-up on a fresh Debian/Ubuntu machine.
#   make run     start the gateway on http://127.0.0.1:8700 with a development SoftHSM token
#   make test    the full test suite against a real SoftHSM2 token (and a throw-away PostgreSQL)
#   make lint    ruff, mypy --strict, import-linter
#   make bench   benchmarks; results go to BENCHMARKS.md
#   make proof   the long runs CI cannot afford: the wheel installed offline (package test), the soak
#   make teller  the teller UI against the gateway `make run` started

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := softhsm2 p11-kit postgresql python3-venv tmux systemd curl jq nodejs npm
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
WHEELHOUSE := var/wheelhouse
WHEELHOUSE_STAMP := $(WHEELHOUSE)/.built-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: run test lint bench proof system venv clean teller wheelhouse

system:
	@missing=""; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v p11-kit >/dev/null || missing="$$missing p11-kit"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v tmux >/dev/null || missing="$$missing tmux"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v jq >/dev/null || missing="$$missing jq"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@

# ethers v6, the JSON-RPC client of tests/api/test_evm_rpc.py: exactly the committed lock, installed
# before the tests run (nothing is downloaded while they run).
ETHERS := tests/ethers
ETHERS_STAMP := $(ETHERS)/node_modules/.installed-$(shell cat $(ETHERS)/package-lock.json | sha256sum | cut -c1-12)

$(ETHERS_STAMP): $(ETHERS)/package-lock.json
	cd $(ETHERS) && npm ci --no-audit --no-fund --loglevel=error
	@rm -f $(ETHERS)/node_modules/.installed-*; touch $@

venv: system $(STAMP)

# The wheels tests/integration/test_package.py installs with pip --no-index: the core dependencies, the
# extras and the build backend, downloaded here once so that the test itself never downloads.
$(WHEELHOUSE_STAMP): pyproject.toml
	$(BIN)/pip wheel -q -w $(WHEELHOUSE) '.[postgres,serial]' 'setuptools>=77'
	@rm -f $(WHEELHOUSE)/ecny_gateway-*.whl $(WHEELHOUSE)/.built-*; touch $@

wheelhouse: venv $(WHEELHOUSE_STAMP)

run: venv
	@softhsm/init-token.sh var/hsm ecny-dev >/dev/null
	@SOFTHSM2_CONF=$(CURDIR)/var/hsm/softhsm2.conf $(BIN)/ecny-gateway dev-init --var var
	SOFTHSM2_CONF=$(CURDIR)/var/hsm/softhsm2.conf exec $(BIN)/ecny-gateway serve --config var/gateway.toml

# The package test (~25 s: build, fresh venv, offline install, serve) runs in `make proof`.
test: venv $(ETHERS_STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -m "not package"

lint: venv
	$(BIN)/ruff check gateway tests examples
	$(BIN)/mypy
	$(BIN)/lint-imports

teller: venv
	$(BIN)/ecny-teller --gateway http://127.0.0.1:8700

bench: venv
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python bench/run.py
	$(BIN)/python bench/openbao.py --append BENCHMARKS.md

# What CI does not run: the wheel built and installed offline into a fresh venv, serving against
# SoftHSM2; the 10-minute soak (results in docs/reliability.md and docs/soak-last.json).
proof: venv wheelhouse
	$(BIN)/pytest -q -p no:cacheprovider -m package
	ECNY_FUZZ_EXAMPLES=5 ECNY_FUZZ_PHASES=examples,coverage,fuzzing $(BIN)/pytest -q -p no:cacheprovider tests/integration/test_fuzz_api.py
	$(BIN)/python proof/soak.py --minutes 10 --report docs/soak-last.json

clean:
	rm -rf $(VENV) var
