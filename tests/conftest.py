"""Shared fixtures: a PostgreSQL database and a Redis key prefix of this test run's own.

The database is created empty, migrated with Alembic (never ``create_all``), and
dropped at the end. Redis is shared with other runs, so every key this run
writes starts with its own prefix (Celery's queues included).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from idsync.settings import Settings
from models.db import make_engine, make_session_factory
from tests.pipeline import hubspot, pipeline  # noqa: F401 - shared fixtures
from tests.processes import empty_tables

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "auth0"  # real Auth0 payloads; see their README

PG_ADMIN_URL = os.environ.get("IDSYNC_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("IDSYNC_TEST_REDIS", "redis://127.0.0.1:6379/0")
# The machine is shared and noisy: slow generation is not a bug. Examples that use a
# function-scoped fixture reset it themselves (Pipeline.reset, e2e reset).
hypothesis_settings.register_profile(
    "dev",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
hypothesis_settings.register_profile(
    "ci", parent=hypothesis_settings.get_profile("dev"), derandomize=True, print_blob=True
)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")


def migrate(url: str) -> None:
    """``alembic upgrade head`` on ``url``, the way operators run it."""
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def database_url(run_id: str) -> Iterator[str]:
    """An empty PostgreSQL database of this run's own, migrated to head."""
    name = f"idsync_test_{run_id}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    migrate(url)
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def template_database(run_id: str) -> Iterator[str]:
    """A migrated database nobody connects to, copied for tests that need their own."""
    name = f"idsync_test_{run_id}_template"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    migrate(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    yield name
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def isolated_database_url(template_database: str) -> Iterator[str]:
    """A database of this test's own, for a test that runs its own idsync processes.

    The session's shared process stack (see ``e2e_stack``) sweeps the shared
    database; a test with its own workers must not have its rows taken by those.
    """
    name = f"{template_database[: -len('_template')]}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In-process tests first: once the shared process stack runs, its sweep would
    deliver their outbox rows to its own fake HubSpot."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


@pytest.fixture(scope="session")
def redis_prefix(run_id: str) -> Iterator[str]:
    prefix = f"idsync-test-{run_id}"
    yield prefix
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def settings(database_url: str, redis_prefix: str) -> Settings:
    """Settings with test timings: short leases, a quick sweep, a fast retry schedule."""
    return Settings(
        database_url=database_url,
        celery_broker_url=REDIS_URL,
        redis_url=REDIS_URL,
        redis_key_prefix=redis_prefix,
        ingest_token="test-ingest-token",
        hubspot_token="fake-token",
        hubspot_base_url="http://127.0.0.1:1",
        retry_schedule="0.1s,0.2s,0.3s,0.5s",
        retry_jitter=0,
        # The shortest lease the start-up rule allows for these call timeouts.
        hubspot_connect_timeout_seconds=0.5,
        hubspot_timeout_seconds=1.0,
        lease_seconds=8,
        settle_seconds=3,
        sweep_seconds=0.5,
        pause_probe_seconds=0.5,
    )


@pytest.fixture
def db(database_url: str) -> Iterator[None]:
    """Empty every table after the test, so each test starts from nothing."""
    yield
    engine = make_engine(database_url)
    empty_tables(engine)
    engine.dispose()


@pytest.fixture
def sessions(database_url: str, db: None):  # type: ignore[no-untyped-def]
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def e2e_hubspot():  # type: ignore[no-untyped-def]
    """One fake HubSpot for the session's process stack (reset before each test)."""
    from idsync.fakes.hubspot import FakeHubSpot

    with FakeHubSpot(token="fake-token", rate_limit=10_000, window_seconds=10) as fake:
        yield fake


@pytest.fixture(scope="session")
def e2e_stack(database_url, redis_prefix, e2e_hubspot, tmp_path_factory):  # type: ignore[no-untyped-def]
    """ingest (gunicorn), two Celery workers and beat, started once per session."""
    from tests.processes import ServiceStack, stack_env

    engine = make_engine(database_url)
    stack = ServiceStack(
        env=stack_env(database_url, REDIS_URL, redis_prefix, e2e_hubspot),
        workdir=tmp_path_factory.mktemp("e2e"),
        hubspot=e2e_hubspot,
        sessions=make_session_factory(engine),
    )
    try:
        stack.start_ingest()
        stack.start_worker("worker1")
        stack.start_worker("worker2")
        stack.start_beat()
        yield stack
    finally:
        stack.stop()
        engine.dispose()


@pytest.fixture
def e2e(e2e_stack, e2e_hubspot, db, redis_prefix):  # type: ignore[no-untyped-def]
    """The session's process stack, with an empty outbox and a fresh fake HubSpot."""
    from tests.processes import flush_prefix

    e2e_hubspot.reset()
    yield e2e_stack
    e2e_hubspot.reset()
    flush_prefix(REDIS_URL, redis_prefix, keep=(f"{redis_prefix}:celery:",))
