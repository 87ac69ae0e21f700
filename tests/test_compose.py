"""docker-compose.yml without Docker: its structure, then each service's own command, run locally.

There is no Docker engine on CI, so the file is read as YAML and interpolated
the way compose does it (``$$``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``)
from ``.env.example`` with test secrets filled in. Then the commands and
healthchecks written in it run as local processes, pointed at the test
PostgreSQL and Redis: only the listen address, the ports and the state file
paths are changed.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from idsync.settings import Settings
from idsync.stack import Stack, free_port
from tests.conftest import REDIS_URL, ROOT

pytestmark = pytest.mark.e2e

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SERVICES = {"postgres", "redis", "migrate", "ingest", "worker", "beat", "flower"}
LONG_RUNNING = SERVICES - {"migrate"}
SECRETS = (
    "POSTGRES_PASSWORD",
    "INGEST_TOKEN",
    "ADMIN_TOKEN",
    "SECRET_KEY",
    "HUBSPOT_TOKEN",
    "FLOWER_BASIC_AUTH",
)
TEST_SECRETS = {
    "POSTGRES_PASSWORD": "compose-test-db-password",
    "INGEST_TOKEN": "compose-test-ingest-token",
    "ADMIN_TOKEN": "compose-test-admin-token",
    "SECRET_KEY": "compose-test-secret-key",
    "HUBSPOT_TOKEN": "compose-test-hubspot-token",
    "FLOWER_BASIC_AUTH": "operator:compose-test-flower-password",
}
# The optional tunables of .env.example, as Settings fields.
TUNABLES = (
    "DESTINATIONS",
    "HUBSPOT_RATE_LIMIT",
    "HUBSPOT_TIMEZONE",
    "DEPROVISION",
    "RETRY_SCHEDULE",
    "LEASE_SECONDS",
    "SETTLE_SECONDS",
    "SWEEP_SECONDS",
    "RETENTION_DAYS",
)

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<named>\w+))"
)


class MissingVariable(Exception):
    """Compose would refuse the file: a ``${VAR:?...}`` is unset or empty."""


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """``text`` with variables substituted as docker compose does it."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value = variables.get(name)
        op = match["op"] or ""
        missing = value is None or (value == "" and op.startswith(":"))
        if op.endswith("?") and missing:
            raise MissingVariable(f"{name}: {match['arg']}")
        if op.endswith("-") and missing:
            return match["arg"]
        return value or ""

    return _VARIABLE.sub(substitute, text)


def resolve(node: Any, variables: Mapping[str, str]) -> Any:
    """Interpolate every string value of a loaded compose document."""
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [resolve(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, variables) for key, value in node.items()}
    return node


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(set variables, commented-out optional variables) of .env.example."""
    active: dict[str, str] = {}
    optional: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            active[match[1]] = match[2]
        elif match := re.fullmatch(r"# ([A-Z][A-Z0-9_]*)=(.*)", line):
            optional[match[1]] = match[2]
    return active, optional


def dotenv() -> dict[str, str]:
    """An operator's .env: .env.example with every secret filled in."""
    active, _ = env_example()
    return {**active, **TEST_SECRETS}


def compose() -> dict[str, Any]:
    """docker-compose.yml as compose sees it with that .env."""
    return resolve(raw_compose(), dotenv())


def compose_text() -> str:
    """docker-compose.yml without its comment lines (compose does not interpolate those)."""
    lines = COMPOSE_FILE.read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def referenced_variables() -> set[str]:
    return {
        match["braced"] or match["named"]
        for match in _VARIABLE.finditer(compose_text())
        if not match["escaped"]
    }


def compose_defaults() -> dict[str, str]:
    """``${VAR:-default}`` defaults of docker-compose.yml by variable."""
    return dict(re.findall(r"\$\{(\w+):-([^}]*)\}", compose_text()))


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# Structure: what compose would run, checked without Docker.


def test_every_service_is_defined() -> None:
    assert set(compose()["services"]) == SERVICES


