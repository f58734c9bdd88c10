"""The Dockerfile and docker-compose.yml run the same commands as the CLI: check them here,
where no Docker engine runs, by parsing what they would execute."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import typer.main
import yaml

from graft.cli import app as cli

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile_cmds() -> list[list[str]]:
    return [
        json.loads(m)
        for m in re.findall(
            r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE
        )
    ]


def test_every_graft_command_in_docker_files_is_a_real_cli_command():
    commands = dockerfile_cmds() + [
        service["command"]
        for service in compose()["services"].values()
        if isinstance(service.get("command"), list) and service["command"][0] == "graft"
    ]
    assert len(commands) >= 5
    group = typer.main.get_command(cli)
    for command in commands:
        if command[0] == "graft":
            resolved, args = group, command[1:]
            while args and hasattr(resolved, "commands"):  # walk down the sub-commands
                resolved = resolved.commands[args[0]]
                args = args[1:]
            assert not hasattr(resolved, "commands"), command  # a command, not a group


def test_compose_configures_only_settings_that_exist():
    from core.settings import Settings

    known = {f"GRAFT_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose()["services"].items():
        for variable in service.get("environment") or {}:
            if variable.startswith("GRAFT_"):
                assert variable in known, (name, variable)


def test_compose_builds_both_images_and_reserves_a_gpu_for_workers():
    services = compose()["services"]
    assert services["worker"]["build"]["target"] == "worker"
    assert services["migrate"]["build"]["target"] == "api"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "noeviction" in services["redis"]["command"]
    stages = re.findall(r"^FROM \S+ AS (\w+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert stages == ["api", "worker"]


def test_flower_finds_the_celery_app(tmp_path):
    flower = next(s for s in compose()["services"].values() if "flower" in s.get("command", []))
    app_ref = flower["command"][flower["command"].index("-A") + 1]
    env = {**os.environ, "GRAFT_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", app_ref, "report"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "task_acks_late: True" in out.stdout
