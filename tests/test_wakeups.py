"""Wake-ups are coalesced: Celery messages grow with batches, not with events."""

from __future__ import annotations

import time

import redis

from idsync.settings import Settings
from ingest import create_app
from tests.conftest import REDIS_URL
from tests.events import auth0_event
from tests.processes import flush_prefix


def test_a_burst_of_events_publishes_a_handful_of_messages(settings: Settings, db: None) -> None:
    # A prefix of its own, so that no running worker consumes these messages.
    prefix = f"{settings.redis_key_prefix}-burst"
    app = create_app(settings.model_copy(update={"redis_key_prefix": prefix}))
    client = app.test_client()
    headers = {"Authorization": "Bearer test-ingest-token"}
    started = time.monotonic()
    for n in range(1500):
        document = auth0_event("user.created", f"auth0|burst{n}", email=f"b{n}@example.com")
        assert client.post("/events/auth0", json=document, headers=headers).status_code == 202
    elapsed = time.monotonic() - started
    app.extensions["idsync"].engine.dispose()
    queue = f"{prefix}:celery:{prefix}.deliveries"
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        messages = connection.llen(queue)
    finally:
        connection.close()
        flush_prefix(REDIS_URL, prefix)
    # One wake-up per token lifetime at most, however many events arrive.
    allowed = 1 + int(elapsed / settings.wakeup_token_seconds) + 1
    assert 1 <= messages <= allowed, (messages, elapsed)
