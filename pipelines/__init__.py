"""DVC stages: one thin module per stage, run as ``python -m pipelines.<stage> --dataset NAME``."""
