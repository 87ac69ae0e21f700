"""Prometheus metrics of idsync, served by ingest's ``GET /metrics``.

Two kinds of numbers:

- Counters of what this ingest answered (``idsync_events_received_total``).
  Under gunicorn they live in prometheus_client's multiprocess files (see
  ``gunicorn.conf.py``), so a scrape sums every worker and a restarted worker
  does not reset them.
- The state of the outbox, read at scrape time by :class:`OutboxCollector`
  from the database and Redis, which every process on every machine shares:
  backlog, oldest pending delivery, pauses, recent attempts and each destination's
  rate-limit headroom. Nothing of it is kept in process memory, so no process
  can report a stale value, and every ingest process reports the same numbers
  (aggregate them across instances with ``max``, not ``sum``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from idsync.destinations import read_headroom
from idsync.settings import Settings, parse_duration
from models.db import db_now
from models.tables import Delivery, DeliveryAttempt, DeliveryStatus, DestinationState

log = logging.getLogger(__name__)

EVENTS_RECEIVED = Counter(
    "idsync_events_received_total",
    "Webhook deliveries by outcome (accepted, duplicate, ignored, rejected) and HTTP status.",
    ["outcome", "status_code"],
)

# Attempt latency and retries are read from the newest delivery_attempts rows:
# those of the last ATTEMPT_WINDOW_SECONDS, and never more than ATTEMPT_WINDOW_ROWS
# of them (a range of the primary key), so a scrape costs the same at any table size.
ATTEMPT_WINDOW_SECONDS = 300
ATTEMPT_WINDOW_ROWS = 50_000
ATTEMPT_BUCKETS_SECONDS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A scrape must not hang on a locked or overloaded database (PostgreSQL only).
SCRAPE_STATEMENT_TIMEOUT_MS = 5000

UNFINISHED = (DeliveryStatus.PENDING, DeliveryStatus.IN_PROGRESS)
RATE_LIMIT_HELP = {
    # read_headroom's names -> help; the metric is idsync_ratelimit_<name>
    "max": "Requests the destination allows per interval, as it reported.",
    "remaining": "Requests left in the destination's interval (the newest any worker saw).",
    "interval_seconds": "The destination's rate-limit interval.",
    "daily_max": "Requests the destination allows per day.",
    "daily_remaining": "Requests left today at the destination.",
    "age_seconds": "Seconds since a worker last saw the destination's rate-limit headroom.",
}


class IngestMetrics:
    """Counts what the webhook answered; read by ``GET /metrics``."""

    def event_received(self, outcome: str, status_code: int) -> None:
        EVENTS_RECEIVED.labels(outcome=outcome, status_code=str(status_code)).inc()


def exposition(*collectors: Collector) -> tuple[bytes, str]:
    """Prometheus text: this ingest's counters (every gunicorn worker's), then ``collectors``.

    The registry is built for this one scrape, so collectors read fresh values
    and nothing they produce outlives the request.
    """
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
        body = b""
    else:
        from prometheus_client import REGISTRY

        body = generate_latest(REGISTRY)
    for collector in collectors:
        registry.register(collector)
    return body + generate_latest(registry), CONTENT_TYPE_LATEST


@dataclass
class _DestinationFigures:
    """What one scrape learns about one destination."""

    by_status: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in DeliveryStatus})
    oldest_pending_age: float = 0.0
    overdue: float = 0.0
    paused: bool = False


@dataclass
class _AttemptFigures:
    """Recent attempts of one (destination, outcome): latency buckets and error categories."""

    buckets: list[int] = field(default_factory=lambda: [0] * len(ATTEMPT_BUCKETS_SECONDS))
    count: int = 0
    seconds: float = 0.0
    categories: dict[str, int] = field(default_factory=dict)


class OutboxCollector(Collector):
    """Reads the outbox and the destinations' headroom at scrape time; register it per scrape."""

    def __init__(
        self, *, sessions: sessionmaker[Session], settings: Settings, redis: Any = None
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.redis = redis

    def collect(self) -> Iterator[Metric]:
        """Every outbox metric family; nothing of the database's when it does not answer."""
        up = GaugeMetricFamily(
            "idsync_outbox_up", "1 when this scrape could read the outbox database, else 0."
        )
        try:
            with self.sessions() as session, session.begin():
                destinations, attempts = self._read(session)
                guard_and_drift = list(_guard_and_drift_metrics(session, self.settings))
                recovery = list(_recovery_metrics(session, self.settings))
        except SQLAlchemyError as error:
            log.warning("metrics: outbox not readable (%s)", type(error).__name__)
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            yield from self._destination_metrics(destinations)
            yield from self._attempt_metrics(attempts)
            yield from guard_and_drift
            yield from recovery
        yield from self._rate_limit_metrics()

    # Reading

    def _read(
        self, session: Session
    ) -> tuple[dict[str, _DestinationFigures], dict[tuple[str, str], _AttemptFigures]]:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text(f"SET LOCAL statement_timeout = {SCRAPE_STATEMENT_TIMEOUT_MS}"))
        now = db_now(session)
        destinations = {name: _DestinationFigures() for name in self.settings.destinations}

        def figures(name: str) -> _DestinationFigures:
            return destinations.setdefault(name, _DestinationFigures())

        counts = session.execute(
            select(Delivery.destination, Delivery.status, func.count()).group_by(
                Delivery.destination, Delivery.status
            )
        )
        for name, status, count in counts:
            figures(name).by_status[DeliveryStatus(status).value] = int(count)
        oldest = session.execute(
            select(
                Delivery.destination,
                func.min(Delivery.created_at),
                func.min(
                    case(
                        (Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at),
                        else_=None,
                    )
                ),
            )
            # Naming the destinations lets the claim index (destination, status, ...) answer.
            .where(Delivery.destination.in_(self.settings.destinations))
            .where(Delivery.status.in_(UNFINISHED))
            # Held work waits for an operator, not a worker: idsync_deliveries_held shows it.
            .where(Delivery.held.is_(None))
            .group_by(Delivery.destination)
        )
        for name, created_at, due_at in oldest:
            figures(name).oldest_pending_age = _seconds_between(created_at, now)
            figures(name).overdue = _seconds_between(due_at, now)
        states = {row.name: row for row in session.scalars(select(DestinationState))}
        for name, dest in destinations.items():
            stored = states.get(name)
            # The same rule as /readyz and the workers: missing settings mean paused.
            unconfigured = self.settings.destination(name).missing() is not None
            dest.paused = unconfigured or bool(stored and stored.paused)
        return destinations, self._read_attempts(session, now)

    def _read_attempts(
        self, session: Session, now: datetime
    ) -> dict[tuple[str, str], _AttemptFigures]:
        newest = session.scalar(select(func.max(DeliveryAttempt.id)))
        if newest is None:
            return {}
        buckets = [
            func.sum(case((DeliveryAttempt.duration_ms <= bound * 1000, 1), else_=0))
            for bound in ATTEMPT_BUCKETS_SECONDS
        ]
        rows = session.execute(
            select(
                Delivery.destination,
                DeliveryAttempt.outcome,
                DeliveryAttempt.error_category,
                func.count(),
                func.coalesce(func.sum(DeliveryAttempt.duration_ms), 0),
                *buckets,
            )
            .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
            .where(
                DeliveryAttempt.id > newest - ATTEMPT_WINDOW_ROWS,
                DeliveryAttempt.started_at >= now - timedelta(seconds=ATTEMPT_WINDOW_SECONDS),
            )
            .group_by(Delivery.destination, DeliveryAttempt.outcome, DeliveryAttempt.error_category)
        )
        attempts: dict[tuple[str, str], _AttemptFigures] = {}
        for name, outcome, category, count, total_ms, *in_buckets in rows:
            figures = attempts.setdefault((name, outcome), _AttemptFigures())
            figures.count += int(count)
            figures.seconds += float(total_ms) / 1000
            figures.buckets = [
                total + int(more or 0)
                for total, more in zip(figures.buckets, in_buckets, strict=True)
            ]
            label = category or "none"
            figures.categories[label] = figures.categories.get(label, 0) + int(count)
        return attempts

    # Metric families

    @staticmethod
    def _destination_metrics(destinations: dict[str, _DestinationFigures]) -> Iterable[Metric]:
        deliveries = GaugeMetricFamily(
            "idsync_deliveries",
            "Deliveries in the outbox by destination and status, now.",
            labels=["destination", "status"],
        )
        backlog = GaugeMetricFamily(
            "idsync_outbox_backlog",
            "Deliveries not finished yet (pending + in_progress).",
            labels=["destination"],
        )
        oldest = GaugeMetricFamily(
            "idsync_outbox_oldest_pending_age_seconds",
            "Age of the oldest unfinished delivery (since its event was stored); 0 when none.",
            labels=["destination"],
        )
        overdue = GaugeMetricFamily(
            "idsync_outbox_overdue_seconds",
            "How long the most overdue pending delivery has been due without being claimed.",
            labels=["destination"],
        )
        paused = GaugeMetricFamily(
            "idsync_destination_paused",
            "1 while the destination is paused (see /readyz for why), else 0.",
            labels=["destination"],
        )
        for name, figures in sorted(destinations.items()):
            for status, count in figures.by_status.items():
                deliveries.add_metric([name, status], count)
            unfinished = sum(figures.by_status[s.value] for s in UNFINISHED)
            backlog.add_metric([name], unfinished)
            oldest.add_metric([name], figures.oldest_pending_age)
            overdue.add_metric([name], figures.overdue)
            paused.add_metric([name], 1 if figures.paused else 0)
        return [deliveries, backlog, oldest, overdue, paused]

    @staticmethod
    def _attempt_metrics(attempts: dict[tuple[str, str], _AttemptFigures]) -> Iterable[Metric]:
        window = f"in the last {ATTEMPT_WINDOW_SECONDS} s"
        duration = GaugeHistogramMetricFamily(
            "idsync_delivery_attempt_duration_seconds",
            f"Duration of the HTTP calls made for deliveries {window}, by outcome "
            "(a gauge histogram of a sliding window: use histogram_quantile without rate).",
            labels=["destination", "outcome"],
        )
        recent = GaugeMetricFamily(
            "idsync_delivery_attempts_recent",
            f"Delivery attempts {window} by outcome and error category; "
            'outcome="retry" are the retries.',
            labels=["destination", "outcome", "error_category"],
        )
        for (name, outcome), figures in sorted(attempts.items()):
            bounds = [_bound_label(bound) for bound in ATTEMPT_BUCKETS_SECONDS]
            buckets = [*zip(bounds, figures.buckets, strict=True), ("+Inf", figures.count)]
            duration.add_metric([name, outcome], buckets, figures.seconds)
            for category, count in sorted(figures.categories.items()):
                recent.add_metric([name, outcome, category], count)
        return [duration, recent]

    def _rate_limit_metrics(self) -> Iterable[Metric]:
        if self.redis is None:
            return []
        try:
            headroom = read_headroom(self.redis, self.settings, list(self.settings.destinations))
        except Exception as error:  # no Redis: the headroom is unknown, not an error
            log.warning("metrics: rate-limit headroom not readable (%s)", type(error).__name__)
            return []
        families = {
            shown: GaugeMetricFamily(f"idsync_ratelimit_{shown}", help_text, labels=["destination"])
            for shown, help_text in RATE_LIMIT_HELP.items()
        }
        for name, figures in sorted(headroom.items()):
            for shown, value in figures.items():
                families[shown].add_metric([name], value)
        return [family for family in families.values() if family.samples]


