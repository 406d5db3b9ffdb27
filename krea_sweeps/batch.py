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
    fingerprint: str = ""  # `task.job_fingerprint` of its job (resume compares it)


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
    from .task import job_fingerprint

    grid = read_grid(cfg)
    typed = {axis: typed_values(axis, values) for axis, values in grid}
    base_node = OmegaConf.to_container(cfg.intervention, resolve=True) if cfg.get("intervention") else {}
    others = OmegaConf.to_container(cfg.interventions, resolve=True) if cfg.get("interventions") else []
    ictx = InterventionContext(num_steps=job.sampler.steps, guidance=job.sampler.guidance,
                               **_widths(job.variant))
    task_overrides = [str(o) for o in hydra_cfg.overrides.task]
    sweep_dir = job.sweep_dir or job.job_dir.parent
    identity = job.variant.identity()  # the configs share the variant
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
        configs.append(BatchConfig(strings, overrides, planned, node, job_fingerprint(planned, identity)))
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
    timings = Timings()  # where the batch's time went (batch.json): a phase sums over its configs
    with timings.phase("plan"):
        configs = plan_configs(job, cfg, hydra_cfg)
    base_config = OmegaConf.to_container(cfg, resolve=True)
    base_config.setdefault("sweep", {})["batch_grid"] = None

    from .tracking import Tracker

    axes = list(configs[0].values) if configs else []
    tracker = Tracker(job.wandb, session.wandb_server)
    with timings.phase("wandb"):
        tracker.start(job_dir=job.job_dir, name=f"batch {','.join(a.split('.')[-1] for a in axes)} · {job.name}",
                      group=job.group, job_type=job.experiment, tags=tags_for(job) + ["batched"],
                      config={**base_config, "batch": {"axes": axes, "configs": len(configs)}})
    table, statuses, shared = [], {}, {}
    failed = True
    try:
        with interrupt_guard():
            shared = prepare(job, timings, session)
            for chunk in chunked(configs, STACK):
                todo = []
                with timings.phase("resume"):
                    for config in chunk:
                        previous = done_before(config)
                        if previous is not None:
                            statuses[config.job.name] = "skipped"
                            table.append(table_row(config, "skipped", previous))
                        else:
                            todo.append((config, config_context(config, shared)))
                try:
                    with timings.phase("trace"):
                        share_upstream([ctx for _, ctx in todo], shared)
                except Exception as e:  # each config then traces on its own, and fails (or not) in its own record
                    log.warning("batch: the shared upstream failed (%s: %s); tracing each config alone",
                                type(e).__name__, e)
                for config, ctx in todo:
                    status, summary = run_config(config, ctx, shared, base_config, tracker, timings)
                    statuses[config.job.name] = status
                    table.append(table_row(config, status, summary))
        failed = False
        elapsed = time.perf_counter() - t0
        varying, same = split_constant_columns(table, keep=["job", "status", *axes])
        with timings.phase("wandb"):
            tracker.log_summary({"batch/configs": len(configs), "batch/configs_per_s": len(configs) / elapsed,
                                 "batch/failed": sum(s == "failed" for s in statuses.values()),
                                 **{f"shared/{k}": v for k, v in same.items()}})
            tracker.log_table("configs", varying)
    finally:
        with timings.phase("wandb"):
            tracker.finish(failed=failed)
        from .files import sync_all

        with timings.phase("sync"):
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


STACK = 64  # projector-site configs whose refiners run as one batch (`metrics.trace.projector_edit_traces`)


