"""Logging for every idsync process: one JSON object a line, personal data masked."""

from __future__ import annotations

import logging
import re
import sys

import structlog

_EMAIL = re.compile(r"([A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]*@([A-Za-z0-9.\-]+\.[A-Za-z]{2,})")
_BEARER = re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+")


def mask_email(email: str | None) -> str | None:
    """``john.doe@example.com`` -> ``j***@example.com``."""
    if not email:
        return email
    return _EMAIL.sub(r"\1***@\2", email)


def scrub(text: str) -> str:
    """Mask every email address and credential in free text."""
    return _BEARER.sub(r"\1 ***", _EMAIL.sub(r"\1***@\2", text))


def _scrub_event(_logger: object, _name: str, event_dict: dict[str, object]) -> dict[str, object]:
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = scrub(value)
    return event_dict


def configure_logging(process: str, level: str = "INFO") -> None:
    """JSON lines on stderr for this process, stdlib loggers included."""
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            lambda _l, _n, d: {**d, "process_name": process},
            _scrub_event,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_idsync", False):
            root.removeHandler(existing)
    handler._idsync = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
