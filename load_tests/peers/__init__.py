"""Benchmark peers: plain servers of the same model bundle the serving benchmark compares with."""
