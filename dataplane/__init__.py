"""The data plane: ztunnel-py (node proxy, HBONE, capture, node agent) and the waypoint launcher.

Imports only the wire layer (``istiopy.api``) of ours: never the model, generators or servers.
"""
