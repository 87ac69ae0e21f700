"""gunicorn settings for ``gunicorn "ingest:create_app()"``; read from the working directory.

gunicorn loads ``./gunicorn.conf.py`` by itself (the image's working directory
is the source root); ``idsync.stack`` passes it with ``--config``. Command-line
options (bind, workers, ``--access-logfile -``) still apply on top of it.

- Prometheus multiprocess mode: each gunicorn worker counts into files under
  ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` sums them, so the numbers are
  the same whichever worker answers and survive a worker's restart. When the
  variable is unset, a private temporary directory is used (and removed on exit).
- gunicorn's own lines, access log included, are JSON like the app's, without
  any request header: an Authorization header can never reach the access log.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.glogging import Logger

from idsync.logs import json_formatter, register_secrets

_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
_SECRET_VARIABLES = ("INGEST_TOKEN", "ADMIN_TOKEN", "SECRET_KEY", "HUBSPOT_TOKEN")
_created_multiproc_dir: str | None = None


class JsonLogger(Logger):
    """gunicorn's error and access logs as JSON lines, through ``idsync.logs``."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False):
                    handler.setFormatter(json_formatter("ingest"))

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        """One line per request: who, what, how it ended. No headers, no query string."""
        if not self.access_log_enabled:
            return
        status = str(resp.status).split(None, 1)[0]
        fields = {
            "remote_addr": environ.get("REMOTE_ADDR"),
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO"),
            "status": int(status) if status.isdigit() else status,
            "response_bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 3),
            "user_agent": environ.get("HTTP_USER_AGENT"),
        }
        self.access_log.info("request", extra=fields)


logger_class = JsonLogger


def on_starting(server: Any) -> None:
    """Prepare an empty multiprocess directory before any worker counts into it."""
    global _created_multiproc_dir
    secrets = [part for name in _SECRET_VARIABLES for part in os.environ.get(name, "").split(",")]
    register_secrets(part.strip() for part in secrets)
    directory = os.environ.get(_MULTIPROC_DIR)
    if not directory:
        directory = _created_multiproc_dir = tempfile.mkdtemp(prefix="idsync-prometheus-")
        # Workers are forked from this process and inherit the variable.
        os.environ[_MULTIPROC_DIR] = directory
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    # Counts of an earlier run would otherwise be summed into this one's.
    for stale in path.glob("*.db"):
        stale.unlink()
    server.log.info("prometheus multiprocess directory ready", extra={"directory": directory})


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges; its counters stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the multiprocess directory if this file created it."""
    if _created_multiproc_dir:
        shutil.rmtree(_created_multiproc_dir, ignore_errors=True)
