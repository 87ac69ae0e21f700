"""The ``idsync`` command line."""

from __future__ import annotations

import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """idsync: Auth0 user events to HubSpot contacts, through a SQL outbox.

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
