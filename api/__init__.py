"""The wire layer: our own .proto files, their generated code and protocol clients.

Shared by the control plane and the data plane; it imports nothing else of ours, so the data plane can
depend on it without pulling in the model, generators or servers.
"""
