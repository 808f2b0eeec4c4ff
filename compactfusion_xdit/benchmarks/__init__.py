"""Benchmark support for ``scripts/bench_*.py``: image metrics, method layouts, emulated links, rank loop."""
