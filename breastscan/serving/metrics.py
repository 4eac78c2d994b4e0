"""The service's Prometheus metrics (served on ``/metrics`` with BentoML's own).

One :class:`ServiceMetrics` per worker process; the engine, the batchers, the HTTP edge and
the drift recorder report through its methods.
"""

from __future__ import annotations

from typing import Any

import bentoml


class ServiceMetrics:
    """Requests by endpoint and outcome, images and batch sizes per model, drift per model, and
    the live swaps of served versions."""

    def __init__(self) -> None:
        self.requests = bentoml.metrics.Counter(
            name="breastscan_requests", documentation="Requests answered by the service, by endpoint and "
            "outcome (ok, or the error code)", labelnames=["endpoint", "outcome"])
        self.predictions = bentoml.metrics.Counter(
            name="breastscan_model_predictions", documentation="Images run through each model",
            labelnames=["model"])
        self.batch_size = bentoml.metrics.Histogram(
            name="breastscan_model_batch_size", documentation="Images per model call (adaptive batches)",
            labelnames=["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, float("inf")))
        self.drift_score = bentoml.metrics.Gauge(
            name="breastscan_drift_score", documentation="Drift of the latest window of requests from the "
            "model's training reference, per feature: PSI (histogram), KS D (scalars), Cramer's V "
            "(categories)", labelnames=["model", "feature"])
        self.drift_detected = bentoml.metrics.Gauge(
            name="breastscan_drift_detected", documentation="1 when the latest window of a model drifted "
            "(monitoring.thresholds), else 0", labelnames=["model"])
        self.drift_dropped = bentoml.metrics.Gauge(
            name="breastscan_drift_records_dropped", documentation="Requests not recorded for drift "
            "monitoring because its queue was full (this worker)", labelnames=["model"])
        self.swaps = bentoml.metrics.Counter(
            name="breastscan_model_swaps", documentation="Moves of a model's registry stage this worker "
            "acted on, by outcome: swapped, refused (contract changed), failed (download or load), "
            "withdrawn (stage removed)", labelnames=["model", "outcome"])

    def count_request(self, endpoint: str, outcome: str) -> None:
        """One answered request (``outcome``: ``ok`` or its error code)."""
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def count_batch(self, model: str, images: int) -> None:
        """One model call of ``images`` images."""
        self.batch_size.labels(model=model).observe(images)
        self.predictions.labels(model=model).inc(images)

    def count_swap(self, model: str, outcome: str) -> None:
        """One move of ``model``'s stage acted on (``outcome``: swapped, refused, failed, withdrawn)."""
        self.swaps.labels(model=model, outcome=outcome).inc()

    def publish_drift(self, report: Any, dropped: int) -> None:
        """The drift gauges of one model from a scoring (on the recorder's thread)."""
        self.drift_dropped.labels(model=report.model).set(dropped)
        if not report.enough_data:
            return
        for feature in report.features:
            self.drift_score.labels(model=report.model, feature=feature.feature).set(feature.score)
        self.drift_detected.labels(model=report.model).set(int(report.drift))
