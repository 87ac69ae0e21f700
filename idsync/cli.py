"""The ``idsync`` command line."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.panel import Panel
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from idsync.destinations import read_headroom
from idsync.settings import Settings, parse_duration
from models.commands import (
    DEFAULT_CHUNK_SIZE,
    NothingToResync,
    ReplayResult,
    pause_destination,
    replay,
    resume_destination,
)
from models.commands import forget as forget_subject
from models.commands import resync as resync_user
from models.db import db_now, make_engine, make_session_factory, transaction
from models.queries import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    DeliveryFilter,
    counts_by_status,
    delivery_detail,
    list_deliveries,
)
from models.retention import purge_before
from models.tables import FINISHED, DeliveryStatus
from models.views import (
    delivery_view,
    destination_views,
    detail_view,
    headroom_text,
    replay_view,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """idsync: Auth0 user events to HubSpot, webhooks and more, through a SQL outbox.

    \b
    Examples:
      idsync up                      run ingest, worker and beat on the embedded default
      idsync demo                    the same against a local HubSpot simulator
      idsync deliveries --status failed
      idsync replay --status failed --dry-run
    """


@main.command()
@click.option("--port", default=8000, show_default=True, help="Port of the ingest server.")
def up(port: int) -> None:
    """Migrate, then run ingest, a worker and beat until Ctrl-C.

    Uses DATABASE_URL and CELERY_BROKER_URL, by default the embedded SQLite files
    in the current directory. Prints the webhook URL and the ingest token.

    \b
    Example:
      idsync up --port 8000
    """
    from idsync.demo import run_up

    sys.exit(run_up(port=port))


@main.command()
@click.option("--keep-files", is_flag=True, help="Keep the demo's working folder.")
def demo(keep_files: bool) -> None:
    """Run idsync against a local HubSpot simulator with scripted sample events.

    Exits 0 only when HubSpot ends in the expected state.

    \b
    Example:
      idsync demo
    """
    from idsync.demo import run_demo

    sys.exit(run_demo(keep_files=keep_files))


# Operator commands: everything below reads DATABASE_URL and the rest of the
# environment through Settings, works in one transaction per command, and
# disposes of its engine before it exits.


STATUSES = [status.value for status in DeliveryStatus]


def _settings() -> Settings:
    try:
        # mypy without pydantic's plugin reads Field() defaults as required arguments.
        return Settings()  # type: ignore[call-arg]
    except ValidationError as error:
        raise click.ClickException(
            f"the configuration in the environment is invalid:\n{error}"
        ) from None


@contextmanager
def _outbox() -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    """Settings and sessions of the outbox named by DATABASE_URL, disposed at the end."""
    settings = _settings()
    engine = make_engine(settings.database_url)
    try:
        yield settings, make_session_factory(engine)
    except OperationalError as error:
        raise click.ClickException(
            f"cannot reach the outbox database (DATABASE_URL): {type(error.orig).__name__}"
        ) from None
    finally:
        engine.dispose()


def _wake(settings: Settings, destinations: Iterable[str]) -> None:
    """Wake the workers for each destination (best effort: the sweep is the backstop)."""
    from idsync.wakeups import Waker

    waker = Waker(settings)
    try:
        for destination in destinations:
            waker.wake(destination)
    finally:
        waker.close()


def _out() -> Console:
    return Console(highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


# Control characters but tab and newline (C0, DEL, C1) and bidirectional overrides:
# stored text must not move the cursor, recolour or rewrite the operator's terminal.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _shown(value: object) -> Text:
    """Stored or typed text as rich shows it: markup stays literal, control characters go."""
    return Text(_UNPRINTABLE.sub("", "" if value is None else str(value)))


def _print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The delivery filters that ``deliveries`` and ``replay`` share."""
    options = [
        click.option("--status", type=click.Choice(STATUSES), help="Only this status."),
        click.option("--destination", help="Only this destination, e.g. hubspot."),
        click.option("--event-type", help="Only this event type, e.g. user.updated."),
        click.option("--subject", help="Only this Auth0 user_id."),
        click.option(
            "--since", help="Created at or after: 2025-03-01, 2025-03-01T12:00Z, or 24h (ago)."
        ),
        click.option("--until", help="Created before (same forms as --since)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _make_filter(**params: Any) -> DeliveryFilter:
    try:
        return DeliveryFilter.from_params(params)
    except ValueError as error:
        raise click.UsageError(str(error)) from None


def _clip(text: str | None, width: int = 80) -> str:
    if not text:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(moment: str | None) -> str:
    """An ISO time from a view, to the second, for tables."""
    return moment[:19].replace("T", " ") if moment else ""


def _deliveries_table(views: list[dict[str, Any]]) -> Table:
    table = Table(title="Deliveries (newest first)", title_justify="left")
    for name in ("id", "destination", "status", "event", "subject", "attempts", "last error"):
        table.add_column(name, overflow="fold")
    for view in views:
        status = view["status"] + (f": {view['reason']}" if view["reason"] else "")
        event = f"{view['event']['type']} {_short(view['event']['time'])}{_via(view['event'])}"
        table.add_row(
            str(view["id"]),
            _shown(view["destination"]),
            _shown(status),
            _shown(event),
            _shown(view["subject"]),
            str(view["attempts"]),
            _shown(_clip(view["last_error"])),
        )
    return table


def _via(event: dict[str, Any]) -> str:
    """`` via recovery`` or `` via backfill``; nothing for the webhook, the usual way."""
    via = event.get("received_via")
    return f" via {via}" if via and via != "webhook" else ""


def _counts_table(counts: dict[str, dict[str, int]]) -> Table:
    table = Table(title="Deliveries by status", title_justify="left")
    table.add_column("destination")
    for status in STATUSES:
        table.add_column(status, justify="right")
    for destination, by_status in counts.items():
        table.add_row(_shown(destination), *(str(by_status.get(status, 0)) for status in STATUSES))
    return table


@main.group(invoke_without_command=True)
@_filter_options
@click.option(
    "--limit",
    type=int,
    default=DEFAULT_LIMIT,
    show_default=True,
    help=f"Rows per page (at most {MAX_LIMIT}).",
)
@click.option("--cursor", type=int, help="The next_cursor printed by the previous page.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.pass_context
def deliveries(
    ctx: click.Context, limit: int, cursor: int | None, as_json: bool, **filters: Any
) -> None:
    """List deliveries, newest first, and the counts by status per destination.

    Exits 1 when a listed delivery has failed, so scripts and cron jobs can
    alert on `idsync deliveries --status failed`. Emails are masked.

    \b
    Examples:
      idsync deliveries --status failed
      idsync deliveries --subject 'auth0|123' --since 24h
      idsync deliveries --status failed --destination hubspot --json
      idsync deliveries --cursor 4711          the next page
      idsync deliveries show 4711              one delivery with every attempt
    """
    if ctx.invoked_subcommand is not None:
        return
    item = _make_filter(limit=limit, cursor=cursor, **filters)
    with _outbox() as (_, sessions), transaction(sessions) as session:
        rows, next_cursor = list_deliveries(session=session, filter=item)
        views = [delivery_view(row) for row in rows]
        counts = counts_by_status(session=session)
    if as_json:
        _print_json({"deliveries": views, "next_cursor": next_cursor, "counts": counts})
    else:
        console = _out()
        if views:
            console.print(_deliveries_table(views))
        else:
            console.print("No deliveries match.")
        if next_cursor is not None:
            console.print(f"More: add --cursor {next_cursor}")
        console.print(_counts_table(counts))
    if any(view["status"] == DeliveryStatus.FAILED.value for view in views):
        ctx.exit(1)


@deliveries.command("show")
@click.argument("delivery_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def show_delivery(delivery_id: int, as_json: bool) -> None:
    """Show one delivery: its event (masked), every attempt and HubSpot's answers.

    Exits 1 when there is no delivery with that id.

    \b
    Examples:
      idsync deliveries show 4711
      idsync deliveries show 4711 --json | jq '.attempts[].response'
    """
    with _outbox() as (_, sessions), transaction(sessions) as session:
        detail = delivery_detail(session=session, delivery_id=delivery_id)
        view = detail_view(detail) if detail is not None else None
    if view is None:
        _err().print(f"No delivery with id {delivery_id}.")
        sys.exit(1)
    if as_json:
        _print_json(view)
        return
    console = _out()
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    for key, value in view["delivery"].items():
        if key != "event":
            summary.add_row(key, _shown(value))
    console.print(Panel(summary, title=f"Delivery {delivery_id}", title_align="left"))
    event = view["event"]
    payload = event.pop("payload")
    title = _shown(
        f"Event {event['event_id']} ({event['type']}, {event['time']}, {event['status']}, "
        f"received via {event['received_via']})"
    )
    body = (
        JSONHighlighter()(_shown(json.dumps(payload, indent=2, ensure_ascii=False, default=str)))
        if payload is not None
        else "(payload purged)"
    )
    console.print(Panel(body, title=title, title_align="left"))
    attempts = Table(title="Attempts", title_justify="left")
    for name in ("started", "request", "status", "category", "outcome", "ms", "response"):
        attempts.add_column(name, overflow="fold")
    for attempt in view["attempts"]:
        duration = attempt["duration_ms"]
        attempts.add_row(
            _shown(attempt["started_at"]),
            _shown(attempt["request"]),
            str(attempt["status_code"] or ""),
            _shown(attempt["error_category"]),
            _shown(attempt["outcome"]),
            f"{duration:.0f}" if duration is not None else "",
            _shown(attempt["response"]),
        )
    console.print(attempts if view["attempts"] else "No attempts yet.")


def _replay_one(
    sessions: sessionmaker[Session], delivery_id: int, *, dry_run: bool
) -> ReplayResult:
    with transaction(sessions) as session:
        detail = delivery_detail(session=session, delivery_id=delivery_id)
        if detail is None:
            raise click.ClickException(f"no delivery with id {delivery_id}")
        if detail.delivery.status not in FINISHED:
            raise click.ClickException(
                f"delivery {delivery_id} is {detail.delivery.status.value}: it is still on "
                "its way, nothing to replay"
            )
        if detail.event.payload is None:
            raise click.ClickException(
                f"the event of delivery {delivery_id} was purged; nothing left to send "
                f"(try idsync resync --subject '{_shown(detail.delivery.subject)}')"
            )
        return replay(session=session, delivery_ids=[delivery_id], dry_run=dry_run)


def _replay_matching(
    sessions: sessionmaker[Session], item: DeliveryFilter, *, yes: bool, chunk_size: int
) -> ReplayResult:
    with transaction(sessions) as session:
        preview = replay(session=session, filter=item, dry_run=True)
    if not preview.matched:
        return preview
    if not yes:
        click.confirm(
            f"Replay {preview.matched} deliveries to {', '.join(preview.destinations)}?",
            abort=True,
            err=True,
        )
    with transaction(sessions) as session:
        if preview.matched <= chunk_size:
            return replay(session=session, filter=item, chunk_size=chunk_size)
        with Progress(console=_err(), transient=False) as bar:
            task = bar.add_task("Replaying", total=preview.matched)
            return replay(
                session=session,
                filter=item,
                chunk_size=chunk_size,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )


@main.command("replay")
@click.argument("delivery_id", type=int, required=False)
@_filter_options
@click.option("--dry-run", is_flag=True, help="Only count what would be replayed.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before a bulk replay.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="Rows per UPDATE; the progress bar advances per chunk.",
)
def replay_command(
    delivery_id: int | None,
    dry_run: bool,
    yes: bool,
    as_json: bool,
    chunk_size: int,
    **filters: Any,
) -> None:
    """Send finished deliveries again, with a fresh attempt budget.

    Give one delivery ID, or filters (as for `idsync deliveries`): a bulk replay
    takes failed deliveries unless --status names skipped or succeeded, asks
    before it starts (skip with --yes), and queues the work behind live traffic.
    Attempts and the last error stay for history. An old event replayed after a
    newer one reached the destination ends `skipped: stale`, so a replay never
    brings back an outdated state. Exits 1 for an unknown or unfinished id.

    \b
    Examples:
      idsync replay 4711
      idsync replay --status failed --dry-run
      idsync replay --status failed --destination hubspot --since 24h --yes
      idsync replay --status skipped --subject 'auth0|123' --yes --json
    """
    given = {name: value for name, value in filters.items() if value is not None}
    if delivery_id is not None and given:
        raise click.UsageError("give either a delivery ID or filters, not both")
    if delivery_id is None and not given:
        raise click.UsageError("name a delivery ID or filters, e.g. --status failed")
    with _outbox() as (settings, sessions):
        try:
            if delivery_id is not None:
                result = _replay_one(sessions, delivery_id, dry_run=dry_run)
            elif dry_run:
                with transaction(sessions) as session:
                    result = replay(session=session, filter=_make_filter(**filters), dry_run=True)
            else:
                result = _replay_matching(
                    sessions, _make_filter(**filters), yes=yes, chunk_size=chunk_size
                )
        except ValueError as error:
            raise click.UsageError(str(error)) from None
        if result.replayed:
            _wake(settings, result.destinations)
    if as_json:
        _print_json(replay_view(result, dry_run=dry_run))
    elif dry_run:
        _out().print(
            _shown(
                f"{result.matched} deliveries would be replayed"
                + (f" ({', '.join(result.destinations)})." if result.destinations else ".")
            )
        )
    elif not result.matched and result.purged:
        _out().print(
            f"Nothing to replay: the {result.purged} finished deliveries that match have no "
            "payload left (purged by RETENTION_DAYS or idsync forget), so nothing can be sent."
        )
    elif not result.matched:
        _out().print("Nothing to replay: no finished delivery matches.")
    else:
        _out().print(
            _shown(
                f"Replayed {result.replayed} of {result.matched} deliveries "
                f"({', '.join(result.destinations)}); the workers were woken."
            )
        )


@main.command()
@click.option("--subject", required=True, help="The Auth0 user_id.")
@click.option("--destination", help="Only this destination (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def resync(subject: str, destination: str | None, as_json: bool) -> None:
    """Send a user's newest state again, even if idsync thinks it is applied.

    Use it when someone changed or deleted the contact by hand in HubSpot. The
    newest stored event of the user is queued with `force`, which bypasses the
    stale rule and the "unchanged" check. Exits 1 when there is nothing to send
    (no event stored, or retention purged the newest one).

    \b
    Examples:
      idsync resync --subject 'auth0|507f1f77bcf86cd799439020'
      idsync resync --subject 'auth0|123' --destination hubspot
    """
    with _outbox() as (settings, sessions):
        try:
            with transaction(sessions) as session:
                queued = resync_user(session=session, subject=subject, destination=destination)
        except NothingToResync as error:
            raise click.ClickException(str(error)) from None
        _wake(settings, [destination] if destination else settings.destinations)
    if as_json:
        _print_json({"subject": subject, "queued": queued})
    else:
        _out().print(_shown(f"Queued {queued} deliveries with the newest state of {subject}."))


def _days(value: str, name: str) -> timedelta:
    try:
        return timedelta(seconds=parse_duration(value))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint=name) from None


@main.command()
@click.option(
    "--older-than",
    help="Clear payloads of finished events older than this (default: RETENTION_DAYS), e.g. 30d.",
)
@click.option(
    "--delete-older-than",
    help="Delete finished events older than this (default: RETENTION_DELETE_DAYS), e.g. 365d.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def purge(older_than: str | None, delete_older_than: str | None, as_json: bool) -> None:
    """Apply retention now: clear old payloads, then delete very old rows.

    Events whose deliveries all finished lose their payload (and their
    attempts' response excerpts) after --older-than, and are deleted with
    their deliveries after --delete-older-than. Failed deliveries keep their
    event for replay. Beat runs the same purge daily with the defaults.

    \b
    Examples:
      idsync purge --older-than 30d
      idsync purge --older-than 7d --delete-older-than 90d --json
    """
    settings = _settings()
    payload_age = _days(older_than or f"{settings.retention_days}d", "--older-than")
    row_age = _days(
        delete_older_than or f"{settings.retention_delete_days}d", "--delete-older-than"
    )
    if row_age < payload_age:
        raise click.UsageError("--delete-older-than must be at least --older-than")
    with _outbox() as (_, sessions), transaction(sessions) as session:
        now = db_now(session)
        counts = purge_before(
            session=session, payloads_before=now - payload_age, rows_before=now - row_age
        )
    if as_json:
        _print_json(counts)
    else:
        _out().print(
            f"Cleared {counts['payloads']} payloads and {counts['excerpts']} "
            f"response excerpts; deleted {counts['events']} events."
        )


@main.command()
@click.option("--subject", required=True, help="The Auth0 user_id of the person.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def forget(subject: str, yes: bool, as_json: bool) -> None:
    """Erase one person's personal data from idsync (a data subject's request).

    Clears their events' payloads, their attempts' response excerpts and last
    errors, the email kept in their links, and deletes quarantined bodies that
    name them. Their pending or failed deliveries end `skipped: forgotten`.
    The contact in HubSpot is not touched: delete the user in Auth0 for that.

    \b
    Examples:
      idsync forget --subject 'auth0|507f1f77bcf86cd799439020'
      idsync forget --subject 'auth0|123' --yes --json
    """
    if not yes:
        click.confirm(f"Erase the personal data of {subject} from idsync?", abort=True, err=True)
    with _outbox() as (_, sessions):
        try:
            with transaction(sessions) as session:
                counts = forget_subject(session=session, subject=subject)
        except ValueError as error:
            raise click.UsageError(str(error)) from None
    if as_json:
        _print_json({"subject": subject, "removed": counts})
        return
    table = Table(title=_shown(f"Erased for {subject}"), title_justify="left")
    table.add_column("what")
    table.add_column("rows", justify="right")
    for name, number in counts.items():
        table.add_row(name.replace("_", " "), str(number))
    _out().print(table)


@main.group()
def destinations() -> None:
    """Show, pause and resume destinations.

    A pause by an operator holds until an operator resumes it; deliveries stay
    pending meanwhile. A pause idsync made itself (bad token, wrong mapping) is
    lifted by its probe, or by `resume`.

    \b
    Examples:
      idsync destinations list
      idsync destinations pause hubspot --reason "HubSpot maintenance"
      idsync destinations resume hubspot
    """


def _configured(settings: Settings, name: str) -> str:
    if name not in settings.destinations:
        raise click.BadParameter(
            f"{name!r} is not in DESTINATIONS ({', '.join(settings.destinations)})",
            param_hint="NAME",
        )
    return name


@destinations.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_destinations(as_json: bool) -> None:
    """List configured destinations, whether they are paused, and their deliveries.

    \b
    Example:
      idsync destinations list
    """
    with _outbox() as (settings, sessions), transaction(sessions) as session:
        views = destination_views(session=session, settings=settings, headroom=_headroom(settings))
        for view, held in zip(views, held_deprovisions(session, views), strict=True):
            view["held_deprovisions"] = held
    if as_json:
        _print_json(views)
        return
    table = Table(title="Destinations", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("state", overflow="fold", ratio=1)
    table.add_column("since", no_wrap=True)
    shown = (DeliveryStatus.PENDING.value, DeliveryStatus.FAILED.value)
    for status in shown:
        table.add_column(status, justify="right", no_wrap=True)
    table.add_column("rate-limit headroom", overflow="fold")
    for view in views:
        state = "ok"
        if view["paused"]:
            reason = view["paused_reason"]
            state = f"paused by {view['paused_by']}" + (f": {reason}" if reason else "")
        if view["held_deprovisions"]:
            state += (
                f"; {view['held_deprovisions']} deprovisions held "
                f"(idsync destinations approve-deprovisions {view['name']})"
            )
        table.add_row(
            _shown(view["name"]),
            _shown(state),
            _short(view["paused_at"]),
            *(str(view["deliveries"].get(status, 0)) for status in shown),
            headroom_text(view["rate_limit"]),
        )
    _out().print(table)


def _headroom(settings: Settings) -> dict[str, dict[str, float]]:
    """The headroom workers left in Redis; unknown (with a line on stderr) without Redis."""
    url = settings.effective_redis_url
    if url is None:
        return {}
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return read_headroom(client, settings, list(settings.destinations))
    except redis.RedisError as error:
        click.echo(f"rate-limit headroom unknown: Redis unreachable ({error})", err=True)
        return {}
    finally:
        client.close()


@destinations.command("pause")
@click.argument("name")
@click.option("--reason", help="Shown in /readyz, metrics and `destinations list`.")
def pause_command(name: str, reason: str | None) -> None:
    """Pause a destination by hand; its deliveries wait, pending, until resume.

    \b
    Example:
      idsync destinations pause hubspot --reason "HubSpot maintenance until 14:00"
    """
    with _outbox() as (settings, sessions), transaction(sessions) as session:
        pause_destination(session=session, name=_configured(settings, name), reason=reason)
    _out().print(f"Paused {name}. Resume with: idsync destinations resume {name}")


@destinations.command("resume")
@click.argument("name")
def resume_command(name: str) -> None:
    """Resume a paused destination and wake its workers.

    \b
    Example:
      idsync destinations resume hubspot
    """
    with _outbox() as (settings, sessions):
        with transaction(sessions) as session:
            resume_destination(session=session, name=_configured(settings, name))
        _wake(settings, [name])
    _out().print(f"Resumed {name}.")


from idsync.auth0.backfill_commands import backfill  # noqa: E402 - registered last

main.add_command(backfill)

from idsync.reconcile_commands import (  # noqa: E402 - registered last
    approve_deprovisions,
    held_deprovisions,
    reconcile,
)

main.add_command(reconcile)
destinations.add_command(approve_deprovisions)

from idsync.auth0.commands import auth0  # noqa: E402 - registered last

main.add_command(auth0)
