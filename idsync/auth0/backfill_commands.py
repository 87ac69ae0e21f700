"""``idsync backfill``: store every existing Auth0 user as an event, or count what it would do."""

from __future__ import annotations

import json
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.exc import OperationalError

from idsync.auth0.backfill import (
    OUTCOMES,
    BackfillError,
    BackfillReport,
    DryRunReport,
    run_backfill,
)
from idsync.auth0.backfill_deletes import AbsentReport
from idsync.auth0.client import Auth0Error, ManagementClient, missing_auth0
from idsync.settings import Settings
from models.db import make_engine, make_session_factory


class _Bars:
    """The export job's progress, then the users read, as rich progress bars on stderr."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.job_task: TaskID | None = None
        self.users_task: TaskID | None = None

    def job(self, status: str, percent: int | None, seconds_left: int | None) -> None:
        if self.job_task is None:
            self.job_task = self.progress.add_task("Auth0 export job", total=100)
        left = f", about {seconds_left} s left" if seconds_left else ""
        self.progress.update(
            self.job_task,
            completed=percent or (100 if status == "completed" else 0),
            description=f"Auth0 export job: {status}{left}",
        )

    def users(self, read: int) -> None:
        if self.users_task is None:
            self.users_task = self.progress.add_task("Users stored", total=None)
        self.progress.update(self.users_task, completed=read, description=f"Users read: {read:,}")


def _settings() -> Settings:
    try:
        return Settings()  # type: ignore[call-arg]
    except ValidationError as error:
        raise click.ClickException(
            f"the configuration in the environment is invalid:\n{error}"
        ) from None


def _wake(settings: Settings) -> Any:
    from idsync.wakeups import Waker

    waker = Waker(settings)

    def wake(destinations: list[str]) -> None:
        for name in destinations:
            waker.wake(name)

    return waker, wake


@click.command("backfill")
@click.option(
    "--dry-run", is_flag=True, help="Count per destination what would change; store nothing."
)
@click.option(
    "--connection", "connection_id", metavar="CON_ID", help="Export one connection only (con_...)."
)
@click.option(
    "--destination",
    metavar="NAME",
    help="Deliver to this destination only, also for users stored by an earlier backfill.",
)
@click.option(
    "--no-deletes",
    is_flag=True,
    help="Do not store user.deleted for known users absent from a full export.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def backfill(
    dry_run: bool,
    connection_id: str | None,
    destination: str | None,
    no_deletes: bool,
    as_json: bool,
) -> None:
    """Store every existing Auth0 user as a user.backfill event, delivered like user.updated.

    Exports the users through the Management API (AUTH0_DOMAIN, AUTH0_CLIENT_ID,
    AUTH0_CLIENT_SECRET; read:users), under the stream's source
    (AUTH0_EVENT_SOURCE). Running it again stores only users that changed since.
    A full export (no --connection) also stores a user.deleted, dated when the
    export started, for each user idsync knows that the export no longer holds
    (deleted in Auth0 while the stream was disabled, say); DEPROVISION_GUARD
    holds a mass of them for approval. Exit status 1 when some exported lines
    could not be stored.

    \b
    Examples:
      idsync backfill --dry-run
      idsync backfill
      idsync backfill --destination licenses     a destination added later
      idsync backfill --connection con_Xa1b2c3d4e5f6g7h8
    """
    settings = _settings()
    if connection_id is not None and not connection_id.startswith("con_"):
        raise click.BadParameter("a connection id starts with con_", param_hint="--connection")
    missing = missing_auth0(settings, stream=False)
    if missing:
        raise click.ClickException(f"backfill is off: {missing} (Auth0 Management API access)")
    client = ManagementClient.from_settings(settings, stream=False)
    assert client is not None
    engine = make_engine(settings.database_url)
    waker, wake = _wake(settings)
    console = Console(stderr=True, highlight=False)
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=as_json,
            disable=as_json,
        ) as progress:
            report = run_backfill(
                sessions=make_session_factory(engine),
                settings=settings,
                client=client,
                connection_id=connection_id,
                destination=destination,
                dry_run=dry_run,
                deletes=not no_deletes,
                progress=_Bars(progress),
                wake=None if dry_run else wake,
            )
    except (BackfillError, Auth0Error) as error:
        raise click.ClickException(str(error)) from None
    except OperationalError as error:
        raise click.ClickException(
            f"cannot reach the outbox database (DATABASE_URL): {type(error.orig).__name__}"
        ) from None
    finally:
        client.close()
        waker.close()
        engine.dispose()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif isinstance(report, DryRunReport):
        _print_plan(report, settings)
    else:
        _print_stored(report, settings)
    if report.rejected:
        raise SystemExit(1)


def _print_rejections(console: Console, report: BackfillReport | DryRunReport) -> None:
    if not report.rejected:
        return
    console.print(f"{report.rejected:,} lines of the export could not be stored:")
    for rejection in report.rejections:
        console.print(f"  line {rejection.line}: {rejection.reason}", markup=False)


def _print_absence(console: Console, absence: AbsentReport, *, dry_run: bool) -> None:
    """One line on the users absent from the export: not checked, none, or how many."""
    if not absence.checked:
        console.print(f"{(absence.note or 'deletes not checked').capitalize()}.", markup=False)
        return
    started = f"{absence.export_started_at:%Y-%m-%d %H:%M:%S}Z" if absence.export_started_at else ""
    if not absence.absent:
        console.print(f"No user known to idsync is absent from the export of {started}.")
        return
    what = "each would be stored" if dry_run else f"stored ({absence.stored:,} new)"
    console.print(
        f"{absence.absent:,} users known to idsync are absent from the export of {started} "
        f"(deleted in Auth0): {what} as user.deleted.",
        markup=False,
    )


def _guard_notes(console: Console, settings: Settings, counts: dict[str, int]) -> None:
    """Say where the deprovision guard will hold part of what a backfill deprovisions."""
    for name, count in counts.items():
        limit = settings.deprovision_guard_of(name)
        if limit is not None and count > limit[0]:
            console.print(
                f"{name}: {count:,} deprovisions exceed DEPROVISION_GUARD ({limit[0]:,} per "
                f"{limit[1]:g} s); the rest will wait for approval: "
                f"idsync destinations approve-deprovisions {name}",
                markup=False,
            )


def _print_stored(report: BackfillReport, settings: Settings) -> None:
    console = Console(highlight=False)
    console.print(
        f"Backfill of {report.users:,} users under source {report.source} (job {report.job_id}): "
        f"{report.stored:,} stored, {report.existing:,} unchanged since an earlier backfill, "
        f"in {report.seconds:.1f} s.",
        markup=False,
    )
    _print_absence(console, report.absence, dry_run=False)
    absence = report.absence
    table = Table("destination", "deliveries added", "of which deletes")
    for name in report.destinations:
        deletes = absence.deliveries.get(name, 0)
        added = report.deliveries.get(name, 0) + deletes
        table.add_row(name, f"{added:,}", f"{deletes:,}")
    console.print(table)
    _guard_notes(console, settings, absence.deprovisioned)
    console.print(
        "The workers deliver them behind live traffic; follow with: idsync destinations list"
    )
    _print_rejections(console, report)


def _print_plan(report: DryRunReport, settings: Settings) -> None:
    console = Console(highlight=False)
    console.print(
        f"Dry run: {report.users:,} users under source {report.source}; nothing was stored.",
        markup=False,
    )
    _print_absence(console, report.absence, dry_run=True)
    checked = report.absence.checked
    table = Table("destination", *OUTCOMES, *(["absent"] if checked else []))
    for name in report.destinations:
        counts = report.counts[name]
        cells = [f"{counts[outcome]:,}" for outcome in OUTCOMES]
        if name in report.uncompared:
            cells[1] += " (not compared)"
        if checked:
            cells.append(f"{report.absence.deprovisioned.get(name, 0):,}")
        table.add_row(name, *cells)
    console.print(table)
    if checked:
        _guard_notes(console, settings, report.absence.deprovisioned)
    _print_rejections(console, report)
