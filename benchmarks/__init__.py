"""Runnable benchmarks (not timed tests): `python -m benchmarks.run --help`."""
