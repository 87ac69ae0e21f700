"""``idsync reconcile`` and ``idsync destinations approve-deprovisions``.

Registered at the bottom of ``idsync/cli.py``; they use its helpers (settings,
the outbox, wake-ups, safe printing), imported when a command runs.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.progress import Progress
from rich.table import Table
from sqlalchemy.orm import Session

from models.db import transaction
from models.guard import approve_deprovisions as release_held
from models.guard import held_counts


@click.command("reconcile")
@click.argument("destination")
@click.option("--fix", is_flag=True, help="Resync every user whose record drifted.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def reconcile(destination: str, fix: bool, as_json: bool) -> None:
    """Read every linked record back from DESTINATION and report drift from idsync's links.

    Drift is a record changed by hand, missing (deleted or merged at the
    destination), or live though idsync deprovisioned the user. --fix resyncs
    each drifted user's newest state behind live traffic (re-read from Auth0
    when retention purged it). Reads go through the destination's rate limit.
    Exits 0 when in step (or all drift was queued for a fix), 1 when drift
    remains, 2 when the destination cannot be read (a webhook).

    \b
    Examples:
      idsync reconcile hubspot
      idsync reconcile hubspot --fix
      idsync reconcile hubspot --json | jq .drift
    """
    from idsync import cli
    from workers.reconcile import Unreadable
    from workers.reconcile import reconcile as run_reconcile
    from workers.runtime import build_runtime

    settings = cli._settings()
    cli._configured(settings, destination)
    runtime = build_runtime(settings)
    try:
        adapter = runtime.destination(destination)
        with Progress(console=cli._err(), transient=as_json) as bar:
            task = bar.add_task(f"Reading {destination}", total=None)
            report = run_reconcile(
                sessions=runtime.sessions,
                settings=settings,
                destination=adapter,
                fix=fix,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        adapter.close()
    except Unreadable as error:
        cli._err().print(cli._shown(f"Cannot reconcile: {error}"))
        sys.exit(2)
    finally:
        runtime.engine.dispose()
    if fix and report.fixed:
        cli._wake(settings, [destination])
    if as_json:
        cli._print_json(report.to_json())
    else:
        _print_report(report)
    if report.error:
        sys.exit(1)
    if report.drifted and (not fix or report.unfixed):
        sys.exit(1)


def _print_report(report: object) -> None:
    from idsync import cli
    from workers.reconcile import LISTED, ReconcileReport

    assert isinstance(report, ReconcileReport)
    console = cli._out()
    console.print(
        cli._shown(
            f"{report.destination}: checked {report.checked} linked records, "
            f"{report.checked - report.drifted} in step; changed by hand "
            f"{report.counts['changed']}, missing (deleted or merged) {report.counts['missing']}, "
            f"live though deprovisioned {report.counts['live_deprovisioned']}."
        )
    )
    if report.drift:
        table = Table(title=f"Drift (first {LISTED})", title_justify="left")
        for name in ("subject", "record", "drift"):
            table.add_column(name, overflow="fold")
        for drift in report.drift[:LISTED]:
            table.add_row(cli._shown(drift.subject), cli._shown(drift.external_id), drift.kind)
        console.print(table)
    if report.fix:
        console.print(f"Queued {report.fixed} resyncs; the workers were woken.")
        for subject, why in report.unfixed:
            console.print(cli._shown(f"Not fixed: {subject}: {why}"))
    elif report.drifted:
        console.print(f"Fix it with: idsync reconcile {report.destination} --fix")
    if report.error:
        cli._err().print(cli._shown(f"Reconcile stopped early: {report.error}"))


@click.command("approve-deprovisions")
@click.argument("name")
@click.option("--dry-run", is_flag=True, help="Only count what is held.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before releasing.")
def approve_deprovisions(name: str, dry_run: bool, yes: bool) -> None:
    """Release every deprovision the guard (DEPROVISION_GUARD) holds for NAME.

    The held deliveries become due at once and the guard's count restarts.
    Held deprovisions of users whose newer events reached NAME since end
    `skipped: stale`, so approving after the IdP was fixed is safe.

    \b
    Examples:
      idsync destinations approve-deprovisions hubspot --dry-run
      idsync destinations approve-deprovisions hubspot --yes
    """
    from idsync import cli

    with cli._outbox() as (settings, sessions):
        cli._configured(settings, name)
        with transaction(sessions) as session:
            held = held_counts(session=session).get(name, 0)
        if not held:
            cli._out().print(cli._shown(f"Nothing is held for {name}."))
            return
        if dry_run:
            cli._out().print(cli._shown(f"{held} held deprovisions would be released to {name}."))
            return
        if not yes:
            click.confirm(f"Release {held} held deprovisions to {name}?", abort=True, err=True)
        with transaction(sessions) as session:
            released = release_held(session=session, destination=name)
        cli._wake(settings, [name])
    cli._out().print(
        cli._shown(f"Released {released} held deprovisions to {name}; the workers were woken.")
    )


def held_deprovisions(session: Session, views: list[dict[str, Any]]) -> list[int]:
    """How many deliveries the guard holds for each destination view, in order."""
    held = held_counts(session=session)
    return [held.get(view["name"], 0) for view in views]
