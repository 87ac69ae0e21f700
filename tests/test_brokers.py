"""Celery's brokers are interchangeable: RabbitMQ by changing CELERY_BROKER_URL alone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from idsync.fakes.hubspot import FakeHubSpot
from models.db import make_engine, make_session_factory
from tests.conftest import REDIS_URL
from tests.events import auth0_event
from tests.processes import ServiceStack, stack_env

pytestmark = pytest.mark.e2e

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbitmq_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


def _require_rabbitmq() -> None:
    """Skip without RabbitMQ on a developer's machine; in CI a missing broker is a failure."""
    if _rabbitmq_answers():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(
            "CI=true but nothing listens on 127.0.0.1:5672: start RabbitMQ before the tests "
            "(the RabbitMQ broker test must run in CI, not be skipped)"
        )
    pytest.skip("no RabbitMQ on 127.0.0.1:5672")


def test_rabbitmq_broker_with_the_redis_rate_limiter(
    isolated_database_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    _require_rabbitmq()
    database_url = isolated_database_url
    engine = make_engine(database_url)
    prefix = f"{redis_prefix}-amqp"  # its own queue name and limiter keys
    with FakeHubSpot(token="fake-token") as hubspot:
        env = stack_env(database_url, REDIS_URL, prefix, hubspot, CELERY_BROKER_URL=RABBITMQ_URL)
        stack = ServiceStack(
            env=env, workdir=tmp_path, hubspot=hubspot, sessions=make_session_factory(engine)
        )
        try:
            stack.start_ingest()
            stack.start_worker()
            stack.start_beat()
            for n in range(5):
                answer = stack.post(
                    auth0_event("user.created", f"auth0|amqp{n}", email=f"amqp{n}@example.com")
                )
                assert answer.status_code == 202
            stack.wait_finished(5)
        finally:
            stack.stop()
            engine.dispose()
        assert len(hubspot.contacts()) == 5
