# Private static OpenSSL for the C byte path (included by the root Makefile; issue 8).
#   make openssl - build OpenSSL (pinned in tools/openssl/build.sh; source: the openssl-src crate via cargo)
#                  into $${ISTIOPY_CACHE:-~/.cache/istiopy}/openssl/<version> once; setup.py links
#                  istiopy.dataplane._fastpath against it (the ASan build and the fuzzer keep the system one)
OPENSSL_DIR := $(shell bash tools/openssl/build.sh --print-dir)
OPENSSL_STAMP := $(OPENSSL_DIR)/.stamp

.PHONY: openssl

openssl: $(OPENSSL_STAMP)

# Keyed by version (the directory); the script re-checks the stamp (pin + Configure options) when it
# changed, and only rebuilds when those did.
$(OPENSSL_STAMP): tools/openssl/build.sh
	@bash tools/openssl/build.sh
