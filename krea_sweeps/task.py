"""Execute one planned job: encode → (baseline, generate) → metrics → files → W&B.

The order matters for faithfulness and speed: prompts are encoded once (cache), stock images once per
(variant, prompt, seed, sampler) and shared by every job of the sweep, interventions are attached only around the
intervened work and always removed, and `result.json` is written last and atomically — it is the job's "done" mark.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
from pathlib import Path
from typing import NamedTuple

import numpy as np
from omegaconf import OmegaConf

# The context and the services metrics use live in `context` (below `metrics/`); named here too for the callers.
from .context import (JobContext, Timings, baseline_file, baseline_folder, baseline_key,  # noqa: F401
                      cached_baseline, generate_images, recorders, stock_images_of, store_baseline)
from .files import atomic_write
from .plan import Job, intervention_label  # noqa: F401
from .session import Session

log = logging.getLogger("krea_sweeps")

SYNTHETIC_WARNING = ("synthetic Krea 2 (tiny, random weights; real tokenizer and projector values): its numbers test "
                     "the tool, they are not Krea 2 findings")


# --------------------------------------------------------------------------------------------------- file helpers
def write_json_atomic(path: Path, data: dict, durable: bool = True, indent: int | None = 2) -> None:
    """`indent=None`: one line through json's C encoder (the indented form is pure Python, ~5× slower: a batch
    writing thousands of results uses it; readers parse either)."""
    with atomic_write(path, durable) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_write(path) as tmp:
        Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(tmp)


@functools.lru_cache(maxsize=1)
def _versions() -> tuple:
    """Package metadata lookups cost ~5 ms each: once per process."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "hydra-core", "wandb", "krea_sweeps"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return tuple(out.items())


def versions() -> dict:
    return dict(_versions())


