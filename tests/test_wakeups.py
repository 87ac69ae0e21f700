"""Wake-ups are coalesced: Celery messages grow with batches, not with events."""

from __future__ import annotations

import time

import redis

from idsync.settings import Settings
from idsync.wakeups import Waker
from ingest import create_app
from tests.conftest import REDIS_URL
from tests.events import auth0_event
from tests.processes import flush_prefix, wait_for


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


class _CountingWaker(Waker):
    """A Waker whose publish only records when it happened."""

    def __init__(self, settings: Settings, quiet_seconds: float) -> None:
        super().__init__(settings, quiet_seconds=quiet_seconds)
        self.published: list[tuple[str, float]] = []

    def _publish(self, destination: str) -> bool:
        self.published.append((destination, time.monotonic()))
        return True


def test_a_process_asks_redis_once_per_quiet_time_and_never_drops_the_last_wakeup(
    settings: Settings,
) -> None:
    waker = _CountingWaker(settings, quiet_seconds=0.2)
    try:
        assert waker.wake("hubspot"), "the first wake-up goes out at once"
        first_at = waker.published[0][1]
        for _ in range(200):
            assert not waker.wake("hubspot")  # owed, within the quiet time
        assert waker.wake("salesforce"), "each destination has a quiet time of its own"
        # The owed wake-up is sent when the quiet time ends, with no further request.
        wait_for(lambda: len(waker.published) == 3, 10, "the owed wake-up")
        trailing = [at for name, at in waker.published if name == "hubspot"][1]
        assert trailing - first_at >= 0.2
        # Nothing more is owed: no further publish follows.
        time.sleep(0.3)
        assert len(waker.published) == 3
        # A wake-up owed when the process stops is sent by close().
        waker.wake("hubspot")
        waker.wake("hubspot")
    finally:
        waker.close()
    assert [name for name, _ in waker.published].count("hubspot") == 4