def test_redis_persists_messages_and_never_evicts() -> None:
    command = " ".join(compose()["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command


def test_services_start_in_order() -> None:
    services = compose()["services"]
    conditions = {
        name: {dep: spec["condition"] for dep, spec in service.get("depends_on", {}).items()}
        for name, service in services.items()
    }
    assert conditions["migrate"] == {"postgres": "service_healthy"}
    for name in ("ingest", "worker", "beat"):
        assert conditions[name] == {
            "migrate": "service_completed_successfully",
            "redis": "service_healthy",
        }, name
    assert conditions["flower"] == {"redis": "service_healthy"}


def test_long_running_services_have_healthchecks_and_migrate_runs_once() -> None:
    services = compose()["services"]
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), name
    assert services["migrate"]["restart"] == "no"
    assert "healthcheck" not in services["migrate"]


def test_only_ingest_publishes_a_port_on_loopback_by_default() -> None:
    services = compose()["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"ingest"}
    assert services["ingest"]["ports"] == ["127.0.0.1:8000:8000"]
    assert not any(service.get("network_mode") == "host" for service in services.values())


def test_state_lives_on_volumes_and_metrics_on_a_tmpfs() -> None:
    services = compose()["services"]
    mounts = {
        name: {volume.split(":", 1)[1] for volume in service.get("volumes", [])}
        for name, service in services.items()
    }
    assert "/var/lib/postgresql/data" in mounts["postgres"]
    assert "/data" in mounts["redis"]
    assert "/var/lib/idsync" in mounts["beat"]
    assert "/var/lib/flower" in mounts["flower"]
    schedule = services["beat"]["command"].index("--schedule") + 1
    assert services["beat"]["command"][schedule].startswith("/var/lib/idsync/")
    assert "--db=/var/lib/flower/flower.db" in services["flower"]["command"]
    ingest = services["ingest"]
    assert ingest["environment"]["PROMETHEUS_MULTIPROC_DIR"] in ingest["tmpfs"]


@pytest.mark.parametrize("secret", SECRETS)
def test_secret_is_required_and_has_no_default(secret: str) -> None:
    text = compose_text()
    uses = re.findall(r"\$\{" + secret + r"(\W*)", text)
    assert uses, f"{secret} is not used"
    assert all(use.startswith(":?") for use in uses), f"{secret} has a default or no check"
    for value in (None, ""):
        variables = {k: v for k, v in dotenv().items() if k != secret}
        if value is not None:
            variables[secret] = value
        with pytest.raises(MissingVariable, match=secret):
            resolve(raw_compose(), variables)


def test_secrets_come_only_from_the_environment() -> None:
    raw, services = raw_compose()["services"], compose()["services"]
    for name, service in raw.items():
        for key, value in service.get("environment", {}).items():
            if key in SECRETS:
                assert re.fullmatch(r"\$\{" + key + r":\?[^}]*\}", value), (name, key)
    # Flower reads its credentials from the environment, not from its command line,
    # where every local user could read them.
    assert not any("basic" in arg for arg in services["flower"]["command"])
    assert (
        services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == TEST_SECRETS["FLOWER_BASIC_AUTH"]
    )


def test_env_example_names_every_variable_compose_reads() -> None:
    active, optional = env_example()
    assert referenced_variables() <= set(active) | set(optional)
    for secret in SECRETS:
        # Empty on purpose: a copied but unedited .env stops compose instead of
        # running with secrets everybody can read here.
        assert active.get(secret) == "", secret
    for name, default in compose_defaults().items():
        assert optional.get(name) == default, name
    assert set(TUNABLES) <= set(optional)


@pytest.mark.parametrize("name", TUNABLES)
def test_documented_default_is_the_code_default(name: str) -> None:
    _, optional = env_example()
    field = name.lower()
    documented = Settings(**{field: optional[name]})
    assert getattr(documented, field) == Settings.model_fields[field].default


def test_dockerfile_installs_the_source_and_runs_as_a_user() -> None:
    lines = dockerfile_instructions()
    assert lines[0] == "FROM python:3.11-slim"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    copy = next(i for i, line in enumerate(lines) if line.startswith("COPY . "))
    install = next(i for i, line in enumerate(lines) if "pip install ." in line)
    assert copy < install, "copy the source before pip install (namespace package pitfall)"
    assert any(re.match(r"ENV HOME=/\S+", line) for line in lines)
    assert any(line.startswith("CMD") and "--no-control-socket" in line for line in lines)
    ignored = set(DOCKERIGNORE.read_text().split())
    assert {".git", ".venv", ".env*", "*.db", ".pytest_cache", ".hypothesis"} <= ignored


# The commands themselves, as local processes against the test services.


def local_executable(name: str) -> str:
    """A console script of this virtualenv (in the image they are on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def localize(command: list[str], replacements: Mapping[str, str]) -> list[str]:
    """``command`` with its executable from this virtualenv and each replacement made once."""
    joined = "\0".join(command)
    for old, new in replacements.items():
        assert old in joined, f"{old!r} not in {command}"
        joined = joined.replace(old, new)
    result = joined.split("\0")
    return [local_executable(result[0]), *result[1:]]


def healthcheck(service: dict[str, Any], replacements: Mapping[str, str]) -> list[str]:
    """The service's healthcheck as a local command."""
    kind, *test = service["healthcheck"]["test"]
    if kind == "CMD-SHELL":
        (script,) = test
        for old, new in replacements.items():
            assert old in script, f"{old!r} not in {script!r}"
            script = script.replace(old, new)
        return ["sh", "-c", script]
    assert kind == "CMD"
    return localize(test, replacements)


@pytest.fixture
def stacks() -> Iterator[Callable[[Mapping[str, str], Path], Stack]]:
    """Make one Stack per service environment; every child stops at the end, pass or fail."""
    made: list[Stack] = []

    def make(env: Mapping[str, str], workdir: Path) -> Stack:
        made.append(Stack(env=env, workdir=workdir))
        return made[-1]

    yield make
    for stack in made:
        stack.stop_all()


def test_each_service_runs_its_compose_command(
    stacks: Callable[[Mapping[str, str], Path], Stack],
    isolated_database_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    database_url = isolated_database_url
    services = compose()["services"]
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    # Connection settings point at the test services; everything else is the file's.
    local = {
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": REDIS_URL,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": f"{redis_prefix}-compose",
        "HUBSPOT_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "SWEEP_SECONDS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }

    def stack_for(name: str, workdir: Path = tmp_path) -> Stack:
        env = {key: local.get(key, value) for key, value in services[name]["environment"].items()}
        # What the image provides: console scripts on PATH, and Docker's HOSTNAME.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
        env["HOSTNAME"] = socket.gethostname()
        return stacks(env, workdir)

    # migrate is one-shot and runs where alembic.ini is (the image's WORKDIR).
    stack_for("migrate", ROOT).run(localize(services["migrate"]["command"], {}))

    ingest_port, flower_port = free_port(), free_port()
    schedule = tmp_path / "celerybeat-schedule"
    places = {
        "ingest": {"0.0.0.0:8000": f"127.0.0.1:{ingest_port}"},
        "worker": {},
        "beat": {"/var/lib/idsync/celerybeat-schedule": str(schedule)},
        "flower": {
            "--address=0.0.0.0": "--address=127.0.0.1",
            "--port=5555": f"--port={flower_port}",
            "/var/lib/flower/flower.db": str(tmp_path / "flower.db"),
        },
    }
    probes = {
        "ingest": {"127.0.0.1:8000": f"127.0.0.1:{ingest_port}"},
        "worker": {},
        "beat": {"/var/lib/idsync/celerybeat-schedule": str(schedule)},
        "flower": {"127.0.0.1:5555": f"127.0.0.1:{flower_port}"},
    }
    running = {}
    for name, replacements in places.items():
        command = localize(services[name]["command"], replacements)
        if name == "worker":
            command += ["--concurrency", "1"]
        running[name] = stack_for(name)
        running[name].start(name, command)

    ingest = f"http://127.0.0.1:{ingest_port}"
    running["ingest"].wait_for_http(f"{ingest}/readyz")
    ready = requests.get(f"{ingest}/readyz", timeout=5).json()
    assert ready["database"] == "ok" and ready["broker"] == "ok"
    assert ready["destinations"] == {"hubspot": "ok"}
    assert requests.get(f"{ingest}/metrics", timeout=5).status_code == 200
    unauthenticated = requests.post(f"{ingest}/events/auth0", json={}, timeout=5)
    assert unauthenticated.status_code == 401

    running["worker"].wait_for_log("worker", " ready.")
    running["beat"].wait_for_log("beat", "Scheduler: Sending due task sweep")
    # The sweep beat published went through the prefixed broker to the worker.
    running["worker"].wait_for_log("worker", "succeeded")
    assert "Task idsync.sweep[" in running["worker"].log("worker")

    flower = f"http://127.0.0.1:{flower_port}"
    running["flower"].wait_for_http(f"{flower}/healthcheck")
    assert requests.get(flower, timeout=5).status_code == 401
    wrong = requests.get(flower, auth=("operator", "wrong"), timeout=5)
    assert wrong.status_code == 401
    user, password = TEST_SECRETS["FLOWER_BASIC_AUTH"].split(":")
    assert requests.get(flower, auth=(user, password), timeout=5).status_code == 200

    for name, replacements in probes.items():
        running[name].run(healthcheck(services[name], replacements), timeout=30)
