"""One typed settings object, read once from the environment.

Every tunable of idsync is a field here, named after its environment variable.
Nothing connects at import time: processes build a ``Settings`` at start-up and
pass it down, and tests build their own without touching ``os.environ``.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from idsync.destinations import NAME, DestinationConfig, check_url, load_config

EMBEDDED_DATABASE_URL = "sqlite:///idsync.db"
EMBEDDED_BROKER_URL = "sqla+sqlite:///idsync-broker.db"

# About a day in twelve attempts: a few seconds first, then hours.
DEFAULT_RETRY_SCHEDULE = "5s,15s,1m,5m,15m,30m,1h,2h,3h,4h,6h,8h"

# Seconds of a lease kept free for recording a batch's outcomes after its last call.
LEASE_MARGIN_SECONDS = 5.0

CommaList = Annotated[tuple[str, ...], NoDecode]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, None: 1}


def parse_duration(text: str, *, unit_required: bool = False) -> float:
    """Seconds in ``text`` such as ``"90"``, ``"15s"``, ``"5m"``, ``"2h"``, ``"30d"`` or ``"2w"``.

    A bare number is seconds, unless ``unit_required``: where a duration stands
    beside dates (``--since 24h`` or ``--since 20250301``), a number alone is not one.
    """
    match = _DURATION.match(text)
    if not match or (unit_required and match.group(2) is None):
        raise ValueError(f"not a duration: {text!r} (write e.g. 30s, 5m, 2h, 1d or 2w)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_rate_limit(text: str) -> tuple[int, float]:
    """``"100/10s"`` -> (100 requests, 10.0 seconds)."""
    count, _, window = text.partition("/")
    if not count.strip().isdigit() or not window:
        raise ValueError(f"not a rate limit: {text!r} (write e.g. 100/10s)")
    return int(count), parse_duration(window)


def parse_guard(text: str, variable: str) -> tuple[int, float] | None:
    """``"100/1h"`` -> (100 deprovisions, 3600.0 seconds); ``"off"`` -> None."""
    if text.strip().lower() == "off":
        return None
    try:
        count, window = parse_rate_limit(text.strip())
    except ValueError:
        raise ValueError(
            f"{variable}={text!r} is not a guard: write e.g. 100/1h (at most 100 "
            "deprovisions per hour, the rest held for approval) or off"
        ) from None
    if count < 1 or window <= 0:
        raise ValueError(f"{variable}={text!r} needs at least 1 deprovision per window")
    return count, window


def parse_interval(text: str, variable: str) -> float | None:
    """``"6h"`` -> 21600.0 seconds; ``"off"`` -> None (the job is not scheduled)."""
    if text.strip().lower() == "off":
        return None
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise ValueError(f"{variable}={text!r} is not an interval: write e.g. 6h, or off") from None
    if seconds <= 0:
        raise ValueError(f"{variable}={text!r} must be longer than 0, or off")
    return seconds


def _split(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(value)  # type: ignore[arg-type]


class Settings(BaseSettings):
    """Configuration of every idsync process; see the README's configuration table."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, hide_input_in_errors=True
    )

    database_url: str = EMBEDDED_DATABASE_URL
    celery_broker_url: str = EMBEDDED_BROKER_URL
    redis_url: str | None = None
    redis_key_prefix: str = "idsync"
    destinations: CommaList = ("hubspot",)

    ingest_token: CommaList = ()
    ingest_allowed_sources: CommaList = ()
    ingest_max_body_bytes: int = 256 * 1024
    admin_token: str | None = None
    secret_key: str | None = None
    # Browsers keep Secure cookies on loopback too; turn off only for plain http
    # to another host on a trusted network.
    admin_cookie_secure: bool = True

    # The HubSpot destination's variables, kept as fields for the names operators know;
    # every destination reads its own <NAME>_* variables (see idsync/destinations.py).
    hubspot_token: str | None = None
    hubspot_base_url: str = "https://api.hubapi.com"
    hubspot_rate_limit: str = "100/10s"
    hubspot_timezone: str = "UTC"
    hubspot_property_map: str | None = None
    hubspot_batch_size: int = Field(default=100, ge=1, le=100)
    hubspot_timeout_seconds: float = Field(default=10.0, gt=0)
    hubspot_connect_timeout_seconds: float = Field(default=3.05, gt=0)
    deprovision: Literal["archive", "mark"] = "archive"
    deprovision_property: str = "idsync_deprovisioned"

    retry_schedule: CommaList = tuple(DEFAULT_RETRY_SCHEDULE.split(","))
    retry_jitter: float = Field(default=0.2, ge=0, le=1)
    lease_seconds: float = 120.0
    settle_seconds: float = Field(default=120.0, gt=0)
    sweep_seconds: float = 5.0
    pause_probe_seconds: float = 60.0
    wakeup_token_seconds: float = 2.0
    max_reclaims: int = 3
    retention_days: int = 30
    retention_delete_days: int = 365
    # Most deprovisions a destination may send per rolling window before the rest are
    # held for an operator's approval (``100/1h``; ``off`` disables the guard).
    deprovision_guard: str = "100/1h"
    # How often beat reconciles every readable destination (``6h``; ``off``: never).
    reconcile_interval: str = "off"
    publish_timeout_seconds: float = 0.5
    flower_url: str | None = None
    # Auth0 Management API access, for recovery of failed deliveries and backfill.
    auth0_domain: str | None = None
    auth0_client_id: str | None = None
    auth0_client_secret: str | None = None
    auth0_event_stream_id: str | None = None
    auth0_mgmt_base_url: str | None = None
    auth0_recovery_interval: str = "5m"
    # How long after an event's time a recovery pass leaves it to Auth0's own retries.
    auth0_recovery_lag: str = "60s"
    # How far back a pass reads again windows whose redelivery may not have got through.
    auth0_recovery_recheck: str = "6h"
    auth0_event_source: str | None = None
    # Every <NAME>_* variable of a configured destination, read from the environment.
    destination_env: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _read_destination_env(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "destination_env" in data:
            return data
        names = _split(data.get("destinations") or "hubspot")
        prefixes = tuple(f"{name.upper()}_" for name in names)
        found = {key.upper(): value for key, value in os.environ.items()}
        return data | {
            "destination_env": {k: v for k, v in found.items() if k.startswith(prefixes)}
        }

    @field_validator(
        "destinations", "ingest_token", "ingest_allowed_sources", "retry_schedule", mode="before"
    )
    @classmethod
    def _comma_list(cls, value: object) -> tuple[str, ...]:
        return _split(value)

    @field_validator("deprovision_guard")
    @classmethod
    def _guard(cls, value: str) -> str:
        parse_guard(value, "DEPROVISION_GUARD")
        return value.strip()

    @field_validator("reconcile_interval")
    @classmethod
    def _reconcile_interval(cls, value: str) -> str:
        parse_interval(value, "RECONCILE_INTERVAL")
        return value.strip()

    @model_validator(mode="after")
    def _destination_guards(self) -> Settings:
        # A mistyped <NAME>_DEPROVISION_GUARD stops start-up, not the first deprovision.
        for name in self.destinations:
            self.deprovision_guard_of(name)
        return self

    @field_validator("destinations")
    @classmethod
    def _destination_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not NAME.match(name):
                raise ValueError(
                    f"destination name {name!r} must match [a-z][a-z0-9_]{{0,49}} (e.g. licenses)"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"DESTINATIONS names a destination twice: {list(value)}")
        return value

    @field_validator("retry_schedule")
    @classmethod
    def _durations(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            parse_duration(item)
        if not value:
            raise ValueError("RETRY_SCHEDULE needs at least one delay, e.g. 5s,1m,10m")
        return value

    @field_validator("auth0_recovery_interval", "auth0_recovery_lag", "auth0_recovery_recheck")
    @classmethod
    def _auth0_duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("auth0_mgmt_base_url")
    @classmethod
    def _auth0_base_url(cls, value: str | None) -> str | None:
        return check_url("AUTH0_MGMT_BASE_URL", value.rstrip("/") if value else None)

    @model_validator(mode="after")
    def _lease_outlasts_calls(self) -> Settings:
        # A batch starts no call after its deadline, and every call ends by its own:
        # two calls' worth plus a margin for recording keeps every write inside the lease.
        configs = self.destination_configs
        if not configs:
            return self  # no destination: nothing is ever sent
        slowest = max(configs, key=lambda config: config.call_seconds)
        minimum = 2 * slowest.call_seconds + LEASE_MARGIN_SECONDS
        if self.lease_seconds < minimum:
            raise ValueError(
                f"LEASE_SECONDS={self.lease_seconds:g} is too short for "
                f"{slowest.prefix}CONNECT_TIMEOUT_SECONDS={slowest.connect_timeout_seconds:g} and "
                f"{slowest.prefix}TIMEOUT_SECONDS={slowest.timeout_seconds:g}: it must be at "
                f"least 2 x (connect timeout + timeout) + {LEASE_MARGIN_SECONDS:g} = {minimum:g}"
            )
        if self.settle_seconds <= self.call_seconds:
            raise ValueError(
                f"SETTLE_SECONDS={self.settle_seconds:g} must be longer than one call's "
                f"deadline (connect timeout + timeout = {self.call_seconds:g})"
            )
        return self

    # Derived values, in the units the code uses.

    def destination(self, name: str) -> DestinationConfig:
        """The settings of destination ``name``, from its ``<NAME>_*`` variables."""
        prefix = f"{name.upper()}_"
        env = {
            field.upper(): str(value)
            for field, value in self
            if field.startswith(f"{name}_") and value is not None
        }
        for alias in ("deprovision", "deprovision_property"):
            env[alias.upper()] = str(getattr(self, alias))
        env |= {k: v for k, v in self.destination_env.items() if k.startswith(prefix)}
        return load_config(name, env)

    @property
    def auth0_base_url(self) -> str | None:
        """Where the Management API answers: ``AUTH0_MGMT_BASE_URL`` or ``https://{AUTH0_DOMAIN}``."""
        if self.auth0_mgmt_base_url:
            return self.auth0_mgmt_base_url
        return f"https://{self.auth0_domain}" if self.auth0_domain else None

    @property
    def auth0_source(self) -> str | None:
        """The CloudEvent ``source`` of the stream's events: ``urn:auth0:{AUTH0_DOMAIN}``."""
        if self.auth0_event_source:
            return self.auth0_event_source
        return f"urn:auth0:{self.auth0_domain}" if self.auth0_domain else None

    @property
    def secrets(self) -> list[str | None]:
        """Every secret a log line must never show: tokens, keys, destinations' credentials."""
        own = [*self.ingest_token, self.admin_token, self.secret_key, self.auth0_client_secret]
        return own + [secret for config in self.destination_configs for secret in config.secrets()]

    @property
    def destination_configs(self) -> list[DestinationConfig]:
        """Every configured destination's settings, in ``DESTINATIONS`` order."""
        return [self.destination(name) for name in self.destinations]

    @property
    def call_seconds(self) -> float:
        """The longest wall-clock deadline of one HTTP call to any destination."""
        return max((config.call_seconds for config in self.destination_configs), default=0.0)

    @property
    def batch_seconds(self) -> float:
        """How long after its claim a batch may still start a call.

        A call started at the deadline ends one call later, which leaves the
        margin of the lease for recording the outcomes.
        """
        return self.lease_seconds - self.call_seconds - LEASE_MARGIN_SECONDS

    @property
    def effective_redis_url(self) -> str | None:
        """``REDIS_URL``, or the broker URL when the broker is Redis."""
        if self.redis_url:
            return self.redis_url
        if self.celery_broker_url.startswith(("redis://", "rediss://")):
            return self.celery_broker_url
        return None

    @property
    def retry_delays(self) -> list[float]:
        """The retry schedule in seconds; its length is the attempt budget."""
        return [parse_duration(item) for item in self.retry_schedule]

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_seconds)

    def deprovision_guard_of(self, name: str) -> tuple[int, float] | None:
        """Destination ``name``'s guard: ``<NAME>_DEPROVISION_GUARD``, else ``DEPROVISION_GUARD``.

        (most deprovisions, window seconds), or None when the guard is off for it.
        """
        variable = f"{name.upper()}_DEPROVISION_GUARD"
        own = self.destination_env.get(variable)
        if own is not None:
            return parse_guard(own, variable)
        return parse_guard(self.deprovision_guard, "DEPROVISION_GUARD")

    @property
    def reconcile_seconds(self) -> float | None:
        """``RECONCILE_INTERVAL`` in seconds; None when reconciliation is not scheduled."""
        return parse_interval(self.reconcile_interval, "RECONCILE_INTERVAL")
