"""istiod-py: the control-plane entry point, the one place that wires sources, store, xDS and CA."""
