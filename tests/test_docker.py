"""docker/ checked without Docker: the compose file and the Dockerfile must agree with the code.

Every batchwise command in compose.yaml is resolved through the real click group (an unknown
command or option fails here, not in production), every environment variable must be one
batchwise reads, and hosts, ports and dependencies must line up between services.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from batchwise.cli import worker as cli_worker
from batchwise.cli.main import cli
from batchwise.config import Settings
from batchwise.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
EXPECTED = {"postgres", "redis", "emulator", "worker-1", "worker-2", "beat", "flower"}
#: ports the stock images listen on
IMAGE_PORTS = {"postgres": 5432, "redis": 6379}
_DEFAULTED = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set in the environment: the default."""
    return _DEFAULTED.sub(lambda m: m["default"] or "", value)


def is_batchwise(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith("batchwise:") or "build" in service


BATCHWISE_SERVICES = sorted(n for n, s in services().items() if is_batchwise(s))


def group() -> click.Group:
    copy = click.Group(name="batchwise", commands=dict(cli.commands), params=list(cli.params))
    cli_worker.register(copy)
    return copy


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per Dockerfile instruction, continuation lines joined."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def listening_port(service: dict[str, Any]) -> int | None:
    command = service.get("command") or []
    for i, arg in enumerate(command):
        if arg == "--port":
            return int(command[i + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    return None


# --- services, images, builds --------------------------------------------------------------


def test_compose_runs_the_whole_distributed_deployment() -> None:
    assert set(services()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_service_has_a_pinned_image_or_a_build_that_exists(name: str) -> None:
    service = services()[name]
    if "build" in service:
        context = (DOCKER / service["build"]["context"]).resolve()
        assert context == ROOT
        assert (context / service["build"]["dockerfile"]).is_file()
    else:
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


def test_two_workers_and_one_beat() -> None:
    commands = [s.get("command", [""])[0] for s in services().values() if is_batchwise(s)]
    assert commands.count("worker") == 2 and commands.count("beat") == 1


# --- commands --------------------------------------------------------------------------------


def test_the_batchwise_image_runs_the_emulator_workers_and_beat() -> None:
    assert set(BATCHWISE_SERVICES) == {"emulator", "worker-1", "worker-2", "beat"}


@pytest.mark.parametrize("name", BATCHWISE_SERVICES)
def test_every_batchwise_command_is_a_real_command_with_real_options(name: str) -> None:
    service = services()[name]
    args = [str(a) for a in service["command"]]
    assert not args[0].startswith("-"), "group options belong in the environment"
    root = group()
    with root.make_context("batchwise", [], resilient_parsing=True) as parent:
        command = root.get_command(parent, args[0])
        assert command is not None, f"{name}: no `batchwise {args[0]}` command"
        # raises click.UsageError on an unknown option or a bad value
        command.make_context(args[0], args[1:], parent=parent)


def test_the_emulator_listens_on_every_address_inside_its_network() -> None:
    command = services()["emulator"]["command"]
    assert command[command.index("--host") + 1] == "0.0.0.0"


def test_flower_watches_the_broker_the_workers_use() -> None:
    flower = services()["flower"]["command"]
    (broker,) = [a.split("=", 1)[1] for a in flower if a.startswith("--broker=")]
    for name in ("worker-1", "worker-2", "beat"):
        assert services()[name]["environment"]["BATCHWISE_BROKER_URL"] == broker
    workers = [services()[n]["command"] for n in ("worker-1", "worker-2")]
    assert all("--events" in c for c in workers), "Flower sees tasks only with events on"


# --- environment -----------------------------------------------------------------------------


def read_by_batchwise(name: str, value: str) -> bool:
    """True if batchwise reads `name`: it changes the settings, or a CLI option takes it."""
    envvars = {
        envvar
        for command in [group(), *group().commands.values()]
        for param in command.params
        for envvar in ([param.envvar] if isinstance(param.envvar, str) else param.envvar or [])
    }
    if name in envvars:
        return True
    try:
        return Settings.from_env({name: value}) != Settings.from_env({})
    except ConfigError:  # it was read, and found wanting (e.g. a settings file not there)
        return True


def test_the_readers_check_can_fail() -> None:
    assert not read_by_batchwise("BATCHWISE_DATABSE_URL", "postgresql://x/y")
    assert read_by_batchwise("BATCHWISE_QUEUE", "q")
    assert read_by_batchwise("OPENAI_API_KEY", "sk-x")


@pytest.mark.parametrize("name", BATCHWISE_SERVICES)
def test_every_variable_given_to_batchwise_is_one_it_reads(name: str) -> None:
    service = services()[name]
    for key, value in (service.get("environment") or {}).items():
        assert read_by_batchwise(key, interpolate(str(value))), f"{name}: {key} is never read"


def test_keys_come_from_the_environment_and_default_to_the_emulator() -> None:
    env = services()["worker-1"]["environment"]
    for provider in ("OPENAI", "ANTHROPIC"):
        assert env[f"{provider}_API_KEY"] == f"${{{provider}_API_KEY:-emulator}}"
        base = urlsplit(interpolate(env[f"{provider}_BASE_URL"]))
        assert env[f"{provider}_BASE_URL"].startswith(f"${{{provider}_BASE_URL:-")
        assert (base.hostname, base.port) == ("emulator", listening_port(services()["emulator"]))


def test_urls_name_services_on_the_ports_they_listen_on() -> None:
    all_services = services()
    for name, service in all_services.items():
        if not is_batchwise(service):
            continue
        env = service.get("environment") or {}
        for key in ("BATCHWISE_DATABASE_URL", "BATCHWISE_BROKER_URL"):
            if key not in env:
                continue
            url = urlsplit(env[key])
            assert url.hostname in all_services, f"{name}: {key} names no service"
            assert url.port == IMAGE_PORTS[url.hostname], f"{name}: {key} port"
            assert url.hostname in service["depends_on"], f"{name} must wait for {url.hostname}"
    database = urlsplit(all_services["worker-1"]["environment"]["BATCHWISE_DATABASE_URL"])
    assert database.scheme == "postgresql+psycopg"
    pg_env = all_services["postgres"]["environment"]
    assert (database.username, database.password, database.path) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        "/" + pg_env["POSTGRES_DB"],
    )


def test_published_ports_are_the_ones_the_services_listen_on() -> None:
    for name, service in services().items():
        for mapping in service.get("ports", []):
            container = int(str(mapping).rsplit(":", 1)[1])
            assert container == (listening_port(service) or IMAGE_PORTS.get(name)), name


def test_dependencies_exist_and_healthy_ones_have_healthchecks() -> None:
    all_services = services()
    for name, service in all_services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in all_services, f"{name} depends on unknown {dep}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in all_services[dep], f"{dep} has no healthcheck"


# --- the Dockerfile ----------------------------------------------------------------------------


def test_the_image_is_python_311_slim_with_batchwise_as_entrypoint() -> None:
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    (entrypoint,) = [args for word, args in steps if word == "ENTRYPOINT"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == '["batchwise"]' and "batchwise" in scripts
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_the_dockerfile_copies_files_that_exist_and_installs_the_project() -> None:
    steps = dockerfile()
    copies = [shlex.split(args) for word, args in steps if word == "COPY"]
    assert copies
    for *sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
    copied = {s for *sources, _ in copies for s in sources}
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    assert {"pyproject.toml", readme, "src"} <= copied, "pip install . needs these"
    assert any(word == "RUN" and "pip install ." in args for word, args in steps)


def test_the_dockerfile_sets_only_variables_batchwise_reads_or_python_and_pip_do() -> None:
    for word, args in dockerfile():
        if word != "ENV":
            continue
        for name, value in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", args):
            assert name.startswith(("PYTHON", "PIP_")) or read_by_batchwise(name, value), name


def test_the_build_context_leaves_out_the_virtualenv_and_git() -> None:
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)
