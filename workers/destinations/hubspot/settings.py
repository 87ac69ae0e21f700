"""What the HubSpot destination reads: ``HUBSPOT_*`` (or ``<NAME>_*``) variables."""

from __future__ import annotations

from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from idsync.destinations import DestinationConfig, check_url


class Config(DestinationConfig):
    """A HubSpot account: token, API root, its limits and how deprovisioning looks."""

    rate_limit: str = "100/10s"
    batch_size: int = Field(default=100, ge=1, le=100)
    token: str | None = None
    base_url: str = "https://api.hubapi.com"
    timezone: str = "UTC"
    deprovision: Literal["archive", "mark"] = "archive"
    deprovision_property: str = "idsync_deprovisioned"

    @classmethod
    def aliases(cls, name: str) -> dict[str, str]:
        # The unprefixed names predate several destinations; they mean HubSpot only.
        if name != "hubspot":
            return {}
        return {"deprovision": "DEPROVISION", "deprovision_property": "DEPROVISION_PROPERTY"}

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown IANA time zone {value!r}, e.g. Europe/Berlin") from error
        return value

    @model_validator(mode="after")
    def _safe_url(self) -> Config:
        check_url(f"{self.prefix}BASE_URL", self.base_url)
        return self

    def secrets(self) -> list[str]:
        return [self.token] if self.token else []

    def missing(self) -> str | None:
        return None if self.token else f"{self.prefix}TOKEN is not set"
