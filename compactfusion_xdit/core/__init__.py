"""Residual channels without xfuser: config, schedule, per-key caches, the wire protocol, the session."""
