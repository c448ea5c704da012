"""Kubernetes mode: kopf handlers feeding the mesh store, the waypoint reconciler and status writers."""
