"""Benchmarks behind the figures the README quotes; each script runs on its own or via `python -m pipelines bench`."""
