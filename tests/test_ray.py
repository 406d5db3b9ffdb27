"""`hydra/launcher=ray`: a sweep on a local Ray with 2 workers, each worker keeping its session between jobs."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the Ray launcher is the `ray` extra (in `test`)")


def test_ray_preset_runs_six_jobs_on_two_workers_each_loading_the_model_once(cli_process):
    cli = cli_process  # a real process: Ray starts its workers from it
    out = cli("-m", "hydra/launcher=ray", "hydra.launcher.ray.remote.num_gpus=0", "+hydra.launcher.ray.init.num_cpus=2",
              "seeds=0,1,2,3,4,5", "wandb.mode=disabled", "name=ray", timeout=600,
              env={"RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    records = [json.loads(r.read_text()) for r in sorted((cli.cwd / "outputs" / "ray").glob("*/result.json"))]
    assert len(records) == 6 and all(r["status"] == "done" for r in records)
    # Each result records the process that ran it and what that process had loaded by then (Ray's forwarded log
    # lines can be lost when the driver exits first, so the files are the evidence, not the log).
    by_pid = defaultdict(list)
    for r in records:
        by_pid[r["process"]["pid"]].append(r["process"])
    assert 1 <= len(by_pid) <= 2, by_pid
    for runs in by_pid.values():
        assert sorted(p["job_in_process"] for p in runs) == list(range(1, len(runs) + 1)), runs
        assert all(p["model_loads"].get("transformer") == 1 for p in runs), runs  # loaded once, reused after
    assert any(len(runs) > 1 for runs in by_pid.values())  # a worker ran several jobs on the one model it loaded
    assert "validated against ConfigStore schema" not in log
