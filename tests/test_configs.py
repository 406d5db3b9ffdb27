"""Configs as data: typed groups whose type and choice errors come from composition (one line naming the key, with
"did you mean"), variants that declare what they are, and errors after planning that fail one job, not the sweep."""

from __future__ import annotations

import json
import os

from conftest import REPO, run_cli

FAST = ["wandb.mode=disabled", "sampler.steps=2", "sampler.max_sequence_length=32",
        "prompts.prompts=[A red fox sitting in fresh snow.]"]
CONFIG_FAULT = ["+metrics.config_fault._target_=faults.ConfigErrorOnSeed", "+metrics.config_fault.seed=1"]


def env() -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------- errors after planning
def test_a_config_error_while_a_job_runs_fails_that_job_only(tmp_path):
    result = run_cli(["-m", "seeds=0,1,2", *CONFIG_FAULT, *FAST], tmp_path, env=env())
    assert result.returncode == 1, result.stderr[-3000:]  # failed jobs (1), not a rejected config (2)
    sweep = tmp_path / "outputs" / "default"
    failed = sorted(sweep.glob("*/failed.json"))
    assert len(failed) == 1 and "seeds=1" in (failed[0].parent / ".hydra" / "overrides.yaml").read_text()
    error = json.loads(failed[0].read_text())["error"]
    assert error.startswith("ConfigError: config key `metrics.config_fault.seed`")
    done = {json.loads(f.read_text())["job"]["name"] for f in sweep.glob("*/result.json")}
    assert len(done) == 2, "the jobs before and after the failing one ran"
    assert "1 job(s) failed" in result.stderr and failed[0].parent.name in result.stderr


def test_fail_fast_still_stops_at_a_config_error_while_a_job_runs(tmp_path):
    result = run_cli(["-m", "seeds=1,2", "fail_fast=true", *CONFIG_FAULT, *FAST], tmp_path, env=env())
    assert result.returncode == 1 and "fail_fast: stopped" in result.stderr, result.stderr[-3000:]
    sweep = tmp_path / "outputs" / "default"
    assert len(list(sweep.glob("*/failed.json"))) == 1 and not list(sweep.glob("*/result.json"))
