"""docker-compose.yml and the Dockerfile name only services, commands, modules, files and
settings that exist in the project (no Docker engine runs here, so the files are checked)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from search.cli import build_parser
from service.config import ServiceSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
# Variables that other software reads: PostgreSQL's image, cn4's cache root, Hugging Face.
EXTERNAL_VARIABLES = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "CN4_HOME", "HF_HUB_OFFLINE"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def cn4_commands(compose: dict) -> list[list[str]]:
    commands = [service["command"] for service in compose["services"].values() if "command" in service]
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    commands.append(yaml.safe_load(re.search(r"^CMD (.+)$", dockerfile, re.MULTILINE).group(1)))
    return [command for command in commands if command[0] == "cn4"]


def test_compose_has_every_service(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "api", "worker"}
    for name in ("postgres", "api", "worker"):
        assert "healthcheck" in services[name], name
    assert services["migrate"]["restart"] == "no"
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "replicas" not in services["worker"].get("deploy", {})
    assert "container_name" not in services["worker"]


def test_compose_dependencies_and_volumes_exist(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in compose["volumes"], f"{name} mounts unknown volume {source}"
    assert services["api"]["volumes"] == services["worker"]["volumes"]


def test_compose_commands_parse(compose):
    parser = build_parser()
    commands = cn4_commands(compose)
    assert {command[-1] if command[1:2] == ["-v"] else command[1] for command in commands} >= {"migrate", "worker"}
    names = set()
    for command in commands:
        args = parser.parse_args(command[1:])
        assert callable(args.func), command
        names.add(args.command)
    assert names == {"migrate", "serve", "worker"}


def test_compose_modules_import(compose):
    for service in compose["services"].values():
        test = service.get("healthcheck", {}).get("test", [])
        text = " ".join(test)
        for module in re.findall(r"import ([a-z_][\w.]*)", text):
            importlib.import_module(module)


def test_compose_settings_exist(compose):
    fields = {f"CN4_{name.upper()}" for name in ServiceSettings.model_fields}
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            assert variable in fields or variable in EXTERNAL_VARIABLES, f"{name}: unknown {variable}"
    database_url = compose["services"]["worker"]["environment"]["CN4_DATABASE_URL"]
    assert database_url.startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in database_url
    assert compose["services"]["api"]["environment"]["CN4_API_TOKEN"].startswith("${CN4_API_TOKEN:?")


def test_dockerfile_installs_cpu_torch_first():
    lines = [line.strip() for line in (REPO_ROOT / "Dockerfile").read_text().splitlines()]
    runs = [line for line in lines if line.startswith("RUN pip install")]
    assert "torch==2.13.0" in runs[0]
    assert "download.pytorch.org/whl/cpu" in runs[0]
    assert runs[1] == "RUN pip install -e ."
    for line in lines:
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert (REPO_ROOT / source).exists(), f"Dockerfile copies missing {source}"
