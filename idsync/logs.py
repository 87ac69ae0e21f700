"""Logging for every idsync process: one JSON object a line, personal data masked.

ingest (gunicorn included, see ``gunicorn.conf.py``), the Celery worker and beat
all log through :func:`json_formatter`. Every line carries what is bound in
structlog's context variables (``event_id``, ``delivery_id``, ``task_id``,
``destination``), and every string in it, nested ones too, passes through
:func:`scrub`: email addresses are masked as ``j***@example.com`` and
credentials (Authorization values, URL passwords, ``token=`` parameters, and
the configured secrets themselves) never reach a log line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

import structlog
from structlog.typing import EventDict, Processor

# An address in any script (JÖHN@EXÄMPLE.com, ΓΙΑΝΝΗΣ@παράδειγμα.ελ): the local part
# is every character up to the "@" that does not end a word in running text or in
# JSON, a URL or a header ("*" is the mask itself, so masking twice changes nothing).
# Domain labels are split by any dot IDNA knows, and the last one starts with a
# letter and has two characters or more: "worker1@host" (a Celery node) and
# "user@10.0.0.1" are not addresses.
_LOCAL = r"""[^\s@*<>()\[\]{},;:"`|\\/=?&]"""
# An apostrophe inside a local part is a name (o'brien); before one, a quote.
_LOCAL_START = r"""[^\s@*<>()\[\]{},;:"'`|\\/=?&]"""
_LABEL = r"""[^\s@.\u3002\uff0e\uff61*<>()\[\]{},;:"'`|\\/=?&!#$%^~+]"""
_DOT = r"[.\u3002\uff0e\uff61]"
# The local part keeps its first character; "@@" and other near-emails are masked too.
# The look-behind starts a match only where a local part starts, so text without an
# address costs one pass however long it is.
_EMAIL = re.compile(
    rf"(?<!{_LOCAL_START})({_LOCAL_START}){_LOCAL}*+@++"
    rf"((?:{_LABEL}++{_DOT})+[^\W\d_]{_LABEL}++)"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+")
_AUTHORIZATION = re.compile(
    r"""(?i)\b((?:proxy-)?authorization["']?\s*[:=]\s*["']?)(?!(?:bearer|basic)\s+\*\*\*)"""
    r"""[^"',;}\s]+(?:\s+[^"',;}\s]+)?"""
)
# A scheme starts where a run of scheme characters starts, so a long run costs one pass.
_URL_PASSWORD = re.compile(
    r"((?<![a-z0-9+.\-])[a-z][a-z0-9+.\-]*+://[^:/\s@]*:)[^@\s/]+@", re.IGNORECASE
)
_SECRET_PARAMETER = re.compile(
    r"(?i)\b(hapikey|api[_-]?key|access[_-]?token|refresh[_-]?token|token|password|secret)"
    r"(=|\"?\s*:\s*\")([^&\s\"',;]+)"
)
# Every pattern above needs one of these in the text (an "@", "=", "://", a colon before
# a quote, or a credential keyword), so text without any is left as it is after one scan:
# most log strings (timestamps, paths, logger names) never run the five substitutions.
_MAYBE_SENSITIVE = re.compile(r"""(?i)[@=]|://|:\s*"|bearer|basic|authorization""")
# Values shorter than this are not treated as secrets: they would mask ordinary words.
_MIN_SECRET_LENGTH = 6
_secrets: set[str] = set()


def register_secrets(values: Iterable[str | None]) -> None:
    """Mask these exact values (tokens, keys) wherever they would appear in a log line."""
    _secrets.update(v for v in values if v and len(v) >= _MIN_SECRET_LENGTH)


def mask_email(email: str | None) -> str | None:
    """``john.doe@example.com`` -> ``j***@example.com``, in any script."""
    if not email:
        return email
    return _EMAIL.sub(r"\1***@\2", email)


def scrub(text: str) -> str:
    """Mask every email address and credential in free text."""
    for secret in _secrets:
        text = text.replace(secret, "***")
    if _MAYBE_SENSITIVE.search(text) is None:
        return text
    text = _BEARER.sub(r"\1 ***", text)
    text = _AUTHORIZATION.sub(r"\1***", text)
    text = _URL_PASSWORD.sub(r"\1***@", text)
    text = _SECRET_PARAMETER.sub(r"\1\2***", text)
    return _EMAIL.sub(r"\1***@\2", text)


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrubbed(item) for item in value]
    return value


def _scrub_event(_logger: Any, _name: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        if not key.startswith("_"):  # structlog's own bookkeeping (_record, _from_structlog)
            event_dict[key] = _scrubbed(value)
    return event_dict


_SHARED_PROCESSORS: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.format_exc_info,
]


def json_formatter(process: str) -> logging.Formatter:
    """A stdlib formatter that renders any record as one masked JSON object."""

    def add_process(_logger: Any, _name: str, event_dict: EventDict) -> EventDict:
        event_dict["process_name"] = process
        event_dict["pid"] = os.getpid()
        return event_dict

    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED_PROCESSORS, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            add_process,
            _scrub_event,
            structlog.processors.JSONRenderer(),
        ],
    )


def configure_logging(
    process: str, level: str | int = "INFO", *, secrets: Iterable[str | None] = ()
) -> None:
    """JSON lines on stderr for this process, stdlib loggers included."""
    register_secrets(secrets)
    structlog.configure(
        processors=[*_SHARED_PROCESSORS, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter(process))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_idsync", False):
            root.removeHandler(existing)
    handler._idsync = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
