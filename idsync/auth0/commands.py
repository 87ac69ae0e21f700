"""``idsync auth0 status`` and ``idsync auth0 recover``: recovery of Auth0's failed deliveries.

Registered at the bottom of ``idsync/cli.py``; they use its helpers (settings,
the outbox, safe printing), imported when a command runs.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from idsync.auth0.client import ManagementClient, recovery_off
from idsync.auth0.recovery import PassReport, RecoveryStatus, recover, recovery_status
from idsync.settings import parse_duration
from models.db import transaction

FIGURES = ("listed", "stored", "duplicates", "rejected")


@click.group("auth0")
def auth0() -> None:
    """Auth0's Event Stream: recovery of the deliveries it failed (AUTH0_* settings).

    Beat runs a recovery pass every AUTH0_RECOVERY_INTERVAL; these commands show
    its state and run one by hand.

    \b
    Examples:
      idsync auth0 status
      idsync auth0 recover --since 24h --dry-run
    """


@auth0.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def status(as_json: bool) -> None:
    """Show recovery's state: the watermark, the last pass's figures, the stream, warnings.

    Reads the outbox only, never Auth0: the stream's status is the one the last
    pass saw. When AUTH0_* settings are missing it prints `recovery off: <why>`
    and exits 0.

    \b
    Examples:
      idsync auth0 status
      idsync auth0 status --json | jq .last_pass
    """
    from idsync import cli

    off = recovery_off(cli._settings())
    if off:
        state = RecoveryStatus(off=off)
    else:
        with cli._outbox() as (settings, sessions), transaction(sessions) as session:
            state = recovery_status(session, settings)
    if as_json:
        cli._print_json(state.to_json() | {"line": state.line()})
        return
    _print_status(cli._out(), state)


def _print_status(console: Console, state: RecoveryStatus) -> None:
    from idsync import cli

    if state.off:
        console.print(cli._shown(state.off), soft_wrap=True)
        return
    console.print(cli._shown(f"Recovery of failed deliveries: {state.line()}"), soft_wrap=True)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    facts.add_row("watermark", cli._shown(state.watermark.isoformat() if state.watermark else "-"))
    last = state.last_pass
    if last is None:
        facts.add_row("last pass", "none yet")
    else:
        facts.add_row(
            "last pass",
            cli._shown(
                f"#{last['id']} ({last['trigger']}), finished {cli._short(last['finished_at'])}, "
                f"window {cli._short(last['window_from'])} .. {cli._short(last['window_to'])}"
            ),
        )
        facts.add_row("stream status", cli._shown(last["stream_status"] or "-"))
        for figure in FIGURES:
            facts.add_row(figure, str(last[figure]))
        facts.add_row("redelivered", _yes(last["redelivered"]))
        facts.add_row("re-enabled", _yes(last["reenabled"]))
        if last["error"]:
            facts.add_row("error", cli._shown(last["error"]))
    console.print(facts)


def _yes(value: object) -> str:
    return "yes" if value else "no"


@auth0.command("recover")
@click.option(
    "--since",
    metavar="DURATION",
    help="Read failed deliveries of this long ago until now (24h, 90m); "
    "default: from where the last pass ended.",
)
@click.option("--dry-run", is_flag=True, help="List and count; store and redeliver nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the pass as JSON.")
def recover_command(since: str | None, dry_run: bool, as_json: bool) -> None:
    """Run one recovery pass now: store Auth0's failed deliveries, redeliver, re-enable.

    Failed deliveries are stored the way the webhook stores them
    (received_via=recovery; an event already stored counts as a duplicate), then
    Auth0 is asked to redeliver them so its failure count clears, and a disabled
    stream is re-enabled. Exits 1 when the pass failed or another pass is running.

    \b
    Examples:
      idsync auth0 recover --since 24h --dry-run
      idsync auth0 recover --since 24h
      idsync auth0 recover --json | jq .stored
    """
    from idsync import cli
    from idsync.wakeups import Waker

    seconds = _since(since)
    off = recovery_off(cli._settings())
    if off:
        raise click.ClickException(f"{off}: set them to recover failed deliveries")
    with cli._outbox() as (settings, sessions):
        client = ManagementClient.from_settings(settings)
        assert client is not None
        waker = Waker(settings)
        try:
            report = recover(
                sessions=sessions,
                settings=settings,
                client=client,
                waker=waker,
                trigger="cli",
                since=seconds,
                dry_run=dry_run,
            )
        finally:
            client.close()
            waker.close()
    if report is None:
        cli._err().print(
            "A recovery pass is running already (beat's, or another idsync auth0 recover); "
            "try again once it has finished: idsync auth0 status"
        )
        sys.exit(1)
    if as_json:
        cli._print_json(report.to_json())
    else:
        _print_pass(cli._out(), report)
    if report.error:
        sys.exit(1)


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text, unit_required=True)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--since") from None


def _print_pass(console: Console, report: PassReport) -> None:
    from idsync import cli

    kind = "Dry run of a recovery pass" if report.dry_run else f"Recovery pass #{report.id}"
    figures: dict[str, Any] = {name: getattr(report, name) for name in FIGURES}
    stored = "would store" if report.dry_run else "stored"
    console.print(
        cli._shown(
            f"{kind} over {report.window_from:%Y-%m-%d %H:%M:%S}Z .. "
            f"{report.window_to:%Y-%m-%d %H:%M:%S}Z: stream {report.stream_status or 'unknown'}; "
            f"listed {figures['listed']}, {stored} {figures['stored']}, "
            f"duplicates {figures['duplicates']}, rejected {figures['rejected']}; "
            f"redelivered {_yes(report.redelivered)}, re-enabled {_yes(report.reenabled)}."
        )
    )
    for note in report.notes:
        console.print(cli._shown(f"Note: {note}"))
    if report.reenabled:
        console.print(
            "The stream was disabled: events of that period may never have been produced. "
            "Run idsync backfill (it recovers that period's creates, updates and deletes), "
            "then idsync reconcile <destination> to find drift at the destinations."
        )
    if report.error:
        cli._err().print(cli._shown(f"The pass stopped: {report.error}"))
