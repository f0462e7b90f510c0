"""Benchmarks of codsr (run as scripts: ``python benchmarks/latency.py --help``)."""