# ----------------------------------------------------------------------------------------------- baseline cache
def job_fingerprint(job: Job, variant_identity: dict | None = None) -> str:
    """A hash of everything a job's result depends on — the variant as resolved (files, device, dtype, LoRA), the
    prompts' text, the seeds, the sampler, the interventions as data, the metric configs. The job folder is named
    from command-line overrides only, so a changed prompt file or environment variable keeps the folder: resume
    compares this instead of trusting that `result.json` exists. `variant_identity`: `job.variant.identity()` when
    the caller has it already (a batch's configs share the variant)."""
    metrics = OmegaConf.to_container(job.cfg.get("metrics") or {}, resolve=True)
    blob = json.dumps({"variant": variant_identity or job.variant.identity(), "prompts": job.prompts, "seeds": job.seeds,
                       "sampler": job.sampler.identity(), "interventions": [i.describe() for i in job.interventions],
                       "metrics": metrics}, sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------------- job context
# ------------------------------------------------------------------------------------------------------ execute
def fit_step(ctx: JobContext) -> None:
    """The explicit fit before the run: what the interventions learn from reference prompts (an identity setting
    learns too when it has something to report, e.g. steer's pair consistency at strength 0)."""
    from .interventions import Intervention

    if any(type(i).learn is not Intervention.learn for i in ctx.job.interventions):
        with ctx.timings.phase("fit"):
            ctx.fit_interventions()


def produce_images(ctx: JobContext) -> None:
    from .sampler import runs_compiled

    job = ctx.job
    keys = [(p, s) for p in range(len(job.prompts)) for s in job.seeds]
    with ctx.timings.phase("load"):
        pipe = ctx.model.pipeline(text_encoder=None)  # fed embeddings: the encoder is loaded only on an encode miss
    ctx.negative = ctx.encode([job.sampler.negative_prompt])
    ctx.compiled_blocks = runs_compiled(job.sampler, pipe.transformer, ctx.session)
    ctx.baseline_keys = {f"p{p:02d}_s{s}": baseline_key(job, job.prompts[p], s, ctx.compiled_blocks)
                         for p, s in keys}
    if "baseline" in job.needs or job.is_stock:
        missing = []
        for p, s in keys:
            image = cached_baseline(ctx.session, job, ctx.baseline_keys[f"p{p:02d}_s{s}"])
            if image is None:
                missing.append((p, s))
            else:
                ctx.baseline_images[(p, s)] = image
        if missing:
            with ctx.timings.phase("baseline"):
                fresh = generate_images(ctx, pipe, False, missing, "stock images")
            ctx.session.baseline_generations += len(fresh)
            for (p, s), image in fresh.items():
                store_baseline(ctx.session, job, ctx.baseline_keys[f"p{p:02d}_s{s}"], image)
            ctx.baseline_images.update(fresh)
    fit_step(ctx)  # after the load: references are computed on the very text modules the generation uses
    if job.is_stock:
        ctx.images = dict(ctx.baseline_images)
    else:
        with ctx.timings.phase("generate"):
            ctx.images = generate_images(ctx, pipe, True, keys, f"{job.name[:40]}")
    for (p, s), image in ctx.images.items():
        save_png(job.job_dir / "images" / f"p{p:02d}_s{s}.png", image)


def report_truncation(ctx: JobContext) -> list[int]:
    """Per prompt, the tokens that did not fit `sampler.max_sequence_length`; one warning line when any were cut.

    Only prompts whose encoding fills the limit can have been cut (a shorter one has valid tokens to spare), so the
    tokenizer is asked about those alone: a job whose prompts all hit the encode cache loads no tokenizer."""
    from .prompts import truncated_tokens

    limit = ctx.job.sampler.max_sequence_length
    prompts = ctx.job.prompts
    full = [p for p, valid in enumerate(ctx.encoded.mask.sum(dim=1).tolist()) if valid >= limit]
    cut = [0] * len(prompts)
    if full:
        for p, n in zip(full, truncated_tokens(ctx.model.tokenizer, [prompts[p] for p in full], limit)):
            cut[p] = n
    if any(cut):
        which = ", ".join(f"prompt {p}: {n}" for p, n in enumerate(cut) if n)
        log.warning("prompt text cut to sampler.max_sequence_length=%d tokens (%s tokens dropped); raise "
                    "sampler.max_sequence_length to keep it", limit, which)
    return cut


class JobOutput(NamedTuple):
    """What a job produced: its `record` (result.json, not yet written) and its `media` for the tracker (name →
    (HxWx3 image in [0, 1], caption)): images stay out of the record, which holds their file paths."""

    record: dict
    media: dict[str, tuple[np.ndarray, str]]


def execute(job: Job, session: Session) -> JobOutput:
    """Run one planned job with the session's caches: its record (not yet written) and its media for W&B."""
    import torch

    from .models import LoadedModel, job_memory

    model = LoadedModel(job.variant, session.models)
    memory = job_memory(job.variant, job.sampler, job.needs, len(job.seeds))
    session.models.begin_job(memory.cache_budget())
    ctx = JobContext(job=job, model=model, session=session)
    cache = session.encode_cache(ctx.encode_folder)
    hits_before, misses_before = cache.hits, cache.misses  # the cache serves the whole process: count this job's
    with ctx.timings.phase("encode"):
        ctx.encoded = ctx.encode(job.prompts)
        truncated = report_truncation(ctx)
    if "text_path" in job.needs and not job.generates:
        with ctx.timings.phase("load"):
            ctx.model.text_path  # noqa: B018 - load the slice now so its time is booked as load
        fit_step(ctx)
    if job.generates:
        produce_images(ctx)
    with ctx.timings.phase("metrics"), torch.no_grad():
        summary, rows, images = measure(ctx)
    if ctx.images:
        from .metrics.figures import labelled_contact_sheet

        sheet = labelled_contact_sheet(ctx.images, job.prompts, job.seeds, sheet_title(job))
        save_png(job.job_dir / "contact_sheet.png", sheet)
        images["contact_sheet"] = (sheet, f"{job.name}: rows = prompts, cols = seeds {job.seeds}")
        for (p, s), img in ctx.images.items():
            images[f"images/p{p:02d}_s{s}"] = (img, f"{job.prompts[p][:80]} | seed {s} | {intervention_label(job)}")
    ground_truth = getattr(job.prompt_set, "ground_truth", None)  # prompts from the toy world: their scenes
    return JobOutput(record={
        "summary": summary,
        "scenes": ground_truth(job.job_dir / "arrays") if ground_truth else None,
        "rows": rows,
        "images": sorted(str(Path("images") / f"p{p:02d}_s{s}.png") for p, s in ctx.images),
        "timings": dict(ctx.timings),
        "compiled_blocks": ctx.compiled_blocks,
        "baseline_keys": ctx.baseline_keys,
        "interventions": [i.describe() for i in job.interventions],  # the configuration, as planned
        "fitted": [i.fitted() for i in job.interventions],  # what the fit step learned (numbers)
        "truncated_tokens": truncated,
        "encode_cache": {"hits": cache.hits - hits_before, "misses": cache.misses - misses_before},
    }, media=images)


def sheet_title(job: Job) -> str:
    """What a contact sheet shows: the intervention as applied, the variant, and whether it is the synthetic model."""
    label = intervention_label(job)
    what = "stock" if job.is_stock else label
    synthetic = ""
    if job.variant.synthetic:  # the random-weight model draws the same texture for every prompt; the toy draws shapes
        random_weights = job.variant.synthetic_weights.kind == "random"
        synthetic = " (synthetic Krea 2: images look alike by design)" if random_weights else " (toy Krea 2, synthetic)"
    return f"{what} | {job.variant.name}{synthetic}"


def measure(ctx: JobContext, reuse: dict | None = None) -> tuple[dict, list[dict], dict]:
    """Every metric of the job on `ctx`: (summary, rows, figures); arrays and figure PNGs are written to the job dir.

    `reuse` (a batch's, shared by its configs): a metric that reads only what lies upstream of the projector
    (`upstream_of_projector`) gives the same output for every config that edits the projector only, so it is
    computed for the first such config and its arrays are hard-linked from that config's files for the others."""
    job = ctx.job
    summary, rows, images = {}, [], {}
    arrays_dir = job.job_dir / "arrays"
    for metric in job.metrics:
        key = reuse_key(ctx, metric) if reuse is not None else None
        if key is not None and key in reuse:
            out, source = reuse[key]
            link_arrays(source, arrays_dir, metric.name, out.arrays)
        else:
            out = metric.compute(ctx)
            save_arrays(arrays_dir, metric.name, out.arrays)
            if key is not None:
                reuse[key] = (out, arrays_dir)
        summary.update(out.summary)
        for r in out.rows:
            rows.append({"metric": metric.name, **r})
        for name, (figure, _caption) in out.images.items():  # heatmaps, bars: also on disk, not only in W&B
            save_png(job.job_dir / "figures" / f"{name.replace('/', '_')}.png", figure)
        images.update(out.images)
    for intervention in job.interventions:  # what the fit step learned that belongs in the summary
        summary.update(intervention.report())
    return summary, rows, images


def reuse_key(ctx: JobContext, metric) -> str | None:
    from .metrics.trace import edits_projector_only

    if metric.upstream_of_projector and not ctx.figures and not ctx.job.is_stock and edits_projector_only(ctx.job):
        return repr(metric)  # a dataclass: its name and settings
    return None


def save_arrays(arrays_dir: Path, metric: str, arrays: dict) -> None:
    if arrays:
        arrays_dir.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(arrays_dir / f"{metric}.{name}.npy", array)


def link_arrays(source: Path, arrays_dir: Path, metric: str, arrays: dict) -> None:
    """The same arrays as `source`'s, as hard links (one directory entry each, no copy); a copy where the filesystem
    has no hard links. The job folder was cleared first, so no name is linked twice, and a later rerun of either
    job clears its own folder (unlinking) before writing: neither ever writes into the other's files."""
    import os
    import shutil

    if arrays:
        arrays_dir.mkdir(parents=True, exist_ok=True)
    for name in arrays:
        file = f"{metric}.{name}.npy"
        try:
            os.link(source / file, arrays_dir / file)
        except OSError:
            shutil.copyfile(source / file, arrays_dir / file)
