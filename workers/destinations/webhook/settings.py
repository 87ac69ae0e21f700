"""Settings of one webhook destination, read from variables prefixed by its name.

A destination named ``licenses`` (``LICENSES_KIND=webhook``) reads
``LICENSES_URL``, ``LICENSES_SECRET`` (``whsec_`` secrets, comma-separated
while rotating), ``LICENSES_RATE_LIMIT``, ``LICENSES_TIMEOUT_SECONDS``,
``LICENSES_CONNECT_TIMEOUT_SECONDS``, ``LICENSES_PROPERTY_MAP`` and
``LICENSES_BATCH_SIZE``.

``Config`` is what the registry of kinds reads (``idsync.destinations``): it
accepts a destination without URL or secret and says in ``missing`` which one
it lacks, so that the destination stays paused with that reason.
``WebhookSettings`` is what the adapter runs with: complete and checked.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from idsync.destinations import DestinationConfig
from idsync.settings import parse_rate_limit
from workers.destinations import mapping

KIND = "webhook"
SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's marker, not a secret
# Standard Webhooks: symmetric secrets are 24 to 64 random bytes.
MIN_SECRET_BYTES = 24
DEFAULT_RATE_LIMIT = "50/1s"
DEFAULT_BATCH_SIZE = 50
DEFAULT_TIMEOUT_SECONDS = 15.0
DEFAULT_PROPERTY_MAP = {
    field: field
    for field in ("email", "given_name", "family_name", "name", "phone_number", "blocked")
}


class WebhookSettingsError(ValueError):
    """The environment does not describe a usable webhook destination; the message says why."""


class Config(DestinationConfig):
    """A webhook destination as the registry reads it from ``<NAME>_*`` variables."""

    # A secret must not reach a log line through a validation error or a repr.
    model_config = ConfigDict(hide_input_in_errors=True)

    rate_limit: str = DEFAULT_RATE_LIMIT
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=1000)
    timeout_seconds: float = Field(default=DEFAULT_TIMEOUT_SECONDS, gt=0)
    url: str | None = None
    secret: str | None = Field(default=None, repr=False)  # comma-separated whsec_ secrets

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return check_url(value) if value and value.strip() else None

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        secrets = split_secrets(value)
        check_secrets(secrets)
        return ",".join(secrets) or None

    @field_validator("property_map")
    @classmethod
    def _property_map(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        load_property_map(value)
        return value

    def missing(self) -> str | None:
        """``"LICENSES_URL is not set"``, ``"LICENSES_SECRET is not set"``, or None."""
        return _missing(self.prefix, self.url, self.secret)

    def secrets(self) -> list[str]:
        """The secrets, whole and without their prefix, for logs to mask."""
        secrets = split_secrets(self.secret)
        return [*secrets, *(secret.removeprefix(SECRET_PREFIX) for secret in secrets)]

    def webhook_settings(self) -> WebhookSettings:
        """What the adapter runs with; WebhookSettingsError when something is missing."""
        problem = self.missing()
        if problem:
            raise WebhookSettingsError(problem)
        return WebhookSettings(
            url=self.url or "",
            secrets=split_secrets(self.secret),
            rate_limit=self.rate_limit,
            timeout_seconds=self.timeout_seconds,
            connect_timeout_seconds=self.connect_timeout_seconds,
            property_map=self.property_map,
            batch_size=self.batch_size,
        )


class WebhookSettings(BaseModel):
    """Where and how one webhook destination sends: endpoint, secrets, limits, mapping."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    url: str
    secrets: tuple[str, ...] = Field(repr=False, min_length=1)
    rate_limit: str = DEFAULT_RATE_LIMIT
    timeout_seconds: float = Field(default=DEFAULT_TIMEOUT_SECONDS, gt=0)
    connect_timeout_seconds: float = Field(default=3.05, gt=0)
    property_map: str | None = None
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=1000)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("secrets", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return split_secrets(value) if isinstance(value, str) else value

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        check_secrets(value)
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        parse_rate_limit(value)
        return value

    @field_validator("property_map")
    @classmethod
    def _property_map(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        load_property_map(value)
        return value

    @property
    def call_seconds(self) -> float:
        """The wall-clock deadline of one call: connect timeout + timeout."""
        return self.connect_timeout_seconds + self.timeout_seconds

    @property
    def rate(self) -> tuple[int, float]:
        """The rate limit as (requests, window seconds)."""
        return parse_rate_limit(self.rate_limit)

    @property
    def signing_keys(self) -> tuple[bytes, ...]:
        """The secrets as the bytes HMAC is keyed with, in the configured order."""
        return tuple(secret_bytes(secret) for secret in self.secrets)

    def mapping(self) -> dict[str, str]:
        """Auth0 field (dots for nested fields) -> name in the message's ``profile``."""
        return load_property_map(self.property_map)

    @classmethod
    def from_env(cls, name: str, environ: Mapping[str, str]) -> WebhookSettings:
        """The settings of destination ``name`` from its ``<NAME>_*`` variables.

        Raises WebhookSettingsError naming the variable that is missing or wrong.
        """
        try:
            config = Config.from_env(name, KIND, environ)
        except ValueError as error:
            raise WebhookSettingsError(str(error)) from None
        return config.webhook_settings()


def missing(name: str, environ: Mapping[str, str]) -> str | None:
    """What destination ``name`` lacks before it can run, e.g. ``"LICENSES_URL is not set"``.

    Reads the variables only: nothing is validated or built.
    """
    prefix = f"{name.upper()}_"
    return _missing(prefix, environ.get(f"{prefix}URL"), environ.get(f"{prefix}SECRET"))


def check_url(value: str) -> str:
    """``value`` when it is an https URL (plain http only on loopback); ValueError otherwise."""
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an https:// URL, e.g. https://hooks.example.com/idsync")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError("must use https:// (plain http only on loopback)")
    return value


def split_secrets(value: object) -> tuple[str, ...]:
    """Comma-separated secrets as a tuple, blanks dropped."""
    if not isinstance(value, str):
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


def check_secrets(secrets: tuple[str, ...]) -> None:
    """ValueError, never quoting a secret, unless each is ``whsec_`` + base64 of enough bytes."""
    for position, secret in enumerate(secrets, start=1):
        problem = _secret_problem(secret)
        if problem:
            raise ValueError(f"secret {position} of {len(secrets)} {problem}")


def secret_bytes(secret: str) -> bytes:
    """The HMAC key in a ``whsec_`` secret: the base64 text after the prefix, decoded."""
    text = secret.removeprefix(SECRET_PREFIX)
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def load_property_map(path: str | None) -> dict[str, str]:
    """Auth0 field -> profile name: the JSON object in the file at ``path``, or the default."""
    return mapping.load_property_map(path, DEFAULT_PROPERTY_MAP, "the property map")


def _missing(prefix: str, url: str | None, secret: str | None) -> str | None:
    if not (url or "").strip():
        return f"{prefix}URL is not set"
    if not split_secrets(secret):
        return f"{prefix}SECRET is not set"
    return None


def _secret_problem(secret: str) -> str | None:
    """Why ``secret`` is not a usable Standard Webhooks secret (never quoting it), or None."""
    if not secret.startswith(SECRET_PREFIX):
        return f"must start with {SECRET_PREFIX!r} followed by base64"
    try:
        key = secret_bytes(secret)
    except (binascii.Error, ValueError):
        return f"is not base64 after {SECRET_PREFIX!r}"
    if len(key) < MIN_SECRET_BYTES:
        return (
            f"holds {len(key)} bytes; use {MIN_SECRET_BYTES} to 64 random bytes, e.g. "
            f"'{SECRET_PREFIX}' + base64 of `openssl rand 32`"
        )
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
