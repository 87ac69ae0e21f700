"""The Celery side of idsync: ``celery -A workers worker`` and ``celery -A workers beat``.

The app is configured lazily from the environment (``Settings``) the first time
Celery reads its configuration, so importing this package connects to nothing.
"""

from __future__ import annotations

from celery import Celery

from idsync.celery_config import celery_config
from idsync.settings import Settings

app = Celery("idsync", include=["workers.tasks"])
app.add_defaults(lambda: celery_config(Settings()))

__all__ = ["app"]
