#!/usr/bin/env bash
# Build upstream istioctl from the Go module proxy into a cache keyed by version, for the compatibility tests
# (tests/istioctl/test_upstream_istioctl.py: upstream istioctl reading ztunnel-py's admin API).
#
# istio.io/istio carries no `replace` directives, so `go install pkg@version` works directly. The pin is a
# pseudo-version of Istio's main branch the module proxy serves (istio.io/istio publishes no semver tags as
# a Go module).
#
# Layout: $CACHE/istioctl/<version>/istioctl, where CACHE=${ISTIOPY_CACHE:-$HOME/.cache/istiopy}.
# Usage: tools/istioctl/build.sh [--print-path]
set -euo pipefail

ISTIO_VERSION=v0.0.0-20260827124520-eed52ebb66ad
CACHE=${ISTIOPY_CACHE:-$HOME/.cache/istiopy}
DIR=$CACHE/istioctl/$ISTIO_VERSION

if [[ ${1:-} == --print-path ]]; then
    echo "$DIR/istioctl"
    exit 0
fi
if [[ $# -gt 0 ]]; then
    echo "usage: $0 [--print-path]" >&2
    exit 2
fi
if [[ -x $DIR/istioctl ]]; then
    exit 0
fi
command -v go >/dev/null || { echo "build.sh: 'go' not found on PATH" >&2; exit 1; }
echo "building upstream istioctl $ISTIO_VERSION into $DIR (cold: several minutes on 2 cores)"
mkdir -p "$DIR.tmp"
GOBIN=$DIR.tmp GOFLAGS=-mod=mod go install "istio.io/istio/istioctl/cmd/istioctl@$ISTIO_VERSION"
mv "$DIR.tmp/istioctl" "$DIR.tmp/istioctl.ok" && mkdir -p "$DIR" && mv "$DIR.tmp/istioctl.ok" "$DIR/istioctl"
rmdir "$DIR.tmp" 2>/dev/null || true
