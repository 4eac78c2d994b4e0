"""Datasets: synthetic phantoms with ground truth, adapters from public layouts to the manifest contract."""
