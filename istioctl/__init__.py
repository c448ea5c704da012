"""istioctl-py: the command-line tool (validate, analyze, waypoint, ztunnel-config, ...)."""
