"""Public testing kit: real network-namespace pods and nodes, a control plane, waypoints, a test cluster."""
