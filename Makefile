# istiopy: every target does its own set-up, so `make test` and `make demo` work on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := .build/stamps
DEB_PACKAGES := iproute2 iptables iperf3 tcpdump libssl-dev libnghttp2-dev wrk clang libclang-rt-14-dev curl procps
PYTEST_ARGS ?=
# The root folders `operator/` and `xds/` would shadow the standard library's `operator` and xds-protos'
# `xds` for any `python` started here with the current directory on sys.path; -P semantics for all.
export PYTHONSAFEPATH := 1

-include tools/k8s/k8s.mk
-include tools/openssl/openssl.mk

.PHONY: help setup deps venv proto lint test test-fast demo crds charts bench clean upstream-istioctl wirecheck

help:
	@echo "make demo   - set up, then run a whole mesh on this machine from examples/"
	@echo "make test   - set up, then run ruff, mypy, import-linter and the whole pytest suite"
	@echo "make lint | crds | bench | cluster | k8s-tools | upstream-istioctl | clean"

# Debian packages: install only what is missing (apt-get update once, only when needed).
$(STAMP)/deb: Makefile
	@mkdir -p $(STAMP)
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install:$$missing" >&2; exit 1; fi; \
	  echo "apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel

# Editable install: also generates the protobuf code and builds C extensions (setup.py).
$(STAMP)/pip: pyproject.toml setup.py $(wildcard api/proto/*.proto) $(wildcard dataplane/_c/*.c dataplane/_c/*.h) $(OPENSSL_STAMP) | $(BIN)/python
	@mkdir -p $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	$(PYTHON) api/genproto.py
	@touch $@

setup: $(STAMP)/deb $(STAMP)/pip
deps: setup

proto: | $(BIN)/python
	$(PYTHON) api/genproto.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || { echo "run: $(BIN)/ruff format ."; exit 1; }
	$(PYTHON) tools/view.py >/dev/null
	cd .build/view && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p istiopy
	cd .build/view && ../../$(BIN)/lint-imports --config ../../pyproject.toml --no-cache

crds: setup
	$(PYTHON) -m istiopy.mesh.crdgen crds/

# Helm charts: the base chart ships crds/ (tests/helm fails when the copies differ); regenerate the golden
# `helm template` renders in tests/helm/golden/ after a deliberate chart change.
charts: setup k8s-tools
	rm -f charts/base/crds/*.yaml && cp crds/*.yaml charts/base/crds/
	ISTIOPY_REGEN_GOLDEN=1 $(BIN)/pytest -q tests/helm -k golden

# The whole suite: lint, then every test (slow, k8s, netns and envoy suites included), then the C byte
# path under ASan+UBSan and a bounded fuzz run.
test: setup $(K8S_TOOLS_TARGET) upstream-istioctl wirecheck lint
	$(BIN)/pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-asan fuzz

# Upstream istioctl from the Go module proxy, cached by version (tools/istioctl/build.sh): the compatibility
# tests run it against ztunnel-py.
upstream-istioctl:
	@bash tools/istioctl/build.sh

# Decodes our protobuf bytes with upstream Istio's generated Go types (tests/wds/test_upstream_go_types.py).
wirecheck:
	@bash tools/wirecheck/build.sh

# ---- C extensions (dataplane/_c): sanitizers and fuzzing -------------------------------------------
# The ASan build goes to .build/asan (never in place: others' test runs load the normal build), and
# fastpath.py / pki.py load it through ISTIOPY_FASTPATH_SO. Python is not instrumented,
# hence the preloaded runtime and no leak checking (the interpreter keeps memory on purpose at exit).
FP_SRC := dataplane/_c/engine.c dataplane/_c/module.c dataplane/_c/memtls.c dataplane/_c/pki.c
FP_DEPS := $(FP_SRC) dataplane/_c/engine.h dataplane/_c/memtls.h
FP_LIBS := -lssl -lcrypto -lnghttp2 -lpthread
PY_INCLUDE = $$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SAN_FLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
	-Wall -Wextra -Werror
FUZZ_SECONDS ?= 20

.build/asan/_fastpath.so: $(FP_DEPS) | $(BIN)/python
	@mkdir -p $(@D)
	clang $(SAN_FLAGS) -shared -fPIC -shared-libasan -I$(PY_INCLUDE) $(FP_SRC) -o $@ $(FP_LIBS)

test-asan: setup .build/asan/_fastpath.so
	LD_PRELOAD=$$(clang -print-file-name=libclang_rt.asan-x86_64.so) \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	ISTIOPY_FASTPATH_SO=$(CURDIR)/.build/asan/_fastpath.so \
	  $(BIN)/pytest -q -p no:cacheprovider tests/fastpath tests/dataplane/test_pki.py tests/xds/test_memtls.py

.build/fuzz/fuzz_hbone: tests/fuzz/fuzz_hbone.c $(FP_DEPS)
	@mkdir -p $(@D)/corpus
	clang $(SAN_FLAGS) -fsanitize=fuzzer -Idataplane/_c tests/fuzz/fuzz_hbone.c dataplane/_c/engine.c -o $@ $(FP_LIBS)

# New inputs go to .build/fuzz/corpus; tests/fuzz/corpus (committed seeds) is read only.
fuzz: $(STAMP)/deb .build/fuzz/fuzz_hbone
	.build/fuzz/fuzz_hbone -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=.build/fuzz/ -print_final_stats=1 \
	  .build/fuzz/corpus tests/fuzz/corpus

# Quick loop for developers: everything not marked slow.
test-fast: setup
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(BIN)/istiod-py demo --config-dir examples/

# fortio (Istio's own load generator) for bench/dataplane.py, pinned and cached per version.
FORTIO_VERSION := 1.63.9
FORTIO := .build/tools/fortio-$(FORTIO_VERSION)/fortio
$(FORTIO):
	@mkdir -p $(@D)
	GOBIN=$(CURDIR)/$(@D) go install fortio.org/fortio@v$(FORTIO_VERSION)

bench: setup $(FORTIO)
	@for b in bench/*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done

clean:
	rm -rf .build build *.egg-info api/gen .mypy_cache .ruff_cache .pytest_cache
