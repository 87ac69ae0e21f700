"""What the Salesforce destination reads: ``SALESFORCE_*`` (or ``<NAME>_*``) variables.

``Config`` accepts a destination without its login URL or client credentials
and says in ``missing`` which one it lacks, so that the destination stays
paused with that reason; every value that is given is checked here, with an
error that names its variable.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, field_validator, model_validator

from idsync.destinations import DestinationConfig, check_url
from idsync.settings import parse_duration
from workers.destinations.mapping import load_property_map

KIND = "salesforce"
# Salesforce has no per-second limit, only a rolling 24-hour allocation of API
# calls per org (Enterprise: 100,000 + 1,000 per licence; "API Request Limits and
# Allocations"). One call a second spends at most 86,400 a day, even with a
# backlog that lasts all day; sizing is in README.md, section "Salesforce".
DEFAULT_RATE_LIMIT = "1/1s"
# sObject Collections take at most 200 records per call
# (developer.salesforce.com, "Upsert Records Using sObject Collections").
MAX_BATCH_SIZE = 200
# Calls of 20 s or more count against the org's cap on long-running requests
# ("API Request Limits and Allocations"): stay below it.
DEFAULT_TIMEOUT_SECONDS = 20.0
# sObject Collections upsert exists from API version 46.0 on.
MIN_API_VERSION = 46.0
DEFAULT_API_VERSION = "62.0"
OBJECTS = ("Contact", "Lead")
DEFAULT_PROPERTY_MAP = {
    "email": "Email",
    "given_name": "FirstName",
    "family_name": "LastName",
    "phone_number": "Phone",
}
DEFAULT_COMPANY = "Unknown"
GENERIC_LOGIN_HOSTS = frozenset({"login.salesforce.com", "test.salesforce.com"})
_API_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,79}$")
_VERSION = re.compile(r"^v?(\d{2,3})\.0$")


class Config(DestinationConfig):
    """A Salesforce org: its My Domain, an External Client App's credentials, what to write."""

    # The client secret must not reach a log line through a validation error or a repr.
    model_config = ConfigDict(hide_input_in_errors=True)

    rate_limit: str = DEFAULT_RATE_LIMIT
    batch_size: int = Field(default=MAX_BATCH_SIZE, ge=1, le=MAX_BATCH_SIZE)
    timeout_seconds: float = Field(default=DEFAULT_TIMEOUT_SECONDS, gt=0)
    login_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = Field(default=None, repr=False)
    object: str = "Contact"
    external_id_field: str = "Auth0_User_Id__c"
    api_version: str = DEFAULT_API_VERSION
    deprovision: Literal["mark", "delete"] = "mark"
    deprovision_field: str = "Idsync_Deprovisioned__c"
    default_company: str = Field(default=DEFAULT_COMPANY, min_length=1)
    limit_wait: str = "15m"

    @field_validator("login_url", "client_id", "client_secret")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() if value and value.strip() else None

    @field_validator("object")
    @classmethod
    def _object(cls, value: str) -> str:
        for known in OBJECTS:
            if value.strip().lower() == known.lower():
                return known
        raise ValueError(f"must be Contact or Lead (got {value!r})")

    @field_validator("external_id_field", "deprovision_field")
    @classmethod
    def _field_name(cls, value: str) -> str:
        value = value.strip()
        if not _API_NAME.match(value):
            raise ValueError(f"{value!r} is not a Salesforce field API name, e.g. Auth0_User_Id__c")
        return value

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, value: str) -> str:
        match = _VERSION.match(value.strip())
        if not match:
            raise ValueError(f"{value!r} is not an API version; write e.g. {DEFAULT_API_VERSION}")
        if float(match.group(1)) < MIN_API_VERSION:
            raise ValueError(
                f"{value!r} is too old: sObject Collections upsert needs {MIN_API_VERSION:.1f} "
                f"or later (e.g. {DEFAULT_API_VERSION})"
            )
        return f"{match.group(1)}.0"

    @field_validator("limit_wait")
    @classmethod
    def _limit_wait(cls, value: str) -> str:
        if parse_duration(value) <= 0:
            raise ValueError(f"must be a positive duration such as 15m (got {value!r})")
        return value

    @field_validator("property_map")
    @classmethod
    def _property_map(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        load_property_map(value, DEFAULT_PROPERTY_MAP, "the property map")
        return value

    @model_validator(mode="after")
    def _safe_url(self) -> Config:
        check_url(f"{self.prefix}LOGIN_URL", self.login_url)
        host = urlsplit(self.login_url or "").hostname or ""
        if host in GENERIC_LOGIN_HOSTS:
            # The client credentials flow runs only against the org's own My Domain
            # ("OAuth 2.0 Client Credentials Flow for Server-to-Server Integration").
            raise ValueError(
                f"{self.prefix}LOGIN_URL must be your org's My Domain URL, e.g. "
                f"https://example.my.salesforce.com, not {host}"
            )
        return self

    def missing(self) -> str | None:
        """``"SALESFORCE_LOGIN_URL is not set"`` (or the client id or secret), or None."""
        for field in ("login_url", "client_id", "client_secret"):
            if not getattr(self, field):
                return f"{self.prefix}{field.upper()} is not set"
        return None

    def secrets(self) -> list[str]:
        return [self.client_secret] if self.client_secret else []

    @property
    def limit_wait_seconds(self) -> float:
        """How long to wait once the org's 24-hour allocation is spent."""
        return parse_duration(self.limit_wait)

    def mapping(self) -> dict[str, str]:
        """Auth0 field (dots for nested fields) -> Salesforce field API name."""
        return load_property_map(self.property_map, DEFAULT_PROPERTY_MAP, "the property map")
