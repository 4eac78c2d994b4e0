"""MLflow tracking and the model registry.

Runs, model cards, registered versions, one resolver, promotion gates, and the MLflow run of
an external evaluation. It stands on :mod:`breastscan.evaluation`, never the other way.
"""
