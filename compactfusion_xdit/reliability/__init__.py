"""Run-time guarantees: the config digest across ranks, lost-rank detection, fault injection for tests."""
