# Real Kubernetes test cluster (included by the root Makefile).
#   make k8s-tools  - build kube-apiserver, kube-controller-manager, kubectl, etcd, helm from the Go module
#                     proxy into $${ISTIOPY_CACHE:-~/.cache/istiopy}/k8s/<version>/bin (skips what is built)
#   make cluster    - start etcd + kube-apiserver + kube-controller-manager (+ kubelet stand-in) until Ctrl-C
K8S_TOOLS_TARGET := k8s-tools
K8S_BIN_DIR = $(shell bash tools/k8s/build.sh --print-bin-dir)
CLUSTER_ARGS ?= --kubelet

.PHONY: k8s-tools cluster

k8s-tools:
	@bash tools/k8s/build.sh

# -P: the repo root has an `operator/` folder that must not shadow the standard library's `operator`.
cluster: setup k8s-tools
	$(PYTHON) -P -m istiopy.testing.cluster $(CLUSTER_ARGS)
