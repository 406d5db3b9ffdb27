"""The job wrapper around `task.execute`: skip finished jobs, record failures, write files, finish the W&B run.

Hydra neither resumes sweeps nor survives a failing job (the basic launcher re-raises and the sweep stops). Here a
job's directory is derived from its result-changing overrides, so a rerun finds `result.json` and skips the job; an
exception is written to `failed.json` and the sweep goes on (unless `fail_fast=true`); `run.py` exits non-zero at the
end with the failed jobs listed.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .plan import Job, plan
from .task import SYNTHETIC_WARNING, execute, versions, write_json_atomic

log = logging.getLogger("krea_sweeps")

FAILED_JOBS: list[str] = []  # jobs that failed in this process (basic launcher); run.py reads it at exit


class Interrupted(BaseException):
    """SIGTERM/SIGINT inside a job: stop cleanly, write no partial result."""


@contextmanager
def interrupt_guard():
    """Turn SIGTERM (SLURM preemption) into `Interrupted` while a job runs; restore the old handler after."""
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def tags_for(job: Job) -> list[str]:
    tags = [f"variant:{job.variant.name}", job.experiment]
    tags += [f"intervention:{i.kind}" for i in job.interventions]
    if job.variant.synthetic:
        tags.append("synthetic")
    return tags


def logged_config(job: Job) -> dict:
    config = OmegaConf.to_container(job.cfg, resolve=True)
    config["job"] = {
        "name": job.name, "dir": str(job.job_dir), "synthetic": job.variant.synthetic,
        "interventions": [i.describe() for i in job.interventions],
        "sampler_resolved": job.sampler.identity(), "prompts": job.prompts,
    }
    return config


def objective_of(job: Job, summary: dict):
    if not job.objective:
        return None
    return summary.get(job.objective)


def run_job(cfg: DictConfig, hydra_cfg: DictConfig | None):
    """Plan, run and record one job. Returns the objective (for Optuna) or None."""
    job = plan(cfg, hydra_cfg)
    result_file, failed_file = job.job_dir / "result.json", job.job_dir / "failed.json"
    if job.multirun and result_file.exists() and not job.force:
        log.info("skip %s: %s exists (force=true reruns it)", job.name, result_file)
        return objective_of(job, json.loads(result_file.read_text()).get("summary", {}))
    for stale in (result_file, failed_file):
        stale.unlink(missing_ok=True)
    if job.variant.synthetic:
        log.warning(SYNTHETIC_WARNING)

    from .tracking import Tracker

    tracker = Tracker(job.wandb)
    config = logged_config(job)
    tracker.start(job_dir=job.job_dir, name=job.name, group=job.group, job_type=job.experiment,
                  tags=tags_for(job), config=config)
    record = {"status": "running", "job": config["job"], "config": config, "synthetic": job.variant.synthetic,
              "versions": versions(), "wandb": tracker.where()}
    t0 = time.perf_counter()
    failed = True
    try:
        with interrupt_guard():
            out = execute(job)
        images = out.pop("_wandb_images")
        record.update(out, status="done")
        record["timings"]["total"] = time.perf_counter() - t0
        write_json_atomic(result_file, record)
        failed = False
        tracker.log_summary(record["summary"])
        tracker.log_table("rows", record["rows"])
        tracker.log_images(images)
    except Interrupted as e:
        log.warning("job %s interrupted (%s): no result written", job.name, e)
        raise
    except Exception as e:
        write_json_atomic(failed_file, {"status": "failed", "job": config["job"], "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()})
        FAILED_JOBS.append(f"{job.name}: {type(e).__name__}: {e}")
        log.error("job %s failed: %s: %s (details in %s)", job.name, type(e).__name__, e, failed_file)
        if job.fail_fast or not job.multirun:
            raise
        return None
    finally:
        tracker.finish(failed=failed)
    where = tracker.where()
    wandb_note = {"disabled": "W&B disabled"}.get(where["mode"], f"W&B {where['mode']} run in {where['dir']}")
    if where.get("sync"):
        wandb_note += f" (upload: {where['sync']})"
    log.info("done %s in %.1fs: %s; %s", job.name, record["timings"]["total"], result_file, wandb_note)
    return objective_of(job, record["summary"])
