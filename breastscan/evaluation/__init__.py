"""The one scoring core.

Metrics with grouped bootstrap intervals, calibration, scoring a bundle on rows, reports.
The evaluate stage, external evaluation, the cross-validation benchmark and the promotion
gate are thin callers; the benchmark files (and declaring their ready-made entries in
params.yaml) live here too.
"""
