"""Flower sees idsync's tasks through the prefixed Redis broker, and they hold no personal data.

A wake-up is published the way ingest publishes it (``Waker.wake``) while Flower
watches; Flower must count it in the queue before a worker runs, then show the
finished ``idsync.deliver`` task with the destination name as its only argument.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import select

from idsync.settings import Settings
from idsync.stack import Stack, free_port, worker_command
from idsync.wakeups import DELIVER_TASK, Waker, wakeup_key
from ingest.validation import to_new_event
from models.db import make_engine, make_session_factory, transaction
from models.outbox import record_event
from models.tables import Delivery
from tests.conftest import REDIS_URL
from tests.events import auth0_event

pytestmark = pytest.mark.e2e

FLOWER_USER, FLOWER_PASSWORD = "operator", "flower-test-password"
CELERY = worker_command()[0]  # this environment's celery script


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise TimeoutError(f"{what} within {timeout}s")


@pytest.fixture
def flower_settings(settings: Settings, redis_prefix: str, isolated_database_url: str) -> Settings:
    """The test settings on a broker prefix and a database of this test's own."""
    return settings.model_copy(
        update={"redis_key_prefix": f"{redis_prefix}-flower", "database_url": isolated_database_url}
    )


@pytest.fixture
def stack(flower_settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    env = {
        "DATABASE_URL": flower_settings.database_url,
        "CELERY_BROKER_URL": REDIS_URL,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": flower_settings.redis_key_prefix,
        "INGEST_TOKEN": "test-ingest-token",
        "HUBSPOT_TOKEN": "fake-token",
        # Nothing listens there: with an empty outbox the task sends nothing anyway.
        "HUBSPOT_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "SWEEP_SECONDS": "1",
        "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}",
    }
    running = Stack(env=env, workdir=tmp_path)
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture
def waker(flower_settings: Settings) -> Iterator[Waker]:
    waker = Waker(flower_settings)
    yield waker
    waker.celery.close()
    waker.redis.close()


class Flower:
    """Flower's HTTP API, signed in."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        response = requests.get(
            f"{self.url}{path}", params=params, auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=5
        )
        response.raise_for_status()
        return response.json()

    def queued(self, queue: str) -> int | None:
        lengths = self.get("/api/queues/length")["active_queues"]
        return next((q["messages"] for q in lengths if q["name"] == queue), None)

    def finished_deliveries(self) -> list[dict[str, Any]]:
        tasks = self.get("/api/tasks", taskname=DELIVER_TASK)
        return [task for task in tasks.values() if task["state"] == "SUCCESS"]


def test_flower_shows_a_published_wake_up_with_ids_only(
    stack: Stack, waker: Waker, flower_settings: Settings
) -> None:
    port = free_port()
    # Flower parses its own options with tornado: --name=value, never "--name value".
    stack.start(
        "flower", [CELERY, "-A", "workers", "flower", f"--port={port}", "--address=127.0.0.1"]
    )
    stack.wait_for_http(f"http://127.0.0.1:{port}/healthcheck")
    flower = Flower(f"http://127.0.0.1:{port}")
    assert requests.get(f"{flower.url}/api/tasks", timeout=5).status_code == 401

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.delete(wakeup_key(flower_settings, "hubspot"))
    finally:
        client.close()
    _store_one_event(flower_settings)
    assert waker.wake("hubspot"), "the wake-up was not published"

    # No worker yet: Flower counts the message under the broker's key prefix.
    queue = flower_settings.redis_key_prefix + ".deliveries"
    assert wait_until(lambda: flower.queued(queue) == 1, f"Flower did not count 1 in {queue}")

    stack.start("worker", worker_command(concurrency=1))
    [task] = wait_until(flower.finished_deliveries, "Flower did not see idsync.deliver finish")
    assert task["args"] == "['hubspot']"
    assert task["kwargs"] == "{}"
    info = flower.get(f"/api/task/info/{task['uuid']}")
    assert (info["name"], info["args"], info["kwargs"]) == (DELIVER_TASK, "['hubspot']", "{}")
    assert flower.queued(queue) == 0
    # From a delivery id to its task: the delivery records the task that claimed it.
    engine = make_engine(flower_settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            delivery = session.scalars(select(Delivery)).one()
    finally:
        engine.dispose()
    assert delivery.task_id == task["uuid"]
    assert flower.get(f"/api/task/info/{delivery.task_id}")["name"] == DELIVER_TASK


def _store_one_event(settings: Settings) -> None:
    """One accepted event in the outbox, as ingest stores it."""
    document = auth0_event("user.created", "auth0|flower", email="flower@example.com")
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            record_event(
                session=session,
                event=to_new_event(document, json.dumps(document).encode()),
                destinations=["hubspot"],
            )
    finally:
        engine.dispose()
