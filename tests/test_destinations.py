"""Destinations by name and kind: their own settings, limits and worker slots."""

from __future__ import annotations

import time

import pytest
import redis
from pydantic import ValidationError

from idsync.settings import Settings
from tests.conftest import REDIS_URL
from workers.slots import DeliverySlots


def test_hubspot_settings_come_from_its_prefixed_variables_and_the_old_aliases() -> None:
    settings = Settings(
        hubspot_token="t0k3n-abc",
        destination_env={"HUBSPOT_CONCURRENCY": "3"},
        deprovision="mark",
    )
    config = settings.destination("hubspot")
    assert (config.kind, config.concurrency, config.deprovision) == ("hubspot", 3, "mark")
    assert config.missing() is None
    assert "t0k3n-abc" in settings.secrets


def test_a_prefixed_deprovision_wins_over_the_alias() -> None:
    settings = Settings(deprovision="mark", destination_env={"HUBSPOT_DEPROVISION": "archive"})
    assert settings.destination("hubspot").deprovision == "archive"


def test_two_hubspot_accounts_side_by_side_each_read_their_own_variables() -> None:
    settings = Settings(
        destinations="hubspot,eu_crm",
        hubspot_token="first-token",
        destination_env={
            "EU_CRM_KIND": "hubspot",
            "EU_CRM_TOKEN": "second-token",
            "EU_CRM_RATE_LIMIT": "5/1s",
            "DEPROVISION": "mark",  # an alias of the one named hubspot only
        },
    )
    eu = settings.destination("eu_crm")
    assert (eu.kind, eu.rate, eu.deprovision) == ("hubspot", (5, 1.0), "archive")
    assert settings.destination("hubspot").rate == (100, 10.0)


def test_incomplete_settings_say_what_is_missing_without_loading_the_adapter() -> None:
    import sys

    sys.modules.pop("workers.destinations.hubspot.adapter", None)
    config = Settings(destinations="crm", destination_env={"CRM_KIND": "hubspot"}).destination(
        "crm"
    )
    assert config.missing() == "CRM_TOKEN is not set"
    assert "workers.destinations.hubspot.adapter" not in sys.modules


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"destinations": "Bad-Name"}, "must match [a-z][a-z0-9_]{0,49}"),
        ({"destinations": "hubspot,hubspot"}, "names a destination twice"),
        ({"destinations": "licenses"}, "unknown kind 'licenses'; set LICENSES_KIND"),
        (
            {"destinations": "licenses", "destination_env": {"LICENSES_KIND": "fax"}},
            "unknown kind 'fax'",
        ),
        ({"destination_env": {"HUBSPOT_RATE_LIMIT": "lots"}}, "HUBSPOT_RATE_LIMIT"),
        ({"hubspot_base_url": "http://api.example.com"}, "HUBSPOT_BASE_URL must use https"),
    ],
)
def test_bad_destination_settings_are_refused_naming_the_variable(
    given: dict[str, object], message: str
) -> None:
    with pytest.raises((ValidationError, ValueError)) as raised:
        Settings(**given)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_the_lease_rule_follows_the_slowest_destination() -> None:
    env = {"SLOW_KIND": "hubspot", "SLOW_TIMEOUT_SECONDS": "60"}
    with pytest.raises(ValidationError, match="SLOW_TIMEOUT_SECONDS=60"):
        Settings(destinations="hubspot,slow", destination_env=env)
    settings = Settings(destinations="hubspot,slow", destination_env=env, lease_seconds=200)
    assert settings.call_seconds == pytest.approx(63.05)


def test_a_destination_never_runs_more_deliver_tasks_than_its_cap(redis_prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    slots = DeliverySlots(client, f"{redis_prefix}:slots:test", cap=2, ttl=0.5)
    assert slots.take("a") and slots.take("b")
    assert not slots.take("c")
    assert slots.take("a")  # renewing one's own slot is always allowed
    slots.release("a")
    assert slots.take("c")
    # A dead task's slot expires by itself.
    time.sleep(0.6)
    assert slots.take("d") and slots.take("e")
    client.close()


def test_no_destination_at_all_is_a_valid_configuration() -> None:
    settings = Settings(destinations="")
    assert settings.destinations == () and settings.call_seconds == 0.0


def test_a_settings_error_never_shows_the_credentials_beside_it() -> None:
    """A refused setting is named; the values given with it (tokens, secrets) are not."""
    token = "tk1"
    with pytest.raises(ValidationError) as refused:
        Settings(ingest_token=token, lease_seconds=1)
    assert "LEASE_SECONDS=1 is too short" in str(refused.value)
    assert f"'{token}'" not in str(refused.value)
