"""The mesh model: typed, validated Kubernetes and Istio resources, the config store and its sources.

Pure data and validation; no network I/O (the file source is the one exception: it reads files).
"""
