"""What a Braze destination reads: ``BRAZE_*`` (or ``<NAME>_*``) variables.

Facts behind the defaults (``shared/reference/destinations.md``, "Braze", and
Braze's "Rate limits" page, https://www.braze.com/docs/api/api_limits):

- ``/users/track`` takes at most 75 objects per request across ``attributes``,
  ``events`` and ``purchases``; workspaces on the "Monthly Active Users CY 24-25"
  plan take 50 ("POST: Track users", https://www.braze.com/docs/api/endpoints/user_data/post_user_track).
- ``/users/track`` is limited to 3,000 requests per 3 seconds per workspace,
  shared by every key and integration of that workspace. The default here takes
  a third of it, so that other integrations keep room.
- ``/users/delete`` takes at most 50 external ids and is irreversible.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from idsync.destinations import DestinationConfig, check_url
from workers.destinations import mapping

KIND = "braze"
TRACK_LIMIT = 75  # objects per /users/track request
DELETE_LIMIT = 50  # external ids per /users/delete request
DEFAULT_RATE_LIMIT = "1000/3s"
DEFAULT_PROPERTY_MAP = {
    "email": "email",
    "given_name": "first_name",
    "family_name": "last_name",
    "phone_number": "phone",
}
DEFAULT_DEPROVISION_ATTRIBUTE = "idsync_deprovisioned"


class Config(DestinationConfig):
    """A Braze workspace: its cluster's REST endpoint, a REST API key, limits, deprovisioning."""

    # The key must not reach a log line through a validation error or a repr.
    model_config = ConfigDict(hide_input_in_errors=True)

    rate_limit: str = DEFAULT_RATE_LIMIT
    batch_size: int = Field(default=TRACK_LIMIT, ge=1, le=TRACK_LIMIT)
    rest_endpoint: str | None = None
    api_key: str | None = Field(default=None, repr=False)
    deprovision: Literal["mark", "delete"] = "mark"
    deprovision_attribute: str = DEFAULT_DEPROVISION_ATTRIBUTE

    @field_validator("rest_endpoint", "api_key", "property_map")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() if value and value.strip() else None

    @field_validator("deprovision", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("deprovision_attribute")
    @classmethod
    def _attribute_name(cls, value: str) -> str:
        value = value.strip()
        if not value or value == "external_id":
            raise ValueError("must name a custom attribute, e.g. idsync_deprovisioned")
        return value

    @model_validator(mode="after")
    def _checked(self) -> Config:
        check_url(f"{self.prefix}REST_ENDPOINT", self.rest_endpoint)
        load_property_map(self.property_map, f"{self.prefix}PROPERTY_MAP")
        return self

    def missing(self) -> str | None:
        """``"BRAZE_REST_ENDPOINT is not set"``, ``"BRAZE_API_KEY is not set"``, or None."""
        if not self.rest_endpoint:
            return f"{self.prefix}REST_ENDPOINT is not set"
        if not self.api_key:
            return f"{self.prefix}API_KEY is not set"
        return None

    def secrets(self) -> list[str]:
        """The REST API key, for logs to mask."""
        return [self.api_key] if self.api_key else []

    def mapping(self) -> dict[str, str]:
        """Auth0 field (dots for nested fields) -> Braze attribute."""
        return load_property_map(self.property_map, f"{self.prefix}PROPERTY_MAP")


def load_property_map(path: str | None, variable: str) -> dict[str, str]:
    """The map in the JSON file at ``path``, or the default; never maps onto ``external_id``.

    ``external_id`` is the Auth0 ``user_id`` and the key of every profile: a map
    that wrote another value into it would move users between profiles.
    """
    found = mapping.load_property_map(path, DEFAULT_PROPERTY_MAP, variable)
    if "external_id" in found.values():
        raise ValueError(
            f"{variable} must not map a field onto external_id: idsync sets it to the user_id"
        )
    return found
