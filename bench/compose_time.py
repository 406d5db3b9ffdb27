"""Hydra composition time of typical job configs, in-process (what each job of a sweep pays before planning).

CPU time of this process (`time.process_time`, one thread): robust to a loaded machine, unlike wall time.
Baseline: the same compose calls on a checkout without the typed `intervention` / `metrics` / top-level schemas
(`--repo /path/to/that/checkout`: its code and its conf/). Median of N composes after one warm-up, one process, `initialize_config_dir` once.

    python bench/compose_time.py [--repeats 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

JOBS = {
    "default": [],
    "solo_sweep job": ["+experiment=solo_sweep", "intervention.slot=3"],
    "concept_steer job": ["+experiment=concept_steer", "intervention.strength=2"],
    "word_maps job": ["+experiment=word_maps"],
    "gains_optuna trial": ["+hparams_search=gains_optuna", "search.g6=2.0"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code and conf/ to time")
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo))
    from hydra import compose, initialize_config_dir

    from krea_sweeps.plan import register_resolvers

    register_resolvers()
    out = {"repo": str(args.repo), "load_average": os.getloadavg()[0], "cpus": os.cpu_count(), "cpu_ms_median": {}}
    with initialize_config_dir(config_dir=str(args.repo / "conf"), version_base="1.3"):
        for name, overrides in JOBS.items():
            compose("config", overrides)  # warm-up: file reads, plugin scan
            times = []
            for _ in range(args.repeats):
                t0 = time.process_time()
                compose("config", overrides)
                times.append(time.process_time() - t0)
            out["cpu_ms_median"][name] = round(1000 * statistics.median(times), 1)
        # what ComposeOnce does for a sweep job that differs only in a value: copy a composed job, set the value
        import copy

        from omegaconf import OmegaConf

        cfg = compose("config", JOBS["solo_sweep job"], return_hydra_config=True)
        times = []
        for i in range(args.repeats):
            t0 = time.process_time()
            job = copy.deepcopy(cfg)
            OmegaConf.update(job, "intervention.slot", i % 12, merge=True)
            times.append(time.process_time() - t0)
        out["cpu_ms_median"]["ComposeOnce copy + value"] = round(1000 * statistics.median(times), 1)
    out["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
