"""Celery configuration for at-least-once delivery, built from ``Settings``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from idsync.auth0.client import recovery_off
from idsync.settings import Settings, parse_duration


def celery_config(settings: Settings, *, publisher: bool = False) -> dict[str, Any]:
    """Celery settings; ``publisher=True`` gives up quickly when the broker is down."""
    broker = settings.celery_broker_url
    transport: dict[str, Any] = {}
    if broker.startswith(("redis://", "rediss://")):
        # Redis redelivers unacknowledged messages after the visibility timeout,
        # so it must outlast any task (acks_late keeps a message until the end).
        transport["visibility_timeout"] = 4 * 3600
        transport["global_keyprefix"] = f"{settings.redis_key_prefix}:celery:"
        if publisher:
            transport["socket_connect_timeout"] = settings.publish_timeout_seconds
            transport["socket_timeout"] = settings.publish_timeout_seconds
    config: dict[str, Any] = {
        "broker_url": broker,
        "broker_transport_options": transport,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": f"{settings.redis_key_prefix}.deliveries",
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "beat_schedule": {
            "sweep": {
                "task": "idsync.sweep",
                "schedule": timedelta(seconds=settings.sweep_seconds),
            },
            "purge": {"task": "idsync.purge", "schedule": timedelta(hours=24)},
        },
    }
    if settings.reconcile_seconds is not None:
        # RECONCILE_INTERVAL: report drift of every readable destination (no fix).
        config["beat_schedule"]["reconcile"] = {
            "task": "idsync.reconcile",
            "schedule": timedelta(seconds=settings.reconcile_seconds),
        }
    if recovery_off(settings) is None:
        # AUTH0_RECOVERY_INTERVAL: read back what Auth0 failed to deliver (one pass at a time).
        # A message older than one interval is dropped: the next one does the same work,
        # and workers back from an outage do not run a queue of passes in a row.
        interval = parse_duration(settings.auth0_recovery_interval)
        config["beat_schedule"]["auth0_recover"] = {
            "task": "idsync.auth0_recover",
            "schedule": timedelta(seconds=interval),
            "options": {"expires": interval},
        }
    if publisher:
        config["broker_connection_timeout"] = settings.publish_timeout_seconds
        config["broker_connection_retry"] = False
        config["broker_connection_max_retries"] = 0
    return config
