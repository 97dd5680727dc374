"""Benchmarks: `gpuwatch bench ...` commands that print a table and write JSON."""
