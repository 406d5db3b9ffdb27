"""Batched conditioning sweeps: one job evaluates a whole grid of `intervention.*` values on the text path.

    python run.py -m intervention=solo intervention.slot='range(0,12)' intervention.strength=0,0.5,1 \
        metrics='[projector,cond_shift]' sweep.batch_axes='[intervention.slot,intervention.strength]'

A conditioning-only config costs milliseconds of text-path work; as a job of its own it also pays a Hydra composition,
a W&B run and its files. `sweeps.PlannedSweeper` takes the batch axes out of Hydra's grid and hands them to one job
per combination of the other axes (`sweep.batch_grid`); that job plans every config before any model load, encodes
the prompts and traces the stock model once, then runs each config's metrics in turn. Each config still gets the
folder, `result.json` (same summaries, rows and fingerprint), `.hydra/overrides.yaml` and arrays that a job of its
own would have written — so `collect`, resume and a later unbatched rerun see no difference — and one row in the
batch job's W&B run (table `configs`). The batch job's own folder starts with `_` and holds `batch.json`.

Applies when the job generates no images (conditioning-only metrics) and the axes are fields of the `intervention`
group; otherwise the sweeper falls back to one job per config.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, require
from .plan import BATCH_GRID_KEY, Job, job_slug

log = logging.getLogger("krea_sweeps")


@dataclass
class BatchConfig:
    """One config of the grid: its axis values, its overrides (as Hydra would have given its own job), its plan."""

    values: dict
    overrides: list[str]
    job: Job
    node: dict  # its `intervention` config, resolved (what its result.json records)


def read_grid(cfg: DictConfig) -> list[tuple[str, list[str]]]:
    grid = json.loads(str(OmegaConf.select(cfg, BATCH_GRID_KEY)))
    return [(str(axis), [str(v) for v in values]) for axis, values in grid]


def typed_values(axis: str, values: list[str]) -> list:
    """Each override string as the value Hydra would set (`0.5` → 0.5, `null` → None, `[1,2]` → [1, 2])."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for v in values:
        value = parser.parse_override(f"{axis}={v}").value()
        out.append(OmegaConf.to_container(OmegaConf.create({"v": value}))["v"])
    return out


def config_overrides(task_overrides: list[str], values: dict[str, str]) -> list[str]:
    """The overrides a job of this config alone would have: the batch job's, without `sweep.*`, plus the axes'."""
    kept = [o for o in task_overrides
            if not o.lstrip("+~").startswith("sweep.") and o.split("=", 1)[0].lstrip("+~") not in values]
    return kept + [f"{axis}={value}" for axis, value in values.items()]


def override_dirname(overrides: list[str], hydra_cfg: DictConfig) -> str:
    """Hydra's `hydra.job.override_dirname` for `overrides` (config_loader_impl.get_overrides_dirname)."""
    conf = hydra_cfg.job.config.override_dirname
    exclude = set(conf.exclude_keys or [])
    lines = sorted(o for o in overrides if o.split("=", 1)[0] not in exclude)
    return conf.item_sep.join(lines).replace("=", conf.kv_sep)


def plan_configs(job: Job, cfg: DictConfig, hydra_cfg: DictConfig) -> list[BatchConfig]:
    """Every config of the grid, planned and validated (one-line errors, before any model load)."""
    from .interventions import InterventionContext, validate_all
    from .plan import _widths, effective_interventions

    grid = read_grid(cfg)
    typed = {axis: typed_values(axis, values) for axis, values in grid}
    base_node = OmegaConf.to_container(cfg.intervention, resolve=True) if cfg.get("intervention") else {}
    others = OmegaConf.to_container(cfg.interventions, resolve=True) if cfg.get("interventions") else []
    ictx = InterventionContext(num_steps=job.sampler.steps, guidance=job.sampler.guidance,
                               **_widths(job.variant))
    task_overrides = [str(o) for o in hydra_cfg.overrides.task]
    sweep_dir = job.sweep_dir or job.job_dir.parent
    configs = []
    axes = [axis for axis, _ in grid]
    for combo in itertools.product(*(range(len(values)) for _, values in grid)):
        strings = {axis: values[i] for (axis, values), i in zip(grid, combo)}
        node = dict(base_node)
        for axis, i in zip(axes, combo):
            node[axis.split(".", 1)[1]] = typed[axis][i]
        where = " ".join(f"{k}={v}" for k, v in strings.items())
        try:
            interventions = (built(node) if not others and configs else None) \
                or effective_interventions({"intervention": node, "interventions": others})
            validate_all(interventions, ictx)
        except ConfigError as e:
            raise ConfigError(e.key, f"{e.problem} (batched config: {where})", e.fix) from None
        overrides = config_overrides(task_overrides, strings)
        name = job_slug(override_dirname(overrides, hydra_cfg))
        planned = replace(job, interventions=interventions, job_dir=sweep_dir / name, name=name)
        configs.append(BatchConfig(strings, overrides, planned, node))
    return configs


