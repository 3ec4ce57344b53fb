"""Every command of every installed CLI prints its help: the first thing a new user runs."""

from __future__ import annotations

import pytest
import typer
from mmstore.cli import app as store_app
from mmstore_inference.cli import app as inference_app
from mmstore_rollout.cli import app as rollout_app
from mmstore_trainer.cli import app as trainer_app
from typer.main import get_command
from typer.testing import CliRunner

APPS = {
    "mmstore": store_app,
    "mmstore-inference": inference_app,
    "mmstore-smoke": rollout_app,
    "mmstore-trainer": trainer_app,
}


def commands(app: typer.Typer) -> list[list[str]]:
    group = get_command(app)
    return [[]] + [[name] for name in getattr(group, "commands", {})]


@pytest.mark.parametrize(
    ("prog", "args"), [(prog, args) for prog, app in APPS.items() for args in commands(app)], ids=str
)
def test_help_renders(prog: str, args: list[str]):
    result = CliRunner().invoke(APPS[prog], [*args, "--help"], prog_name=prog, env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output
