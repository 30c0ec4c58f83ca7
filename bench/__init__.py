"""Benchmarks of dalign against TRL, run side by side in one process (`make bench`)."""
