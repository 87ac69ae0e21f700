"""``idsync up`` and ``idsync demo``: the whole service on one machine, no setup.

Both run the same commands as docker-compose (migrate, gunicorn, a Celery
worker and beat) as child processes. On the embedded default the outbox and the
broker are SQLite files in the working folder; a single worker process keeps
the in-process rate limiter exact.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from idsync.demo_destinations import (
    HUBSPOT_PASSED,
    DemoDestination,
    demo_destinations,
    start_destination,
)
from idsync.fakes.hubspot import FakeHubSpot
from idsync.settings import Settings
from idsync.stack import (
    Stack,
    beat_command,
    free_port,
    ingest_command,
    migrate_command,
    worker_command,
)
from models.db import make_engine, make_session_factory
from models.tables import FINISHED, Delivery, Event

console = Console()


def start_services(stack: Stack, port: int, *, worker_concurrency: int = 1) -> None:
    """Migrate, then start ingest, worker and beat, and wait until ingest is ready."""
    stack.run(migrate_command())
    stack.start("ingest", ingest_command(port, workers=2))
    stack.start("worker", worker_command(concurrency=worker_concurrency))
    stack.start("beat", beat_command(stack.workdir / "celerybeat-schedule"))
    stack.wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=60)
    stack.wait_for_log("worker", "ready", timeout=60)


def run_up(port: int) -> int:
    """Run idsync until Ctrl-C; print the webhook URL and its token."""
    env: dict[str, str] = {}
    token = os.environ.get("INGEST_TOKEN")
    if not token:
        token = secrets.token_urlsafe(24)
        env["INGEST_TOKEN"] = token
    stack = Stack(env=env, workdir=Path.cwd())
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    try:
        start_services(stack, port)
        console.print(f"[bold green]idsync is up.[/] Webhook: http://127.0.0.1:{port}/events/auth0")
        console.print("Auth0 sends the token as: Authorization: Bearer <token>")
        console.print(f"Ingest token: [bold]{token}[/]")
        if not os.environ.get("HUBSPOT_TOKEN"):
            console.print("HUBSPOT_TOKEN is not set: HubSpot stays paused; events queue up.")
        console.print("Logs: ingest.log, worker.log, beat.log. Ctrl-C stops everything.")
        while not stopping:
            time.sleep(0.5)
            stack.check_alive()
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as error:
        console.print(f"[red]idsync could not start:[/] {error}")
        return 1
    finally:
        console.print("Stopping ingest, worker and beat...")
        stack.stop_all()
    return 0


def _sample_events(now: float) -> list[list[tuple[str, dict[str, Any]]]]:
    """The demo script in rounds: what an IdP and Auth0 typically send, warts and all."""
    from datetime import UTC, datetime, timedelta

    base = datetime.fromtimestamp(now, UTC) - timedelta(minutes=1)

    def event(kind: str, user: str, seconds: int, **fields: Any) -> dict[str, Any]:
        moment = (base + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
        previous = fields.pop("previous_email", None)
        user_object = {
            "user_id": user,
            "created_at": moment,
            "updated_at": moment,
            "identities": [{"provider": "auth0", "user_id": user}],
            **fields,
        }
        data: dict[str, Any] = {"object": user_object}
        if previous:
            data["previous_object"] = {**user_object, "email": previous}
        return {
            "specversion": "1.0",
            "type": kind,
            "id": f"evt_demo_{user[-3:]}_{seconds}",
            "source": "urn:auth0:demo.auth0app.com",
            "time": moment,
            "data": data,
            "a0tenant": "demo",
        }

    ann = "auth0|demo-ann"
    created = event(
        "user.created", ann, 0, email="ann@example.com", given_name="Ann", family_name="Lee"
    )
    return [
        [
            ("a new user", created),
            ("the same delivery again (Auth0 is at-least-once)", created),
            (
                "a user Okta will deactivate",
                event(
                    "user.created", "auth0|demo-bob", 1, email="bob@example.com", given_name="Bob"
                ),
            ),
            (
                "a user to delete",
                event(
                    "user.created", "auth0|demo-cat", 2, email="cat@example.com", given_name="Cat"
                ),
            ),
            (
                "a user without an email",
                event("user.created", "auth0|demo-dan", 3, given_name="Dan"),
            ),
        ],
        [
            (
                "an email change",
                event(
                    "user.updated",
                    ann,
                    20,
                    email="ann.lee@example.com",
                    previous_email="ann@example.com",
                    given_name="Ann",
                    family_name="Lee",
                ),
            ),
            (
                "SCIM deactivation: blocked",
                event(
                    "user.updated",
                    "auth0|demo-bob",
                    30,
                    email="bob@example.com",
                    given_name="Bob",
                    blocked=True,
                ),
            ),
            (
                "a delete without an email",
                event("user.deleted", "auth0|demo-cat", 40, deleted_at="2025-01-01T00:00:00Z"),
            ),
        ],
        [
            (
                "an older update arriving late",
                event("user.updated", ann, 10, email="ann@example.com", given_name="Annie"),
            ),
        ],
    ]


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return False


def run_demo(keep_files: bool = False) -> int:
    """Run the demo end to end; 0 when every destination ends in the expected state.

    The destinations are those ``DESTINATIONS`` names (HubSpot alone when unset),
    each against a local simulator of its kind.
    """
    workdir = Path(tempfile.mkdtemp(prefix="idsync-demo-"))
    token = secrets.token_urlsafe(16)
    names = demo_destinations(os.environ)
    with ExitStack() as fakes:
        try:
            targets = [start_destination(name, os.environ, fakes.enter_context) for name in names]
        except ValueError as error:
            console.print(f"[red]The demo could not run:[/] {error}")
            shutil.rmtree(workdir, ignore_errors=True)
            return 2
        env = {
            "DATABASE_URL": f"sqlite:///{workdir / 'idsync.db'}",
            "CELERY_BROKER_URL": f"sqla+sqlite:///{workdir / 'broker.db'}",
            "REDIS_URL": "",
            "INGEST_TOKEN": token,
            "DESTINATIONS": ",".join(names),
            "SWEEP_SECONDS": "1",
            "RETRY_SCHEDULE": "1s,2s,5s",
        }
        for target in targets:
            env.update(target.settings)
        stack = Stack(env=env, workdir=workdir)
        port = free_port()
        try:
            console.print(
                f"Starting idsync in {workdir} (SQLite outbox and broker) for {', '.join(names)}..."
            )
            start_services(stack, port)
            ok = _play(port, token, Settings(database_url=env["DATABASE_URL"]), targets)
        except (RuntimeError, TimeoutError, ValueError) as error:  # ValueError: a bad setting
            console.print(f"[red]The demo could not run:[/] {error}")
            ok = False
        finally:
            stack.stop_all()
    if keep_files or not ok:
        console.print(f"Logs and databases kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def _play(port: int, token: str, settings: Settings, targets: list[DemoDestination]) -> bool:
    url = f"http://127.0.0.1:{port}/events/auth0"
    table = Table(title="Posted to /events/auth0")
    for column in ("round", "what", "type", "answer"):
        table.add_column(column)
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)

    def finished() -> bool:
        with sessions() as session:
            statuses = session.scalars(select(Delivery.status)).all()
            return bool(statuses) and all(status in FINISHED for status in statuses)

    done = True
    try:
        with requests.Session() as http:
            http.headers["Authorization"] = f"Bearer {token}"
            for number, batch in enumerate(_sample_events(time.time()), start=1):
                for what, document in batch:
                    answer = http.post(url, json=document, timeout=10)
                    table.add_row(
                        str(number),
                        what,
                        document["type"],
                        f"{answer.status_code} {answer.json()['status']}",
                    )
                done = done and _wait_until(finished, timeout=60)
        console.print(table)
        _show_outcomes(sessions, targets)
    finally:
        engine.dispose()
    if not done:
        console.print("[bold red]Demo failed:[/] some deliveries did not finish within 60 s")
    return _expected(targets) and done


def _show_outcomes(sessions: Any, targets: list[DemoDestination]) -> None:
    deliveries = Table(title="Deliveries")
    for column in ("event", "type", "destination", "status", "reason"):
        deliveries.add_column(column)
    with sessions() as session:
        rows = session.execute(
            select(
                Event.event_id, Event.type, Delivery.destination, Delivery.status, Delivery.reason
            )
            .join(Delivery)
            .order_by(Delivery.id)
        ).all()
    for row in rows:
        deliveries.add_row(
            row.event_id, row.type, row.destination, row.status.value, row.reason or ""
        )
    console.print(deliveries)
    for target in targets:
        if isinstance(target.fake, FakeHubSpot):
            _show_contacts(target.name, target.fake)


def _show_contacts(name: str, hubspot: FakeHubSpot) -> None:
    contacts = Table(title="What HubSpot holds" if name == "hubspot" else f"What {name} holds")
    for column in ("id", "email", "firstname", "lastname", "archived"):
        contacts.add_column(column)
    for contact in hubspot.contacts(include_archived=True):
        props = contact["properties"]
        contacts.add_row(
            contact["id"],
            props.get("email", ""),
            props.get("firstname", ""),
            props.get("lastname", ""),
            str(contact.get("archived", False)),
        )
    console.print(contacts)


def _expected(targets: list[DemoDestination]) -> bool:
    """Check every destination's end state; one line each, then the verdict."""
    verdicts = [target.verdict() for target in targets]
    if len(targets) == 1 and targets[0].name == "hubspot":
        # HubSpot alone, as ``make demo`` runs it: its one line is the verdict.
        ok, line = verdicts[0]
        if ok:
            console.print(f"[bold green]Demo passed:[/] {HUBSPOT_PASSED}")
        else:
            console.print(f"[bold red]Demo failed:[/] {line.split(': ', 1)[1]}")
        return ok
    for ok, line in verdicts:
        mark = "[green]ok[/]  " if ok else "[red]bad[/] "
        console.print(f"{mark} {line}", soft_wrap=True)
    failed = [target.name for target, (ok, _) in zip(targets, verdicts, strict=True) if not ok]
    if failed:
        console.print(f"[bold red]Demo failed:[/] {', '.join(failed)} did not end as expected")
        return False
    console.print(
        f"[bold green]Demo passed:[/] all {len(targets)} destinations "
        f"({', '.join(t.name for t in targets)}) hold every user's newest state."
    )
    return True
