"""The job wrapper around `task.execute`: skip finished jobs, record failures, write files, finish the W&B run.

Hydra neither resumes sweeps nor survives a failing job (the basic launcher re-raises and the sweep stops). Here a
job's directory is derived from its result-changing overrides, so a rerun finds `result.json` and skips the job when
the inputs it recorded (`fingerprint`: prompts' text, resolved files, seeds, …) are still the same; an
exception is written to `failed.json` and the sweep goes on (unless `fail_fast=true`); `run.py` exits non-zero at the
end with the failed jobs listed (jobs in other processes are found on disk by `sweeps.SweepGuard`).

SIGTERM (SLURM preemption, `scancel`) and SIGINT (Ctrl-C) become `Interrupted`: the job writes no result, its W&B run is
marked preempting and finished, and the rerun (or submitit's requeue after SIGUSR2) runs it again. submitit's own
SIGUSR2 handler exits with `SystemExit`, which is treated the same way.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .files import clear_job_folder
from .plan import Job, plan
from .process import FailFast, Interrupted, interrupt_guard  # noqa: F401 - run.py catches them from here
from .session import Session, current_session
from .task import execute, intervention_label, job_fingerprint, versions, write_json_atomic
from .tracking import tags_for

log = logging.getLogger("krea_sweeps")

def write_hydra_record(job_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig | None) -> None:
    """What Hydra would have written to `.hydra/` before the task (`hydra.output_subdir: null` stops it, so a run
    rejected at planning cannot overwrite a finished job's record): written once the job is planned."""
    from .files import atomic_write, config_yaml

    files = {"config.yaml": cfg}
    if hydra_cfg is not None:
        files["hydra.yaml"] = OmegaConf.create({"hydra": hydra_cfg})
        files["overrides.yaml"] = OmegaConf.select(hydra_cfg, "overrides.task", default=None) or []
    for name, node in files.items():
        with atomic_write(job_dir / ".hydra" / name) as tmp:
            tmp.write_text(config_yaml(node if OmegaConf.is_config(node) else OmegaConf.create(node)), encoding="utf-8")


ABORTED_WANDB = "wandb-aborted"  # outside `<job>/wandb/`, so `wandb sync outputs/<name>/*/wandb/offline-run-*` skips it


def set_aside_wandb_runs(job_dir: Path) -> None:
    """Move the W&B run(s) of an interrupted job out of `wandb/` (and drop W&B's `latest-run` link to them)."""
    wandb_dir = job_dir / "wandb"
    if not wandb_dir.is_dir():
        return
    for entry in wandb_dir.iterdir():
        if entry.is_symlink():
            entry.unlink()
        elif entry.is_dir() and "run-" in entry.name:
            target = job_dir / ABORTED_WANDB / entry.name
            target.parent.mkdir(exist_ok=True)
            entry.replace(target)


def run_name(job: Job) -> str:
    """What ran, readable in W&B's run list: the intervention (kind, site, slot, layer …), then the job's overrides."""
    label = intervention_label(job)
    return job.name if label == "none" else f"{label} · {job.name}"


def logged_config(job: Job) -> dict:
    config = OmegaConf.to_container(job.cfg, resolve=True)
    config["job"] = {
        "name": job.name, "dir": str(job.job_dir), "synthetic": job.variant.synthetic,
        "interventions": [i.describe() for i in job.interventions],
        "sampler_resolved": job.sampler.identity(), "prompts": job.prompts,
    }
    return config


COMPARED_FIELDS = ("site", "slot", "layer", "strength")  # the intervention fields every kind reports under one name


def job_type_of(job: Job) -> str:
    """W&B's job_type: what kind of edit ran (`solo`, `rebalance`, `solo+knockout`) or `stock` — the first thing one
    groups a sweep's runs by. The group already names the sweep."""
    if job.is_stock:
        return "stock"
    return "+".join(i.kind for i in job.interventions if not i.is_identity)


def wandb_config(config: dict, job: Job) -> dict:
    """The run's config for W&B: the resolved config plus keys with the same name and meaning in every job, so
    W&B's group-by and filters work across kinds — `variant`, `experiment`, `synthetic` and `intervention.kind`,
    `.site`, `.slot`, `.layer`, `.strength` (None where a kind has no such field) as the job applied them."""
    out = dict(config)
    applied = [i.describe() for i in job.interventions if not i.is_identity]
    intervention = dict(out.get("intervention") or {})
    intervention["kind"] = job_type_of(job)
    for key in COMPARED_FIELDS:
        intervention[key] = next((d[key] for d in applied if d.get(key) is not None), None)
    out["intervention"] = intervention
    out.update(variant=job.variant.name, experiment=job.experiment, synthetic=job.variant.synthetic)
    return out


def without_job(config: dict) -> dict:
    """The config as composed, for the record: `job` (prompts' text included) is stored beside it, once."""
    return {k: v for k, v in config.items() if k != "job"}


def objective_of(job: Job, summary: dict):
    """The value a Hydra sweeper (Optuna) optimises: `summary[objective]`, or a one-line error naming the real keys."""
    if not job.objective:
        return None
    if job.objective not in summary:
        raise ConfigError("objective", f"{job.objective!r} is not among the job's results",
                          f"use one of: {', '.join(sorted(summary)) or '(no summaries)'}")
    return float(summary[job.objective])


def use_torch_threads(job: Job) -> None:
    from .models import resolve_device
    from .process import apply_torch_threads, torch_threads_for

    device = resolve_device(job.variant.device)
    apply_torch_threads(torch_threads_for(job.torch_threads, job.variant.synthetic, device.type))


def run_job(cfg: DictConfig, hydra_cfg: DictConfig | None, session: Session | None = None):
    """Plan, run and record one job with `session`'s caches (default: this process's session, shared by the jobs a
    launcher runs here). Returns the objective (for Optuna) or None."""
    from .models import check_memory
    from .sweeps import check_objective

    session = session if session is not None else current_session()
    job = plan(cfg, hydra_cfg)
    check_objective(job)
    # Here, in the process that will run the job (a GPU node's, not a SLURM login node's): will it fit the device?
    check_memory(job.variant, job.sampler, job.needs, len(job.seeds))
    use_torch_threads(job)
    if OmegaConf.select(cfg, "sweep.batch_grid", default=None):
        from .batch import run_batch

        return run_batch(job, cfg, hydra_cfg, session)
    result_file, failed_file = job.job_dir / "result.json", job.job_dir / "failed.json"
    fingerprint = job_fingerprint(job)
    if job.multirun and result_file.exists() and not job.force:
        try:
            previous = json.loads(result_file.read_text())
        except ValueError:  # damaged by hand or by a disk fault (ours are written atomically): not a result
            previous = None
            log.warning("rerun %s: %s is not valid JSON", job.name, result_file)
        if previous is not None and previous.get("fingerprint") == fingerprint:
            log.info("skip %s: %s exists (force=true reruns it)", job.name, result_file)
            return objective_of(job, previous.get("summary", {}))
        if previous is not None:
            log.info("rerun %s: its inputs changed since %s was written (prompts, model files, seeds, sampler, "
                     "interventions or metrics)", job.name, result_file)
    session.jobs_started += 1
    clear_job_folder(job.job_dir)  # a rerun starts empty: no stale arrays, images, figures or W&B runs
    write_hydra_record(job.job_dir, cfg, hydra_cfg)
    if job.variant.synthetic and session.warn_once("synthetic"):  # once per process, not once per job
        log.warning(job.variant.synthetic_weights.warning)

    from .tracking import Tracker

    config = logged_config(job)
    record = {"status": "running", "job": config["job"], "config": without_job(config),
              "synthetic": job.variant.synthetic,
              "synthetic_weights": job.variant.synthetic_weights.kind if job.variant.synthetic else None,
              "fingerprint": fingerprint, "versions": versions()}
    tracker = None
    t0 = time.perf_counter()
    failed = True
    try:
        with interrupt_guard():  # Ctrl-C at any moment, W&B's start and finish included, is one line
            try:
                tracker = Tracker(job.wandb, session.wandb_server)
                tracker.start(job_dir=job.job_dir, name=run_name(job), group=job.group, job_type=job_type_of(job),
                              tags=tags_for(job), config=wandb_config(config, job))
                record["wandb"] = tracker.where()
                out = execute(job, session)
                record.update(out.record, status="done", process=session.process_record())
                record["timings"]["total"] = time.perf_counter() - t0
                if job.objective:
                    value = objective_of(job, record["summary"])
                    record["objective"] = {"key": job.objective, "value": value}
                    record["summary"]["objective"] = value
                write_json_atomic(result_file, record)
                failed = False
                tracker.define_metrics(record["summary"], objective=job.objective, direction=_direction(hydra_cfg))
                tracker.log_summary({**record["summary"], **per_prompt_summary(record["rows"], record["summary"])})
                tracker.log_table("rows", record["rows"])
                tracker.log_images(out.media)
            except (Interrupted, KeyboardInterrupt, SystemExit):
                if tracker is not None:
                    tracker.mark_preempting()
                raise
            finally:
                if tracker is not None:
                    tracker.finish(failed=failed)
    except (Interrupted, KeyboardInterrupt, SystemExit) as e:
        set_aside_wandb_runs(job.job_dir)  # an aborted W&B run never sits where `wandb sync …/offline-run-*` looks
        if not result_file.exists():
            log.warning("job %s interrupted (%s): no result written; rerun the sweep to run it", job.name,
                        getattr(e, "signame", type(e).__name__))
        raise
    except Exception as e:  # a ConfigError too: after planning, any error fails this job only
        write_json_atomic(failed_file, {"status": "failed", "job": config["job"], "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc(), "config": without_job(config),
                                        "versions": versions()})
        session.failed_jobs.append(f"{job.name}: {type(e).__name__}: {e}")
        log.error("job %s failed: %s: %s (details in %s)", job.name, type(e).__name__, e, failed_file)
        if not job.multirun:
            raise
        if job.fail_fast:
            raise FailFast(session.failed_jobs[-1]) from e
        return None
    where = tracker.where()
    wandb_note = {"disabled": "W&B disabled"}.get(where["mode"], f"W&B {where['mode']} run in {where['dir']}")
    if where.get("sync"):
        wandb_note += f" (upload: {where['sync']})"
    log.info("done %s in %.1fs: %s; %s", job.name, record["timings"]["total"], result_file, wandb_note)
    return objective_of(job, record["summary"])


def per_prompt_summary(rows: list[dict], summary: dict) -> dict[str, float]:
    """Each summary key's value per prompt (mean over the prompt's rows, i.e. its seeds), as W&B summary keys
    `by_prompt/pNN/<metric>/<stat>`: what lets a report group a metric's bars by prompt. Only keys the job also
    summarises, so the breakdown is of something the sweep reports."""
    from .report import per_prompt_key

    sums: dict[str, list[float]] = {}
    for row in rows:
        if row.get("prompt_idx") is None:
            continue
        for stat, value in row.items():
            key = f"{row.get('metric')}/{stat}"
            if key in summary and isinstance(value, (int, float)) and not isinstance(value, bool):
                sums.setdefault(per_prompt_key(key, int(row["prompt_idx"])), []).append(float(value))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _direction(hydra_cfg: DictConfig | None) -> str | None:
    """The sweeper's optimisation direction (Optuna: maximize / minimize), if it has one."""
    direction = OmegaConf.select(hydra_cfg, "sweeper.direction", default=None) if hydra_cfg is not None else None
    if isinstance(direction, (list, tuple)) or OmegaConf.is_list(direction):
        direction = direction[0] if len(direction) else None
    return str(direction).lower() if direction is not None else None