def _guard_and_drift_metrics(session: Session, settings: Settings) -> Iterable[Metric]:
    """Deliveries the deprovision guard holds, and each destination's newest reconcile drift."""
    from models.guard import GUARD_HOLD, held_counts
    from models.reconcile import latest_runs

    held = GaugeMetricFamily(
        "idsync_deliveries_held",
        "Pending deliveries held for an operator (deprovision_guard: approve with "
        "idsync destinations approve-deprovisions), by destination.",
        labels=["destination", "reason"],
    )
    counts = held_counts(session=session)
    for name in sorted({*settings.destinations, *counts}):
        held.add_metric([name, GUARD_HOLD], counts.get(name, 0))
    drift = GaugeMetricFamily(
        "idsync_reconcile_drift",
        "Linked records that differed from idsync's links at the newest reconciliation, by kind.",
        labels=["destination", "kind"],
    )
    finished = GaugeMetricFamily(
        "idsync_reconcile_last_run_timestamp_seconds",
        "When the newest reconciliation of the destination finished (Unix time).",
        labels=["destination"],
    )
    for name, run in sorted(latest_runs(session=session).items()):
        for kind in ("changed", "missing", "live_deprovisioned"):
            drift.add_metric([name, kind], getattr(run, kind))
        if run.finished_at is not None:
            finished.add_metric([name], run.finished_at.timestamp())
    return [held, drift, finished]


