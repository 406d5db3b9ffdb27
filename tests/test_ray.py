"""`hydra/launcher=ray`: a sweep on a local Ray with 2 workers, each worker keeping its session between jobs."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the Ray launcher is the `ray` extra (in `test`)")


def test_ray_preset_runs_six_jobs_on_two_workers_each_loading_the_model_once(cli):
    out = cli("-m", "hydra/launcher=ray", "hydra.launcher.ray.remote.num_gpus=0", "+hydra.launcher.ray.init.num_cpus=2",
              "seeds=0,1,2,3,4,5", "wandb.mode=disabled", "name=ray", timeout=600,
              env={"RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    results = sorted((cli.cwd / "outputs" / "ray").glob("*/result.json"))
    assert len(results) == 6 and all(json.loads(r.read_text())["status"] == "done" for r in results)
    # Ray prefixes each worker's lines with its pid: `(_run_job pid=123) … loading transformer from …`.
    loads = Counter(re.findall(r"pid=(\d+)\).*loading transformer", log))
    done = Counter(re.findall(r"pid=(\d+)\).*\] - done ", log))
    assert sum(done.values()) == 6 and 1 <= len(loads) <= 2 and set(loads.values()) == {1}, (loads, done)
    assert any(n > 1 for n in done.values())  # a worker ran several jobs on the one model it loaded
    assert "validated against ConfigStore schema" not in log
