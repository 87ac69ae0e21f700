"""Settings of one Segment destination, read from variables prefixed by its name.

A destination named ``segment`` reads ``SEGMENT_WRITE_KEY``, ``SEGMENT_BASE_URL``,
``SEGMENT_PROPERTY_MAP``, ``SEGMENT_DEPROVISIONED_EVENT``, ``SEGMENT_DELETED_EVENT``
and the limits every destination has (``SEGMENT_RATE_LIMIT``,
``SEGMENT_BATCH_SIZE``, ``SEGMENT_TIMEOUT_SECONDS``, ...). A destination without
a write key is accepted and stays paused: ``missing`` says so.
"""

from __future__ import annotations

import base64
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from idsync.destinations import DestinationConfig, check_url
from workers.destinations import mapping

KIND = "segment"
# Segment's US endpoint; EU workspaces send to https://events.eu1.segmentapis.com
# (segment-docs, "HTTP API Source" and "Regional configuration").
DEFAULT_BASE_URL = "https://api.segment.io"
# Segment asks for no more than 1,000 requests per second per workspace ("HTTP API
# Source", "Rate limits"); 50 leaves the rest to the workspace's other sources, and
# with up to 100 users per request it still carries thousands of users a second.
DEFAULT_RATE_LIMIT = "50/1s"
DEFAULT_BATCH_SIZE = 100
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_DEPROVISIONED_EVENT = "User Deprovisioned"
DEFAULT_DELETED_EVENT = "User Deleted"
# Auth0 field -> Segment trait; Segment's reserved traits are camelCase
# (segment-docs, "Spec: Identify", "Traits").
DEFAULT_PROPERTY_MAP = {
    "email": "email",
    "given_name": "firstName",
    "family_name": "lastName",
    "phone_number": "phone",
}
# The trait idsync itself sets on every identify.
DEPROVISIONED_TRAIT = "deprovisioned"
# A batch request carries at most 2,500 messages ("HTTP API Source", "Errors").
MAX_BATCH_MESSAGES = 2500
MAX_EVENT_NAME = 200


class Config(DestinationConfig):
    """A Segment source as the registry reads it from ``<NAME>_*`` variables."""

    # The write key must not reach a log line through a validation error or a repr.
    model_config = ConfigDict(hide_input_in_errors=True)

    rate_limit: str = DEFAULT_RATE_LIMIT
    # Users per batch: each brings one identify, and a track when deprovisioned.
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=MAX_BATCH_MESSAGES // 2)
    timeout_seconds: float = Field(default=DEFAULT_TIMEOUT_SECONDS, gt=0)
    write_key: str | None = Field(default=None, repr=False)
    base_url: str = DEFAULT_BASE_URL
    deprovisioned_event: str = DEFAULT_DEPROVISIONED_EVENT
    deleted_event: str = DEFAULT_DELETED_EVENT

    @field_validator("write_key")
    @classmethod
    def _write_key(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        if any(character.isspace() or character == ":" for character in value):
            raise ValueError("must be the source's write key alone: no spaces or ':'")
        return value or None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str, info: ValidationInfo) -> str:
        variable = f"{_prefix(info)}BASE_URL"
        value = value.strip().rstrip("/")
        check_url(variable, value)
        parts = urlsplit(value)
        if not parts.hostname or parts.path or parts.query:
            raise ValueError(
                f"{variable} is the API's root without a path, e.g. {DEFAULT_BASE_URL} "
                "or https://events.eu1.segmentapis.com"
            )
        return value

    @field_validator("deprovisioned_event", "deleted_event")
    @classmethod
    def _event_name(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > MAX_EVENT_NAME:
            raise ValueError(f"must be an event name of 1 to {MAX_EVENT_NAME} characters")
        return value

    @field_validator("property_map")
    @classmethod
    def _property_map(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value or not value.strip():
            return None
        load_property_map(value, f"{_prefix(info)}PROPERTY_MAP")
        return value

    def missing(self) -> str | None:
        """``"SEGMENT_WRITE_KEY is not set"``, or None."""
        return None if self.write_key else f"{self.prefix}WRITE_KEY is not set"

    def secrets(self) -> list[str]:
        """The write key, and the Authorization value that carries it."""
        if not self.write_key:
            return []
        return [self.write_key, basic_credentials(self.write_key)]

    def mapping(self) -> dict[str, str]:
        """Auth0 field (dots for nested fields) -> Segment trait."""
        return load_property_map(self.property_map, f"{self.prefix}PROPERTY_MAP")


def basic_credentials(write_key: str) -> str:
    """The HTTP Basic credentials Segment expects: the write key as user, no password.

    segment-docs, "HTTP API Source", "Basic authentication": base64 of ``key:``.
    """
    return base64.b64encode(f"{write_key}:".encode()).decode("ascii")


def load_property_map(path: str | None, variable: str) -> dict[str, str]:
    """Auth0 field -> trait: the JSON object in the file at ``path``, or the default."""
    found = mapping.load_property_map(path, DEFAULT_PROPERTY_MAP, variable)
    if DEPROVISIONED_TRAIT in found.values():
        raise ValueError(
            f"{variable} {path!r} maps a field to {DEPROVISIONED_TRAIT!r}, "
            "the trait idsync sets itself; choose another name"
        )
    return found


def _prefix(info: ValidationInfo) -> str:
    name = info.data.get("name") or KIND
    return f"{str(name).upper()}_"
