"""``GET /metrics``: every family with the right values, and sums over real gunicorn workers.

The in-process tests drive the real Flask app and ``run_batch`` through the
``Pipeline`` helper of the pipeline tests; the multiprocess test starts gunicorn
with two workers (the command the README and compose run) and reads the counter
that both workers wrote.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from idsync.destinations import headroom_key
from idsync.fakes.hubspot import FakeHubSpot
from idsync.settings import Settings
from idsync.stack import ROOT, Stack, free_port, ingest_command
from ingest import create_app
from models.db import transaction
from models.tables import Auth0RecoveryPass, DeliveryAttempt
from tests.conftest import REDIS_URL
from tests.events import auth0_event, fixture
from tests.pipeline import Pipeline
from tests.processes import INGEST_TOKEN, iter_logs, stack_env, wait_for
from workers.delivery import run_batch
from workers.ratelimit import LocalRateLimiter
from workers.runtime import build_destination

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def received(samples: Samples, outcome: str, code: int) -> float:
    key = ("idsync_events_received_total", (("outcome", outcome), ("status_code", str(code))))
    return samples.get(key, 0.0)


@pytest.fixture
def pipe(pipeline: Pipeline) -> Iterator[Pipeline]:
    """The pipeline with the destination workers build, rate-limit reporter included."""
    pipeline.hubspot.set_rate_limit(50, 10)
    pipeline.destination.close()
    pipeline.destination = build_destination(  # type: ignore[assignment]
        "hubspot", pipeline.settings, LocalRateLimiter(limit=1000, window=1)
    )
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(headroom_key(pipeline.settings, "hubspot"))
    yield pipeline
    client.delete(headroom_key(pipeline.settings, "hubspot"))
    client.close()


def metrics(pipe: Pipeline) -> Samples:
    answer = pipe.client.get("/metrics")
    assert answer.status_code == 200
    assert answer.content_type.startswith("text/plain")
    return scrape(answer.get_data(as_text=True))


def test_metrics_follow_events_and_deliveries(pipe: Pipeline) -> None:
    before = metrics(pipe)
    started = time.monotonic()
    pipe.post(auth0_event("user.created", "auth0|m1", email="m1@example.com", at=0))
    duplicate = auth0_event("user.created", "auth0|m2", email="m2@example.com", at=0)
    pipe.post(duplicate)
    pipe.post(duplicate)
    pipe.post(auth0_event("user.created", "auth0|m3", email="not an email", at=0))
    test_event = copy.deepcopy(fixture("user_created_test_event.json"))
    test_event["id"] = f"evt_{uuid.uuid4().hex[:20]}"
    pipe.post(test_event)
    pipe.client.post("/events/auth0", json=duplicate, headers={"Authorization": "Bearer wrong"})

    queued = metrics(pipe)
    for outcome, code, n in [
        ("accepted", 202, 3),
        ("duplicate", 200, 1),
        ("ignored", 202, 1),
        ("rejected", 401, 1),
    ]:
        assert received(queued, outcome, code) - received(before, outcome, code) == n, outcome
    assert value(queued, "idsync_outbox_up") == 1
    assert value(queued, "idsync_deliveries", destination="hubspot", status="pending") == 3
    assert value(queued, "idsync_outbox_backlog", destination="hubspot") == 3
    # The oldest pending delivery was stored during this test: older than nothing, younger
    # than the test.
    age = value(queued, "idsync_outbox_oldest_pending_age_seconds", destination="hubspot")
    assert 0 < age < time.monotonic() - started
    assert value(queued, "idsync_destination_paused", destination="hubspot") == 0

    pipe.hubspot.fail_next(1, status=503)  # the first call: the lookup of all three
    drained = time.monotonic()
    pipe.drain()
    done = metrics(pipe)
    assert pipe.deliveries() == [("succeeded", None), ("succeeded", None), ("failed", "rejected")]
    for status, count in [("succeeded", 2), ("failed", 1), ("pending", 0), ("in_progress", 0)]:
        assert value(done, "idsync_deliveries", destination="hubspot", status=status) == count
    assert value(done, "idsync_outbox_backlog", destination="hubspot") == 0
    assert value(done, "idsync_outbox_oldest_pending_age_seconds", destination="hubspot") == 0
    assert value(done, "idsync_outbox_overdue_seconds", destination="hubspot") == 0
    # The 503 sent the whole first batch (all three users) back: one retry each.
    recent = {
        (dict(labels)["outcome"], dict(labels)["error_category"]): v
        for (name, labels), v in done.items()
        if name == "idsync_delivery_attempts_recent"
    }
    assert recent[("retry", "INTERNAL_ERROR")] == 3
    # One delivery failed, once, on HubSpot's refusal of its email.
    failed = {key: v for key, v in recent.items() if key[0] == "failed"}
    assert failed == {("failed", "VALIDATION_ERROR"): 1}
    with pipe.sessions() as session:
        attempts = session.scalar(select(func.count(DeliveryAttempt.id)))
    assert sum(recent.values()) == attempts
    counted = sum(
        v
        for (name, _labels), v in done.items()
        if name == "idsync_delivery_attempt_duration_seconds_gcount"
    )
    assert counted == attempts
    retried = value(
        done,
        "idsync_delivery_attempt_duration_seconds_bucket",
        destination="hubspot",
        outcome="retry",
        le="+Inf",
    )
    assert retried == 3

    # Headroom: the newest X-HubSpot-RateLimit-* values a worker saw, i.e. those of the
    # fake's last answer. Every call counted against both limits (none was a 401 or 429),
    # and the drain takes far less than the 10-second window.
    calls = pipe.hubspot.stats()["total"]
    assert calls == len(pipe.hubspot.requests_log) >= 2
    hubspot = {"destination": "hubspot"}
    assert value(done, "idsync_ratelimit_max", **hubspot) == 50
    assert value(done, "idsync_ratelimit_remaining", **hubspot) == 50 - calls
    assert value(done, "idsync_ratelimit_interval_seconds", **hubspot) == 10
    assert value(done, "idsync_ratelimit_daily_remaining", **hubspot) == 250_000 - calls
    age = value(done, "idsync_ratelimit_age_seconds", **hubspot)
    assert 0 < age < time.monotonic() - drained


def test_paused_destination_and_overdue_work_show(pipe: Pipeline) -> None:
    pipe.hubspot.set_token("rotated")
    started = time.monotonic()
    pipe.post(auth0_event("user.created", "auth0|p1", email="p1@example.com"))
    run_batch(sessions=pipe.sessions, settings=pipe.settings, destination=pipe.destination)
    paused = metrics(pipe)
    assert value(paused, "idsync_destination_paused", destination="hubspot") == 1
    assert value(paused, "idsync_outbox_backlog", destination="hubspot") == 1
    # The pause put the delivery back as pending and due, and nobody can claim it now: it
    # has been overdue since then, which is within this test.
    overdue = value(paused, "idsync_outbox_overdue_seconds", destination="hubspot")
    assert 0 < overdue < time.monotonic() - started
    assert (
        value(
            paused,
            "idsync_delivery_attempts_recent",
            destination="hubspot",
            outcome="pause",
            error_category="INVALID_AUTHENTICATION",
        )
        == 1
    )


def test_unreadable_outbox_reports_down_not_an_error(pipe: Pipeline) -> None:
    broken = pipe.settings.model_copy(
        update={"database_url": "postgresql://postgres@127.0.0.1:1/none"}
    )
    from ingest import create_app

    app = create_app(broken)
    answer = app.test_client().get("/metrics")
    assert answer.status_code == 200
    samples = scrape(answer.get_data(as_text=True))
    assert value(samples, "idsync_outbox_up") == 0
    assert ("idsync_outbox_backlog", (("destination", "hubspot"),)) not in samples
    app.extensions["idsync"].engine.dispose()


@pytest.mark.e2e
def test_gunicorn_workers_are_summed_and_survive_a_restart(
    database_url: str, redis_prefix: str, tmp_path: Path, db: None
) -> None:
    # No delivery rows and no shared wake-up queue: a running e2e stack's workers
    # have nothing to do with this test's events.
    prefix = f"{redis_prefix}-multiproc"
    multiproc = tmp_path / "prometheus"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with FakeHubSpot() as hubspot:
        env = stack_env(
            database_url,
            REDIS_URL,
            prefix,
            hubspot,
            DESTINATIONS="",
            PROMETHEUS_MULTIPROC_DIR=str(multiproc),
        )
        stack = Stack(env=env, workdir=tmp_path)
        try:
            stack.start("ingest", ingest_command(port, workers=2))
            stack.wait_for_http(f"{url}/readyz", timeout=60)
            total = 40
            with requests.Session() as http, ThreadPoolExecutor(8) as pool:
                http.headers["Authorization"] = f"Bearer {INGEST_TOKEN}"

                def post(n: int) -> int:
                    document = auth0_event(
                        "user.created", f"auth0|mp{n}", email=f"mp{n}@example.com"
                    )
                    return http.post(f"{url}/events/auth0", json=document, timeout=10).status_code

                assert list(pool.map(post, range(total))) == [202] * total
            # Each worker counted into its own file, and every scrape sums them all.
            workers = {p.stem.rsplit("_", 1)[1] for p in multiproc.glob("counter_*.db")}
            assert len(workers) == 2, f"expected both workers to count, got {workers}"
            for _ in range(4):
                samples = scrape(requests.get(f"{url}/metrics", timeout=10).text)
                assert received(samples, "accepted", 202) == total
            # A worker that dies is replaced; what it counted is still in the sum.
            os.kill(int(sorted(workers)[0]), signal.SIGKILL)
            wait_for(lambda: _booted(tmp_path) >= 3, 30, "gunicorn to replace the worker")
            for _ in range(4):
                samples = scrape(requests.get(f"{url}/metrics", timeout=10).text)
                assert received(samples, "accepted", 202) == total
        finally:
            stack.stop_all()


def _booted(workdir: Path) -> int:
    return sum(text.count("Booting worker with pid") for _path, text in iter_logs(workdir))


def test_alert_rules_file_is_valid() -> None:
    """``deploy/prometheus/alerts.yml`` has Prometheus's rule-file shape and our metrics."""
    document = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert set(document) == {"groups"}
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    for group in document["groups"]:
        assert isinstance(group["name"], str) and group["rules"]
        assert set(group) <= {"name", "interval", "limit", "rules"}
    alerts = {rule["alert"]: rule for rule in rules}
    assert {
        "IdsyncBacklogTooOld",
        "IdsyncDestinationPaused",
        "IdsyncFailedDeliveriesRising",
    } <= set(alerts)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert isinstance(rule["expr"], str) and "idsync_" in rule["expr"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "for" in rule:
            assert rule["for"][-1] in "smh" and rule["for"][:-1].isdigit()
    assert "idsync_outbox_oldest_pending_age_seconds" in alerts["IdsyncBacklogTooOld"]["expr"]
    assert "idsync_destination_paused" in alerts["IdsyncDestinationPaused"]["expr"]
    assert 'status="failed"' in alerts["IdsyncFailedDeliveriesRising"]["expr"]


def test_recovery_metrics_follow_the_newest_pass(settings: Settings, sessions: Any) -> None:
    def scraped(configured: Settings) -> Samples:
        app = create_app(configured)
        try:
            return scrape(app.test_client().get("/metrics").get_data(as_text=True))
        finally:
            app.extensions["idsync"].engine.dispose()

    def add_pass(**fields: Any) -> datetime:
        finished = datetime.now(UTC).replace(microsecond=0)
        window = {"window_from": finished - timedelta(minutes=2), "window_to": finished}
        with transaction(sessions) as session:
            session.add(
                Auth0RecoveryPass(
                    stream_id="est_metrics",
                    trigger="beat",
                    finished_at=finished,
                    **window,
                    **fields,
                )
            )
        return finished

    assert not [name for name, _ in scraped(settings) if name.startswith("idsync_auth0_")]
    configured = settings.model_copy(
        update={
            "auth0_domain": "tenant.example.com",
            "auth0_client_id": "id",
            "auth0_client_secret": "secret",
            "auth0_event_stream_id": "est_metrics",
            "auth0_recovery_interval": "2m",
        }
    )
    counts = {"listed": 7, "stored": 5, "duplicates": 2, "rejected": 0}
    first = add_pass(stream_status="disabled", redelivered=True, **counts)
    samples = scraped(configured)
    assert value(samples, "idsync_auth0_recovery_interval_seconds") == 120
    assert value(samples, "idsync_auth0_recovery_last_pass_timestamp_seconds") == first.timestamp()
    for outcome, count in counts.items():
        assert value(samples, "idsync_auth0_recovery_last_pass_events", outcome=outcome) == count
    assert value(samples, "idsync_auth0_recovery_last_pass_redelivered") == 1
    assert value(samples, "idsync_auth0_stream_disabled") == 1
    assert value(samples, "idsync_auth0_events_possibly_missing") == 0

    reenabled = add_pass(stream_status="disabled", reenabled=True)
    samples = scraped(configured)
    assert value(samples, "idsync_auth0_stream_disabled") == 0
    assert value(samples, "idsync_auth0_events_possibly_missing") == 1
    assert value(samples, "idsync_auth0_recovery_last_pass_events", outcome="listed") == 0
    assert value(samples, "idsync_auth0_recovery_last_pass_failed") == 0

    add_pass(stream_status="enabled", error="Auth0 GET /api/v2/event-streams answered 403")
    samples = scraped(configured)
    assert value(samples, "idsync_auth0_recovery_last_pass_failed") == 1
    last_success = value(samples, "idsync_auth0_recovery_last_success_timestamp_seconds")
    assert last_success == reenabled.timestamp()
    # Every recovery metric an alert names is one /metrics serves.
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    named = set(re.findall(r"idsync_auth0_\w+", alerts))
    assert len(named) >= 5
    assert named <= {name for name, _ in samples}
