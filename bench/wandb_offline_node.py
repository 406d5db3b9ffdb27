"""What a W&B API key costs on a compute node without a route to the W&B server (issue 9, point 1).

    python bench/wandb_offline_node.py            # 2-job synthetic sweep, 3 repeats of each setting

Baseline: the same `python run.py -m seeds=0,1 …` sweep with no API key (offline from the start) — what a user on
an offline node would otherwise have to remember to set. Compared: a fake 40-character key with
WANDB_BASE_URL=http://127.0.0.1:9 (refused at once) and with a server that accepts connections but never answers
(the probe's 3 s timeout is paid once per process). Before the once-per-process probe, each job waited ~90 s in
`wandb.init`. Wall seconds of the whole command, interpreter start included; median of the repeats.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, median, write_json

ARGS = ["-m", "seeds=0,1", "prompts.prompts=[A red fox.]", "sampler.steps=1", "sampler.max_sequence_length=16",
        "metrics=[image_stats]"]


def sweep_seconds(extra_env: dict) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"KREA_SWEEPS_PROGRESS": "0", "PYTHONPATH": str(REPO), **extra_env})
    with tempfile.TemporaryDirectory() as cwd:
        env["HOME"] = cwd  # no ~/.netrc key
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "run.py"), *ARGS], cwd=cwd, env=env, check=True,
                       capture_output=True)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts, never answers
    settings = {
        "no key (baseline)": {},
        "fake key, server refuses": {"WANDB_API_KEY": "f" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"},
        "fake key, server silent": {"WANDB_API_KEY": "f" * 40,
                                    "WANDB_BASE_URL": f"http://127.0.0.1:{silent.getsockname()[1]}"},
    }
    results = {}
    for name, env in settings.items():
        times = [sweep_seconds(env) for _ in range(args.repeats)]
        results[name] = {"median_s": median(times), "runs_s": times}
        print(f"{name:28s} median {median(times):6.1f} s  runs {[round(t, 1) for t in times]}")
    base = results["no key (baseline)"]["median_s"]
    for name in list(settings)[1:]:
        print(f"{name:28s} costs {results[name]['median_s'] - base:+.1f} s over the baseline")
    write_json({"results": results, "args": ARGS}, args.out, "wandb_offline_node.json")


if __name__ == "__main__":
    main()