def _recovery_metrics(session: Session, settings: Settings) -> Iterable[Metric]:
    """Recovery of Auth0's failed deliveries: the last pass, the stream, the missing-events warning.

    Nothing while recovery is off (AUTH0_* settings missing), so no alert fires on it.
    """
    from idsync.auth0.recovery import last_success_at, recovery_status

    state = recovery_status(session, settings)
    if state.off:
        return []
    interval = GaugeMetricFamily(
        "idsync_auth0_recovery_interval_seconds",
        "AUTH0_RECOVERY_INTERVAL: how often beat runs a recovery pass.",
    )
    interval.add_metric([], parse_duration(settings.auth0_recovery_interval))
    last_pass = GaugeMetricFamily(
        "idsync_auth0_recovery_last_pass_timestamp_seconds",
        "When the newest recovery pass finished, with or without an error (Unix time).",
    )
    last_success = GaugeMetricFamily(
        "idsync_auth0_recovery_last_success_timestamp_seconds",
        "When the newest recovery pass without an error finished (Unix time).",
    )
    failed = GaugeMetricFamily(
        "idsync_auth0_recovery_last_pass_failed",
        "1 when the newest recovery pass ended with an error (idsync auth0 status says which).",
    )
    events = GaugeMetricFamily(
        "idsync_auth0_recovery_last_pass_events",
        "Failed Auth0 deliveries the newest recovery pass listed, and how many of them it "
        "stored, found stored already (duplicates) or could not store (rejected).",
        labels=["outcome"],
    )
    redelivered = GaugeMetricFamily(
        "idsync_auth0_recovery_last_pass_redelivered",
        "1 when the newest recovery pass had Auth0 redeliver its window.",
    )
    disabled = GaugeMetricFamily(
        "idsync_auth0_stream_disabled",
        "1 while the newest recovery pass found the Event Stream disabled and could not "
        "re-enable it.",
    )
    missing = GaugeMetricFamily(
        "idsync_auth0_events_possibly_missing",
        "1 for 7 days after recovery re-enabled a disabled Event Stream: events of that "
        "period may never have been produced (run idsync backfill).",
    )
    succeeded = last_success_at(session, str(settings.auth0_event_stream_id))
    if succeeded is not None:
        last_success.add_metric([], succeeded.timestamp())
    newest = state.last_pass
    if newest is not None:
        if newest["finished_at"]:
            finished = datetime.fromisoformat(newest["finished_at"])
            last_pass.add_metric([], finished.timestamp())
        failed.add_metric([], 1 if newest["error"] else 0)
        for outcome in ("listed", "stored", "duplicates", "rejected"):
            events.add_metric([outcome], newest[outcome])
        redelivered.add_metric([], 1 if newest["redelivered"] else 0)
    disabled.add_metric([], 1 if state.stream_disabled else 0)
    missing.add_metric([], 1 if state.missing_events else 0)
    families = [interval, last_pass, last_success, failed, events, redelivered, disabled, missing]
    return [family for family in families if family.samples]


def _seconds_between(earlier: datetime | None, now: datetime) -> float:
    if earlier is None:
        return 0.0
    return max(0.0, (now - earlier).total_seconds())


def _bound_label(bound: float) -> str:
    return floatToGoString(bound)
