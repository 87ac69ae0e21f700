"""Prometheus metrics of the ingest process (multiprocess-safe under gunicorn)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)

EVENTS_RECEIVED = Counter(
    "idsync_events_received_total",
    "Webhook deliveries by outcome (accepted, duplicate, ignored, rejected) and HTTP status.",
    ["outcome", "status_code"],
)


class IngestMetrics:
    """Counts what the webhook answered; read by ``GET /metrics``."""

    def event_received(self, outcome: str, status_code: int) -> None:
        EVENTS_RECEIVED.labels(outcome=outcome, status_code=str(status_code)).inc()


def exposition(extra: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """The Prometheus text for this process, summed over gunicorn workers if needed."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    body = generate_latest(registry)
    if extra is not None:
        body += generate_latest(extra)
    return body, CONTENT_TYPE_LATEST
