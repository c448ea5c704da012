#!/usr/bin/env bash
# Build tools/wirecheck (decodes our protobuf bytes with upstream Istio's generated Go types) into a cache
# keyed by the hash of its sources, so a warm machine skips it. Dependencies come from the Go module proxy.
#
# Layout: $CACHE/wirecheck/<hash>/wirecheck, where CACHE=${ISTIOPY_CACHE:-$HOME/.cache/istiopy}.
# Usage: tools/wirecheck/build.sh [--print-path]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${ISTIOPY_CACHE:-$HOME/.cache/istiopy}
HASH=$(cat "$HERE/main.go" "$HERE/go.mod" "$HERE/go.sum" | sha256sum | cut -c1-16)
DIR=$CACHE/wirecheck/$HASH

if [[ ${1:-} == --print-path ]]; then
    echo "$DIR/wirecheck"
    exit 0
fi
if [[ $# -gt 0 ]]; then
    echo "usage: $0 [--print-path]" >&2
    exit 2
fi
if [[ -x $DIR/wirecheck ]]; then
    exit 0
fi
command -v go >/dev/null || { echo "build.sh: 'go' not found on PATH" >&2; exit 1; }
echo "building tools/wirecheck into $DIR"
mkdir -p "$DIR"
(cd "$HERE" && go build -mod=mod -o "$DIR/wirecheck.tmp" .)
mv "$DIR/wirecheck.tmp" "$DIR/wirecheck"