def chunked(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def table_row(config: BatchConfig, status: str, summary: dict) -> dict:
    return {"job": config.job.name, "status": status, **config.values,
            **{k: v for k, v in summary.items() if isinstance(v, (int, float, bool, str))}}


def split_constant_columns(rows: list[dict], keep: list[str]) -> tuple[list[dict], dict]:
    """The table's rows without the columns that hold one value in every row (a summary the edit cannot move, e.g.
    the layerwise attention under projector edits), and those values: W&B types and serialises a table cell by cell,
    so a column of thousands of equal values costs as much as a varying one and says nothing a summary cannot."""
    columns = {k for r in rows for k in r}
    same = {k: rows[0][k] for k in sorted(columns - set(keep))
            if all(k in r and r[k] == rows[0][k] for r in rows)}
    return [{k: v for k, v in r.items() if k not in same} for r in rows], same


def done_before(config: BatchConfig) -> dict | None:
    """The summary of this config's earlier result when it was made from the same inputs (resume), else None."""
    job = config.job
    result_file = job.job_dir / "result.json"
    if job.force or not result_file.exists():
        return None
    try:
        previous = json.loads(result_file.read_text())
    except ValueError:
        return None
    return previous.get("summary", {}) if previous.get("fingerprint") == config.fingerprint else None


def config_context(config: BatchConfig, shared: dict):
    """The config's JobContext on the batch's model and encodings; its stock-trace key is the batch's (the configs
    differ in `intervention.*` only: same variant, prompts and length), not recomputed from the variant's files."""
    from .metrics.trace import stock_key
    from .task import JobContext, Timings

    ctx = JobContext(job=config.job, model=shared["model"], session=shared["session"], encoded=shared["encoded"],
                     timings=Timings())
    if "stock_key" not in shared:
        shared["stock_key"] = stock_key(ctx)
    ctx.cache["stock_key"] = shared["stock_key"]
    return ctx


def run_config(config: BatchConfig, ctx, shared: dict, base_config: dict, tracker, timings) -> tuple[str, dict]:
    """One config (not done before): measure and write what a job of its own would have written (result.json
    last). A failure is recorded in its failed.json and the batch goes on."""
    import torch

    from .files import clear_job_folder
    from .process import FailFast
    from .task import measure, versions, write_json_atomic

    job = config.job
    result_file, failed_file = job.job_dir / "result.json", job.job_dir / "failed.json"
    with timings.phase("files"):
        clear_job_folder(job.job_dir)  # as a job of its own: a rerun starts empty
        write_overrides(job.job_dir, config.overrides)
    # the batch's config with this config's intervention: a shallow copy (written out at once, never mutated)
    record_config = {**base_config, "intervention": config.node}
    described = [i.describe() for i in job.interventions]
    job_info = {"name": job.name, "dir": str(job.job_dir), "synthetic": job.variant.synthetic,
                "interventions": described, "sampler_resolved": job.sampler.identity(), "prompts": job.prompts,
                "batched_in": shared["batch_job"]}
    record_config["job"] = job_info
    session = shared["session"]
    t0 = time.perf_counter()
    try:
        with ctx.timings.phase("metrics"), timings.phase("metrics"), torch.no_grad():
            summary, rows, _ = measure(ctx, shared.setdefault("reuse", {}))
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
              "fingerprint": config.fingerprint, "versions": versions(), "wandb": tracker.where(),
              "summary": summary, "rows": rows, "images": [], "timings": {**ctx.timings,
                                                                         "total": time.perf_counter() - t0},
              "compiled_blocks": None, "interventions": described}
    with timings.phase("files"):  # synced with the batch's other files (run_batch); one line: the same JSON, ~5× cheaper
        write_json_atomic(result_file, record, durable=False, indent=None)
    return "done", summary


def share_upstream(ctxs: list, shared: dict) -> None:
    """Configs that edit the projector only get their text-path traces from the batch's shared stock upstream: the
    layerwise blocks run once per prompt for the whole batch, the refiners once per prompt for each chunk of
    configs (`metrics.trace.projector_edit_traces`: bit-identical to each config's own pass)."""
    from .metrics.trace import edits_projector_only, projector_edit_traces, projector_upstream, requested_parts

    sharing = [ctx for ctx in ctxs if not ctx.job.is_stock and edits_projector_only(ctx.job)
               and requested_parts(ctx) <= {"fusion_attention", "normed"}]
    for parts in {requested_parts(ctx) for ctx in sharing}:
        group = [ctx for ctx in sharing if requested_parts(ctx) == parts]
        key = ("projector_upstream", parts)
        if key not in shared:
            shared[key] = projector_upstream(group[0], parts)
        for ctx, trace in zip(group, projector_edit_traces(group, shared[key], parts)):
            ctx.cache[("text_trace", True)] = trace
        shared["shared_upstream"] = shared.get("shared_upstream", 0) + len(group)


def write_overrides(job_dir: Path, overrides: list[str]) -> None:
    """`.hydra/overrides.yaml` as Hydra writes it for a job: `collect` reads a sweep's axes from it. Written in
    place, not through a temporary: the config's `result.json`, written after it atomically, is what marks it done
    (a config without one is rerun from an empty folder)."""
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when built with it: the same bytes, 6× faster
    job_dir.mkdir(exist_ok=True)  # the sweep folder exists: no `parents=True` (a failed mkdir and a retry each time)
    (job_dir / ".hydra").mkdir(exist_ok=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.dump(overrides, Dumper=dumper, default_flow_style=False))
