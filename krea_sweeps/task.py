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
import os
import platform
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from .files import atomic_write
from .plan import Job
from .session import Session

log = logging.getLogger("krea_sweeps")

SYNTHETIC_WARNING = ("synthetic Krea 2 (tiny, random weights; real tokenizer and projector values): its numbers test "
                     "the tool, they are not Krea 2 findings")


# --------------------------------------------------------------------------------------------------- file helpers
def write_json_atomic(path: Path, data: dict, durable: bool = True) -> None:
    with atomic_write(path, durable) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default))


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


class Timings(dict):
    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- baseline cache
def baseline_key(job: Job, prompt: str, seed: int, compiled_blocks: bool) -> str:
    """The stock image's cache key: the variant as resolved (device, dtype, files, LoRA), the sampler, and whether the
    DiT blocks it runs are compiled (compiled and eager images differ at float tolerance)."""
    blob = json.dumps({"variant": job.variant.identity(), "sampler": job.sampler.identity(), "prompt": prompt,
                       "seed": seed, "compiled_blocks": compiled_blocks}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def job_fingerprint(job: Job) -> str:
    """A hash of everything a job's result depends on — the variant as resolved (files, device, dtype, LoRA), the
    prompts' text, the seeds, the sampler, the interventions as data, the metric configs. The job folder is named
    from command-line overrides only, so a changed prompt file or environment variable keeps the folder: resume
    compares this instead of trusting that `result.json` exists."""
    metrics = OmegaConf.to_container(job.cfg.get("metrics") or {}, resolve=True)
    blob = json.dumps({"variant": job.variant.identity(), "prompts": job.prompts, "seeds": job.seeds,
                       "sampler": job.sampler.identity(), "interventions": [i.describe() for i in job.interventions],
                       "metrics": metrics}, sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def baseline_folder(job: Job) -> Path:
    return (job.sweep_dir or job.job_dir.parent) / "_baselines"


def baseline_file(job: Job, key: str) -> Path:
    return baseline_folder(job) / f"{key}.safetensors"


def cached_baseline(session: Session, job: Job, key: str) -> np.ndarray | None:
    """A stock image from the session's memory or the sweep's `_baselines/`; a damaged file on disk counts as
    missing (regenerated, one warning)."""
    from .files import load_verified

    if key not in session.baselines:
        tensors = load_verified(baseline_file(job, key))
        if tensors is None or "image" not in tensors:
            return None
        session.baselines[key] = tensors["image"].numpy()
    return session.baselines[key]


def store_baseline(session: Session, job: Job, key: str, image: np.ndarray) -> None:
    import torch

    from .files import save_verified

    session.baselines[key] = image
    save_verified(baseline_file(job, key), {"image": torch.from_numpy(np.ascontiguousarray(image))})


# ------------------------------------------------------------------------------------------------- job context
@dataclass
class JobContext:
    """What metrics see: the plan, the loaded model, encoded prompts, images, and a way to intervene."""

    job: Job
    model: Any
    session: Session = field(default_factory=Session)
    encoded: Any = None
    negative: Any = None
    images: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    baseline_images: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    cache: dict = field(default_factory=dict)  # per-job memo for metrics (one text-path trace serves them all)
    # Where the job's generation is (CFG branch, step, seeds): the one object its interventions, map metrics and the
    # text-path cache read, bound by each pipeline call it generates.
    denoise: Any = None
    compiled_blocks: bool | None = None  # whether the images came from compiled DiT blocks (None: no images)
    baseline_keys: dict = field(default_factory=dict)  # "pPP_sS" → the stock image's cache key (collect reads it)

    def __post_init__(self):
        if self.denoise is None:
            from .sampler import DenoiseState

            self.denoise = DenoiseState()

    @property
    def prompts(self) -> list[str]:
        return self.job.prompts

    @property
    def figures(self) -> bool:
        return self.job.figures

    @property
    def seeds(self) -> list[int]:
        return self.job.seeds

    @property
    def job_dir(self) -> Path:
        return self.job.job_dir

    @property
    def interventions(self) -> list:
        return self.job.interventions

    @property
    def text_path(self):
        return self.model.text_path

    def encode(self, prompts: list[str], layers: tuple[int, ...] | None = None):
        """Encoded prompts (cached); `layers` = other encoder hidden states than the 12 taps (the Diffusion Lens)."""
        cache = self.session.encode_cache(self.encode_folder)
        return cache.get(self.model, prompts, self.job.sampler.max_sequence_length, layers)

    @property
    def encode_folder(self) -> Path:
        return (self.job.sweep_dir or self.job.job_dir.parent) / "_encoded"

    def intervention_context(self):
        from .interventions import InterventionContext

        return InterventionContext(text_path=self.text_path, encode=self.encode, num_steps=self.job.sampler.steps,
                                   state=self.denoise, projector_chains=self.session.projector_chains,
                                   hooks=self.session.hooks,
                                   prompts=[*self.job.prompts, self.job.sampler.negative_prompt],
                                   encode_layers=self.encode)

    def fit_interventions(self) -> list[dict]:
        """The fit step, before anything runs: what the interventions learn from reference prompts (steer
        directions, ablation means, patch sources), recorded in result.json as `fitted`."""
        from .interventions import fit_all

        return fit_all(self.job.interventions, self.intervention_context())

    @contextmanager
    def intervened(self):
        """The job's interventions attached to the text path (and removed on exit, whatever happens)."""
        from .interventions import applied

        with applied(self.job.interventions, self.intervention_context()):
            yield

    def fuse(self, encoded=None, intervened: bool = True):
        """Fused text features [B, T, D] (after the refiners) for `encoded` (default: the job's prompts)."""
        import torch

        enc = encoded if encoded is not None else self.encoded
        with torch.no_grad():
            if intervened:
                with self.intervened():
                    return self.text_path(enc.taps, enc.mask)
            return self.text_path(enc.taps, enc.mask)


# ------------------------------------------------------------------------------------------------------ execute
def recorders(ctx: JobContext, kind: str, p: int, seeds: list[int]):
    """The metrics' recordings around one prompt's generation (`kind`: stock | job): metrics that read the DiT while
    it denoises (word maps, concept maps) declare `records_generation` and record into `ctx.cache` — during the very
    generation whose images the job keeps, so recording cannot be a second, different run."""
    from contextlib import ExitStack

    stack = ExitStack()
    for metric in ctx.job.metrics:
        if getattr(metric, "records_generation", False):
            stack.enter_context(metric.recording(ctx, kind, p, seeds))
    return stack


def generate_images(ctx: JobContext, pipe, with_interventions: bool, keys: list[tuple[int, int]],
                    desc: str) -> dict[tuple[int, int], np.ndarray]:
    from tqdm.auto import tqdm

    from .sampler import generate_many

    job = ctx.job
    out = {}
    bar = tqdm(total=len(keys) * job.sampler.steps, desc=desc, unit="step", leave=False,
               disable=os.environ.get("KREA_SWEEPS_PROGRESS", "1") == "0")
    scope = ctx.intervened() if with_interventions else nullcontext()
    by_prompt: dict[int, list[int]] = {}
    for p, seed in keys:
        by_prompt.setdefault(p, []).append(seed)
    with scope:
        for p, seeds in by_prompt.items():  # seeds of one prompt together: `sampler.batch_seeds` batches them
            with recorders(ctx, "job" if with_interventions else "stock", p, seeds):
                images = generate_many(pipe, job.sampler, ctx.encoded.index(p), ctx.negative, seeds,
                                       on_step=lambda: bar.update(1), state=ctx.denoise, session=ctx.session)
            out.update({(p, seed): image for seed, image in zip(seeds, images)})
    bar.close()
    return out


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


def stock_images_of(ctx: JobContext, prompt: str, seeds: list[int]) -> dict[int, np.ndarray]:
    """Stock images of any prompt (e.g. a patch pair's clean prompt) at `seeds`, through the sweep's stock-image cache."""
    from .sampler import generate_many

    out, missing = {}, []
    for s in seeds:
        image = cached_baseline(ctx.session, ctx.job, baseline_key(ctx.job, prompt, s, bool(ctx.compiled_blocks)))
        if image is None:
            missing.append(s)
        else:
            out[s] = image
    if missing:
        fresh = generate_many(ctx.model.pipeline(), ctx.job.sampler, ctx.encode([prompt]), ctx.negative, missing,
                              state=ctx.denoise, session=ctx.session)
        ctx.session.baseline_generations += len(fresh)
        for s, image in zip(missing, fresh):
            store_baseline(ctx.session, ctx.job, baseline_key(ctx.job, prompt, s, bool(ctx.compiled_blocks)), image)
            out[s] = image
    return out


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


def execute(job: Job, session: Session) -> dict:
    """Run one planned job with the session's caches and return its record (not yet written)."""
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
    return {
        "summary": summary,
        "scenes": ground_truth(arrays_dir) if ground_truth else None,
        "rows": rows,
        "images": sorted(str(Path("images") / f"p{p:02d}_s{s}.png") for p, s in ctx.images),
        "timings": dict(ctx.timings),
        "compiled_blocks": ctx.compiled_blocks,
        "baseline_keys": ctx.baseline_keys,
        "_wandb_images": images,
        "interventions": [i.describe() for i in job.interventions],  # the configuration, as planned
        "fitted": [i.fitted() for i in job.interventions],  # what the fit step learned (numbers)
        "truncated_tokens": truncated,
        "encode_cache": {"hits": cache.hits - hits_before, "misses": cache.misses - misses_before},
    }


def sheet_title(job: Job) -> str:
    """What a contact sheet shows: the intervention as applied, the variant, and whether it is the synthetic model."""
    label = intervention_label(job)
    what = "stock" if job.is_stock else label
    synthetic = " (synthetic Krea 2: images look alike by design)" if job.variant.synthetic else ""
    return f"{what} | {job.variant.name}{synthetic}"


def measure(ctx: JobContext) -> tuple[dict, list[dict], dict]:
    """Every metric of the job on `ctx`: (summary, rows, figures); arrays and figure PNGs are written to the job dir."""
    job = ctx.job
    summary, rows, images = {}, [], {}
    arrays_dir = job.job_dir / "arrays"
    for metric in job.metrics:
        out = metric.compute(ctx)
        summary.update(out.summary)
        for r in out.rows:
            rows.append({"metric": metric.name, **r})
        if out.arrays:
            arrays_dir.mkdir(parents=True, exist_ok=True)
        for name, array in out.arrays.items():
            np.save(arrays_dir / f"{metric.name}.{name}.npy", array)
        for name, (figure, _caption) in out.images.items():  # heatmaps, bars: also on disk, not only in W&B
            save_png(job.job_dir / "figures" / f"{name.replace('/', '_')}.png", figure)
        images.update(out.images)
    for intervention in job.interventions:  # what the fit step learned that belongs in the summary
        summary.update(intervention.report())
    return summary, rows, images


def intervention_label(job: Job) -> str:
    parts = []
    for i in job.interventions:
        d = i.describe()
        bits = [d["kind"]] + [f"{k}={d[k]}" for k in ("site", "slot", "layer", "strength") if d.get(k) is not None]
        parts.append(" ".join(str(b) for b in bits))
    return "; ".join(parts)
