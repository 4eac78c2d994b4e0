"""MLflow tracking and the model registry.

Runs, the model bundle and its contract, model cards, registered versions, one resolver,
promotion gates.
"""
