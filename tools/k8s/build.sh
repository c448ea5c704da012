#!/usr/bin/env bash
# Build the real Kubernetes test-cluster binaries (kube-apiserver, kube-controller-manager, kubectl, etcd,
# helm) from the Go module proxy only, into a cache keyed by version.
#
# Why wrapper modules: k8s.io/kubernetes and etcd's server module carry `replace` directives, so
# `go install pkg@version` refuses them. Each sub-directory here is a tiny module that pins the version and
# (for Kubernetes) replaces every staging module with its published v0.Y.Z tag. See
# shared/reference/k8s-test-cluster.md.
#
# Layout (one PATH-able directory; etcd and helm keep their own versioned dirs and are symlinked in):
#   $CACHE/k8s/<k8s version>/bin/{kube-apiserver,kube-controller-manager,kubectl,etcd,helm}
#   $CACHE/etcd/<etcd version>/bin/etcd
#   $CACHE/helm/<helm version>/bin/helm
# where CACHE=${ISTIOPY_CACHE:-$HOME/.cache/istiopy}.
#
# Usage: tools/k8s/build.sh [--print-bin-dir]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${ISTIOPY_CACHE:-$HOME/.cache/istiopy}

# Versions: must match the wrapper go.mod files (checked below so they cannot drift silently).
K8S_VERSION=v1.34.3
ETCD_VERSION=v3.6.4
HELM_VERSION=v3.19.5

BIN_DIR=$CACHE/k8s/$K8S_VERSION/bin
ETCD_DIR=$CACHE/etcd/$ETCD_VERSION/bin
HELM_DIR=$CACHE/helm/$HELM_VERSION/bin

if [[ ${1:-} == --print-bin-dir ]]; then
    echo "$BIN_DIR"
    exit 0
fi
if [[ $# -gt 0 ]]; then
    echo "usage: $0 [--print-bin-dir]" >&2
    exit 2
fi

command -v go >/dev/null || { echo "build.sh: 'go' not found on PATH (need Go >= 1.24)" >&2; exit 1; }

check_pin() {  # module dir, module path, expected version
    local got
    got=$(awk -v m="$2" '$1 == m { print $2 }' "$HERE/$1/go.mod" | head -n1)
    if [[ $got != "$3" ]]; then
        echo "build.sh: $1/go.mod pins $2 $got but build.sh expects $3" >&2
        exit 1
    fi
}
check_pin kubernetes k8s.io/kubernetes "$K8S_VERSION"
check_pin etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
check_pin helm helm.sh/helm/v3 "$HELM_VERSION"

# Static, reproducible, small binaries; 2-core friendly. -mod=readonly: go.mod/go.sum are committed.
export CGO_ENABLED=0
export GOFLAGS="-trimpath -mod=readonly"
JOBS=${ISTIOPY_GO_JOBS:-$(nproc 2>/dev/null || echo 2)}

mkdir -p "$BIN_DIR" "$ETCD_DIR" "$HELM_DIR"

# build <module dir> <out dir> <tags> <ldflags> <name=package>...
# Binaries are built one after another; packages they share compile once thanks to GOCACHE.
build() {
    local moddir=$1 outdir=$2 tags=$3 ldflags=$4
    shift 4
    local spec name pkg start secs
    for spec in "$@"; do
        name=${spec%%=*}
        pkg=${spec#*=}
        if [[ -x $outdir/$name ]]; then
            echo "$name: present $outdir/$name"
            continue
        fi
        start=$(date +%s)
        if ! (cd "$HERE/$moddir" &&
            go build -p "$JOBS" -tags "$tags" -ldflags "$ldflags" -o "$outdir/.$name.tmp" "$pkg"); then
            rm -f "$outdir/.$name.tmp"
            echo "$name: FAILED (go build $pkg in tools/k8s/$moddir)" >&2
            exit 1
        fi
        mv -f "$outdir/.$name.tmp" "$outdir/$name"
        secs=$(($(date +%s) - start))
        echo "$name: built $outdir/$name ($(du -m "$outdir/$name" | cut -f1) MB, ${secs}s)"
    done
}

K8S_MINOR=${K8S_VERSION#v1.}
K8S_MINOR=${K8S_MINOR%%.*}
K8S_LDFLAGS="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    K8S_LDFLAGS+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$K8S_MINOR"
    K8S_LDFLAGS+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
build kubernetes "$BIN_DIR" "selinux,notest,grpcnotrace" "$K8S_LDFLAGS" \
    kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
    kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
    kubectl=k8s.io/kubernetes/cmd/kubectl

build etcd "$ETCD_DIR" "" "-s -w" etcd=go.etcd.io/etcd/server/v3

HELM_LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
HELM_LDFLAGS+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    HELM_LDFLAGS+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$K8S_MINOR"
done
build helm "$HELM_DIR" "" "$HELM_LDFLAGS" helm=helm.sh/helm/v3/cmd/helm

# One directory for PATH / the Python test harness.
ln -sfn "$ETCD_DIR/etcd" "$BIN_DIR/etcd"
ln -sfn "$HELM_DIR/helm" "$BIN_DIR/helm"
echo "bin dir: $BIN_DIR"