def built(node: dict) -> list | None:
    """The config's intervention made by calling its class directly (Hydra's `instantiate` costs ~10 ms a call and
    the first config of the grid went through it already), or None to take the full path — which also words any
    error — when the direct call fails."""
    from hydra.utils import get_class

    try:
        obj = get_class(node["_target_"])(**{k: v for k, v in node.items() if not k.startswith("_")})
    except Exception:
        return None
    obj.config_key = "intervention"
    return [obj]


def run_batch(job: Job, cfg: DictConfig, hydra_cfg: DictConfig, session):
    """Run the batch job: plan every config, then encode, trace and measure each on the shared text path."""
    from .process import interrupt_guard
    from .tracking import tags_for
    from .task import Timings

    require(not job.generates, BATCH_GRID_KEY, "batched configs cannot generate images (metrics: "
            f"{', '.join(m.name for m in job.metrics)})", "drop sweep.batch_axes, or use conditioning-only metrics")
    t0 = time.perf_counter()
    configs = plan_configs(job, cfg, hydra_cfg)
    base_config = OmegaConf.to_container(cfg, resolve=True)
    base_config.setdefault("sweep", {})["batch_grid"] = None
    timings = Timings()

    from .tracking import Tracker

    axes = list(configs[0].values) if configs else []
    tracker = Tracker(job.wandb, session.wandb_server)
    tracker.start(job_dir=job.job_dir, name=f"batch {','.join(a.split('.')[-1] for a in axes)} · {job.name}",
                  group=job.group, job_type=job.experiment, tags=tags_for(job) + ["batched"],
                  config={**base_config, "batch": {"axes": axes, "configs": len(configs)}})
    table, statuses, shared = [], {}, {}
    failed = True
    try:
        with interrupt_guard():
            shared = prepare(job, timings, session)
            for config in configs:
                status, summary = run_config(config, shared, base_config, tracker)
                statuses[config.job.name] = status
                table.append({"job": config.job.name, "status": status, **config.values,
                              **{k: v for k, v in summary.items() if isinstance(v, (int, float, bool, str))}})
        failed = False
        elapsed = time.perf_counter() - t0
        tracker.log_summary({"batch/configs": len(configs), "batch/failed": sum(s == "failed" for s in statuses.values()),
                             "batch/configs_per_s": len(configs) / elapsed if elapsed > 0 else 0.0})
        tracker.log_table("configs", table)
    finally:
        tracker.finish(failed=failed)
        from .files import sync_all

        sync_all()  # every config's files at once: one sync, not four fsyncs a config
    from .task import write_json_atomic


    write_json_atomic(job.job_dir / "batch.json", {
        "axes": axes, "configs": [{"dir": c.job.name, "values": c.values, "status": statuses.get(c.job.name)}
                                  for c in configs],
        "shared_upstream": shared.get("shared_upstream", 0),
        "timings": {**timings, "total": time.perf_counter() - t0}, "wandb": tracker.where()})
    log.info("batch %s: %d configs in %.2fs (%s)", job.name, len(configs), time.perf_counter() - t0,
             ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return None


def prepare(job: Job, timings, session) -> dict:
    """What every config shares: the model's text path and the encoded prompts (the stock trace is memoised in
    `metrics.trace` per process)."""
    from .models import LoadedModel, job_memory
    from .task import JobContext

    model = LoadedModel(job.variant, session.models)
    session.models.begin_job(job_memory(job.variant, job.sampler, job.needs, len(job.seeds)).cache_budget())
    ctx = JobContext(job=job, model=model, session=session)
    with timings.phase("encode"):
        encoded = ctx.encode(job.prompts)
    with timings.phase("load"):
        model.text_path  # noqa: B018 - load the slice now so its time is booked as load
    return {"model": model, "encoded": encoded, "timings": timings, "batch_job": job.name, "session": session}


def run_config(config: BatchConfig, shared: dict, base_config: dict, tracker) -> tuple[str, dict]:
    """One config: skip it when its result is there with the same inputs; else measure and write what a job of its
    own would have written (result.json last). A failure is recorded in its failed.json and the batch goes on."""
    import torch

    from .files import clear_job_folder
    from .process import FailFast
    from .task import JobContext, Timings, job_fingerprint, measure, versions, write_json_atomic

    job = config.job
    result_file, failed_file = job.job_dir / "result.json", job.job_dir / "failed.json"
    fingerprint = job_fingerprint(job)
    if result_file.exists() and not job.force:
        try:
            previous = json.loads(result_file.read_text())
        except ValueError:
            previous = {}
        if previous.get("fingerprint") == fingerprint:
            return "skipped", previous.get("summary", {})
    clear_job_folder(job.job_dir)  # as a job of its own: a rerun starts empty
    write_overrides(job.job_dir, config.overrides)
    record_config = copy.deepcopy(base_config)
    record_config["intervention"] = copy.deepcopy(config.node)
    described = [i.describe() for i in job.interventions]
    job_info = {"name": job.name, "dir": str(job.job_dir), "synthetic": job.variant.synthetic,
                "interventions": described, "sampler_resolved": job.sampler.identity(), "prompts": job.prompts,
                "batched_in": shared["batch_job"]}
    record_config["job"] = job_info
    session = shared["session"]
    ctx = JobContext(job=job, model=shared["model"], session=session, encoded=shared["encoded"], timings=Timings())
    t0 = time.perf_counter()
    try:
        with ctx.timings.phase("metrics"), torch.no_grad():
            share_upstream(ctx, shared)
            summary, rows, _ = measure(ctx)
    except Exception as e:
        write_json_atomic(failed_file, {"status": "failed", "job": job_info, "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc(), "config": record_config,
                                        "versions": versions()})
        session.failed_jobs.append(f"{job.name}: {type(e).__name__}: {e}")
        log.error("config %s failed: %s: %s (details in %s)", job.name, type(e).__name__, e, failed_file)
        if job.fail_fast:
            raise FailFast(session.failed_jobs[-1]) from e
        return "failed", {}
    record = {"status": "done", "job": job_info, "config": record_config, "synthetic": job.variant.synthetic,
              "fingerprint": fingerprint, "versions": versions(), "wandb": tracker.where(),
              "summary": summary, "rows": rows, "images": [], "timings": {**ctx.timings,
                                                                         "total": time.perf_counter() - t0},
              "compiled_blocks": None, "interventions": [i.describe() for i in job.interventions]}
    write_json_atomic(result_file, record, durable=False)  # synced with the batch's other files (run_batch)
    return "done", summary


def share_upstream(ctx, shared: dict) -> None:
    """A config that edits the projector only gets its text-path trace from the batch's shared stock upstream (the
    layerwise blocks run once per prompt, not once per config; bit-identical: `metrics.trace`)."""
    from .metrics.trace import edits_projector_only, projector_edit_trace, projector_upstream, requested_parts

    parts = requested_parts(ctx)
    if ctx.job.is_stock or not edits_projector_only(ctx.job) or not parts <= {"fusion_attention", "normed"}:
        return
    key = ("projector_upstream", parts)
    if key not in shared:
        shared[key] = projector_upstream(ctx, parts)
    ctx.cache[("text_trace", True)] = projector_edit_trace(ctx, shared[key], parts)
    shared["shared_upstream"] = shared.get("shared_upstream", 0) + 1


def write_overrides(job_dir: Path, overrides: list[str]) -> None:
    """`.hydra/overrides.yaml` as Hydra writes it for a job: `collect` reads a sweep's axes from it."""
    import yaml

    from .files import atomic_write

    with atomic_write(job_dir / ".hydra" / "overrides.yaml", durable=False) as tmp:
        tmp.write_text(yaml.safe_dump(overrides, default_flow_style=False))
