"""``mmstore-smoke run``'s argument checks: a wrong combination is refused before anything starts,
with the flag to change (the loop itself is tests/test_smoke.py's)."""

from __future__ import annotations

import pytest
from mmstore_rollout.cli import app
from typer.testing import CliRunner


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--env", "chess"], "--env must be one of shapes, click"),
        (["--engine", "sglang"], "use inference or vllm-serve"),
        (["--engine", "vllm-serve", "--replicas", "2"], "no replicas"),
        (["--inference", "http://127.0.0.1:1", "--replicas", "2"], "not both"),
        (["--inference-replica", "http://127.0.0.1:1", "--replicas", "2"], "pick one"),
    ],
)
def test_run_refuses_a_wrong_combination_before_starting_anything(args, says, tmp_path):
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split())  # rich wraps the usage box
    assert not (tmp_path / "run").exists()
