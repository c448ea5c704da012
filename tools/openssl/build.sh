#!/usr/bin/env bash
# Build a private, static OpenSSL for ztunnel-py's C byte path (istiopy.dataplane._fastpath), into a cache
# keyed by version (issue 8: OpenSSL >= 3.x has the AVX-512 VAES/VPCLMULQDQ AES-GCM code that Debian's 3.0
# lacks; AES-GCM is the largest single cost of the established-tunnel byte path).
#
# The source comes from crates.io (the openssl-src crate carries OpenSSL's release tarball contents), fetched
# by cargo into its registry through a throw-away project that pins the exact crate version; cargo checks
# the crate's checksum. setup.py links libssl.a/libcrypto.a into _fastpath with their symbols hidden, so a
# Python process that also loads the ssl module keeps the system libssl.so beside it (the C-path ztunnel-py
# does not: its control-plane TLS and PKI run on this one).
#
# Layout: $CACHE/openssl/<version>/{include/openssl/*.h,lib/libssl.a,lib/libcrypto.a,.stamp}
# where CACHE=${ISTIOPY_CACHE:-$HOME/.cache/istiopy}. A warm cache is a no-op; the .stamp, written last,
# records the pin and Configure options, so changing either here rebuilds.
#
# Usage: tools/openssl/build.sh [--print-dir]
set -euo pipefail

OPENSSL_VERSION=3.6.3
CRATE_VERSION=300.6.1   # openssl-src 300.6.1+3.6.3
CACHE=${ISTIOPY_CACHE:-$HOME/.cache/istiopy}
DIR=$CACHE/openssl/$OPENSSL_VERSION

if [[ ${1:-} == --print-dir ]]; then
    echo "$DIR"
    exit 0
fi
if [[ $# -gt 0 ]]; then
    echo "usage: $0 [--print-dir]" >&2
    exit 2
fi
# TLS 1.3/1.2, AES-GCM and ChaCha20-Poly1305 with asm, X25519/P-256, X.509 verification; no apps, tests,
# docs, engines, legacy provider, DTLS, QUIC, SRP or compression. OPENSSLDIR is the cache dir (no
# openssl.cnf there: defaults, independent of the system's config). Sections per function/object: setup.py
# links with --gc-sections (-0.3 MB of code mapped per process).
CONFIGURE=(linux-x86_64 --prefix="$DIR" --openssldir="$DIR/ssl" --libdir=lib
    no-shared no-module no-tests no-docs no-apps no-legacy no-engine no-comp no-zlib no-ssl3 no-dtls
    no-srp no-quic no-weak-ssl-ciphers no-idea no-seed no-camellia no-aria no-sm2 no-sm3 no-sm4
    no-whirlpool no-rc2 no-rc4 no-bf no-cast no-md4 no-mdc2 no-rmd160
    -fPIC -O2 -ffunction-sections -fdata-sections)
# The stamp records how the cache was built: a change to this script's pin or options rebuilds it.
STAMP_TEXT="openssl-src $CRATE_VERSION+$OPENSSL_VERSION: ${CONFIGURE[*]}"
if [[ -f $DIR/lib/libssl.a && -f $DIR/lib/libcrypto.a && "$(cat "$DIR/.stamp" 2>/dev/null)" == "$STAMP_TEXT" ]]; then
    touch "$DIR/.stamp"  # newer than this script: make's rule for the stamp is satisfied
    exit 0
fi

CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
find_src() {
    local d
    for d in "$CARGO_HOME"/registry/src/*/"openssl-src-$CRATE_VERSION+$OPENSSL_VERSION"/openssl; do
        [[ -f $d/VERSION.dat ]] && { echo "$d"; return 0; }
    done
    return 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/istiopy-openssl.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if ! SRC=$(find_src); then
    command -v cargo >/dev/null || { echo "openssl/build.sh: 'cargo' not found on PATH (fetches openssl-src from crates.io)" >&2; exit 1; }
    mkdir -p "$WORK/fetch/src"
    : >"$WORK/fetch/src/lib.rs"
    cat >"$WORK/fetch/Cargo.toml" <<TOML
[package]
name = "istiopy-openssl-fetch"
version = "0.0.0"
edition = "2021"
[dependencies]
openssl-src = "=$CRATE_VERSION"
TOML
    echo "openssl/build.sh: cargo fetch openssl-src =$CRATE_VERSION"
    (cd "$WORK/fetch" && cargo fetch -q)
    # cargo fetch only downloads the .crate; unpacking into registry/src happens on build or metadata.
    (cd "$WORK/fetch" && cargo metadata -q --format-version 1 >/dev/null)
    SRC=$(find_src) || { echo "openssl/build.sh: openssl-src $CRATE_VERSION not unpacked under $CARGO_HOME/registry/src" >&2; exit 1; }
fi

got=$(awk -F'[ =]+' '/^MAJOR|^MINOR|^PATCH/ {v = v (v ? "." : "") $2} END {print v}' "$SRC/VERSION.dat")
if [[ $got != "$OPENSSL_VERSION" ]]; then
    echo "openssl/build.sh: $SRC is OpenSSL $got, expected $OPENSSL_VERSION" >&2
    exit 1
fi

echo "openssl/build.sh: building OpenSSL $OPENSSL_VERSION (static, -fPIC) into $DIR"
cp -a "$SRC" "$WORK/src"
cd "$WORK/src"
./Configure "${CONFIGURE[@]}" >"$WORK/configure.log" 2>&1 || { cat "$WORK/configure.log" >&2; exit 1; }
JOBS=${ISTIOPY_OPENSSL_JOBS:-$(nproc 2>/dev/null || echo 2)}
make -s -j"$JOBS" build_libs >"$WORK/build.log" 2>&1 || { tail -n 50 "$WORK/build.log" >&2; exit 1; }
make -s install_dev DESTDIR="$WORK/stage" >"$WORK/install.log" 2>&1 || { tail -n 50 "$WORK/install.log" >&2; exit 1; }

# Swap the finished tree in whole, then stamp it: an interrupted build leaves no half-populated cache.
mkdir -p "$(dirname "$DIR")"
rm -rf "$DIR.old"
[[ -e $DIR ]] && mv "$DIR" "$DIR.old"
mv "$WORK/stage$DIR" "$DIR"
rm -rf "$DIR.old"
printf '%s\n' "$STAMP_TEXT" >"$DIR/.stamp"
echo "openssl/build.sh: done: $DIR/lib/libssl.a $DIR/lib/libcrypto.a"
