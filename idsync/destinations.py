"""Destination kinds, and each configured destination's own settings.

A destination has a name (``DESTINATIONS=hubspot,licenses``) and a kind
(``LICENSES_KIND=webhook``; a name that is itself a kind needs none). Each
kind is one package under ``workers/destinations/<kind>/`` with two modules:
``settings`` (a ``DestinationConfig`` subclass named ``Config``: what the kind
reads from ``<NAME>_*`` variables and what it still misses) and ``adapter``
(``build(config, settings, limiter)``). Ingest, the CLI, ``/readyz`` and the
metrics read only the settings module; the adapter is imported when a worker
first delivers. Adding a kind is one folder and one line in ``KINDS``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from idsync.settings import Settings

KINDS: dict[str, str] = {
    "braze": "workers.destinations.braze",
    "hubspot": "workers.destinations.hubspot",
    "salesforce": "workers.destinations.salesforce",
    "webhook": "workers.destinations.webhook",
    "segment": "workers.destinations.segment",
}
NAME = re.compile(r"^[a-z][a-z0-9_]{0,49}$")
LOOPBACK_HTTP = re.compile(r"^http://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?(/|$)")


class DestinationConfig(BaseModel):
    """What every destination has, read from ``<NAME>_<FIELD>`` variables.

    A kind subclasses it with its own fields (credentials, URLs) and defaults,
    and says in ``missing`` what it needs before it can run.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    kind: str
    rate_limit: str = "10/1s"
    batch_size: int = Field(default=100, ge=1)
    timeout_seconds: float = Field(default=10.0, gt=0)
    connect_timeout_seconds: float = Field(default=3.05, gt=0)
    concurrency: int = Field(default=1, ge=1)
    property_map: str | None = None
    deprovision: str | None = None

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from idsync.settings import parse_rate_limit

        parse_rate_limit(value)
        return value

    @property
    def prefix(self) -> str:
        """The start of this destination's variable names: ``LICENSES_``."""
        return f"{self.name.upper()}_"

    @property
    def rate(self) -> tuple[int, float]:
        """``<NAME>_RATE_LIMIT`` as (requests, window seconds)."""
        from idsync.settings import parse_rate_limit

        return parse_rate_limit(self.rate_limit)

    @property
    def call_seconds(self) -> float:
        """The wall-clock deadline of one call to this destination."""
        return self.connect_timeout_seconds + self.timeout_seconds

    def missing(self) -> str | None:
        """What this destination still needs before it can run (None: nothing)."""
        return None

    def secrets(self) -> list[str]:
        """Credentials among these settings, which logs must never show."""
        return []

    @classmethod
    def aliases(cls, name: str) -> dict[str, str]:
        """Older variable names this kind still reads: field -> variable."""
        return {}

    @classmethod
    def from_env(cls, name: str, kind: str, env: Mapping[str, str]) -> Self:
        """The settings of destination ``name`` from ``<NAME>_*`` variables in ``env``."""
        prefix = f"{name.upper()}_"
        values: dict[str, Any] = {}
        for field in cls.model_fields:
            if field in ("name", "kind"):
                continue
            variable = prefix + field.upper()
            alias = cls.aliases(name).get(field)
            if variable in env:
                values[field] = env[variable]
            elif alias is not None and alias in env:
                values[field] = env[alias]
        try:
            return cls(name=name, kind=kind, **values)
        except ValidationError as error:
            problems = "; ".join(
                f"{prefix}{'.'.join(str(p) for p in item['loc']).upper()}: {item['msg']}"
                for item in error.errors()
            )
            raise ValueError(f"destination {name!r}: {problems}") from None


def check_url(variable: str, url: str | None) -> str | None:
    """``url`` when it is https (plain http only on loopback); ValueError otherwise."""
    if url is not None and not url.startswith("https://") and not LOOPBACK_HTTP.match(url):
        raise ValueError(f"{variable} must use https:// (plain http only on loopback)")
    return url


def kind_of(name: str, env: Mapping[str, str]) -> str:
    """The kind of destination ``name``: ``<NAME>_KIND``, or the name itself."""
    if not NAME.match(name):
        raise ValueError(
            f"destination name {name!r} must match [a-z][a-z0-9_]{{0,49}} (e.g. licenses)"
        )
    kind = env.get(f"{name.upper()}_KIND", name).strip().lower()
    if kind not in KINDS:
        hint = "" if f"{name.upper()}_KIND" in env else f"; set {name.upper()}_KIND"
        raise ValueError(
            f"destination {name!r} has unknown kind {kind!r}{hint} (known: {sorted(KINDS)})"
        )
    return kind


def config_class(kind: str) -> type[DestinationConfig]:
    """The ``Config`` of a kind's settings module (the adapter is not loaded)."""
    module = importlib.import_module(f"{KINDS[kind]}.settings")
    config: type[DestinationConfig] = module.Config
    return config


def load_config(name: str, env: Mapping[str, str]) -> DestinationConfig:
    """The settings of destination ``name``, validated."""
    kind = kind_of(name, env)
    return config_class(kind).from_env(name, kind, env)


def build_adapter(
    config: DestinationConfig, settings: Settings, limiter: Any, on_headroom: Any = None
) -> Any:
    """The adapter of a configured destination (imports the kind's adapter module).

    ``on_headroom`` receives the rate-limit headroom the destination reports, if any.
    """
    module = importlib.import_module(f"{KINDS[config.kind]}.adapter")
    return module.build(config, settings, limiter, on_headroom)


def headroom_key(settings: Settings, name: str) -> str:
    """The Redis hash where workers leave a destination's newest rate-limit headroom."""
    return f"{settings.redis_key_prefix}:headroom:{name}"


# Hash fields workers write (``workers/metrics.py``) -> how views name them, and scale.
HEADROOM_FIELDS = {
    "max": ("max", 1.0),
    "remaining": ("remaining", 1.0),
    "interval_ms": ("interval_seconds", 0.001),
    "daily": ("daily_max", 1.0),
    "daily_remaining": ("daily_remaining", 1.0),
}


def read_headroom(client: Any, settings: Settings, names: list[str]) -> dict[str, dict[str, float]]:
    """The newest rate-limit headroom each destination reported, as workers left it in Redis.

    One dict per name that reported any (``max``, ``remaining``, ``interval_seconds``,
    ``daily_max``, ``daily_remaining``, ``age_seconds`` as far as sent); a destination
    that reports none (a webhook) or that no worker reached in the last hour is absent.
    Redis errors reach the caller: an unknown headroom is the caller's to explain.
    """
    pipeline = client.pipeline(transaction=False)
    for name in names:
        pipeline.hgetall(headroom_key(settings, name))
    pipeline.time()
    *stored, (seconds, microseconds) = pipeline.execute()
    now = seconds + microseconds / 1e6
    found: dict[str, dict[str, float]] = {}
    for name, hash_ in zip(names, stored, strict=True):
        values = {key.decode(): value.decode() for key, value in hash_.items()}
        figures = {
            shown: float(values[field]) * scale
            for field, (shown, scale) in HEADROOM_FIELDS.items()
            if field in values
        }
        if "updated_at" in values:
            figures["age_seconds"] = round(max(0.0, now - float(values["updated_at"])), 3)
        if figures:
            found[name] = figures
    return found
