"""Engines and sessions: built on demand from a URL, never at import time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 15_000


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` and mean psycopg 3, which is what idsync installs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Ingest, worker and beat share one file on the embedded default: WAL lets
    # readers run beside the writer, and the busy timeout queues writers.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, *, autocommit: bool = False, **options: Any) -> Engine:
    """An engine for ``url`` with the settings idsync relies on per database.

    ``autocommit`` makes every statement its own transaction on PostgreSQL, for work
    that is one statement (``models.outbox.commit_event``); SQLite ignores it, so
    that work whose statements must commit together still does.
    """
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    options.setdefault("pool_pre_ping", True)
    options.setdefault("pool_size", 5)
    options.setdefault("connect_args", {"connect_timeout": 5})
    if autocommit:
        options["isolation_level"] = "AUTOCOMMIT"
    return create_engine(url, **options)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit, so callers can read results."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


def db_now(session: Session) -> datetime:
    """The database's clock, which decides leases and due times for every process."""
    if session.get_bind().dialect.name == "sqlite":
        value = session.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    value = session.execute(select(text("clock_timestamp()"))).scalar_one()
    return value.astimezone(UTC)
