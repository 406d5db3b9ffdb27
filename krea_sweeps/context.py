"""What a metric receives: `JobContext` (the planned job, its loaded model, the encoded prompts, the images) and
the services a metric may ask of the job: stock images through the sweep's cache, a generation with or without the
job's interventions, recordings during the job's own generation.

It sits below `task` (which runs a job) and `metrics/` (which read it), so a metric never imports the layer that runs
it: metrics can be written, tested and reused without the runner.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .plan import Job, intervention_label
from .session import Session


class Timings(dict):
    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------ baseline cache
def baseline_key(job: Job, prompt: str, seed: int, compiled_blocks: bool) -> str:
    """The stock image's cache key: the variant as resolved (device, dtype, files, LoRA), the sampler, and whether the
    DiT blocks it runs are compiled (compiled and eager images differ at float tolerance)."""
    blob = json.dumps({"variant": job.variant.identity(), "sampler": job.sampler.identity(), "prompt": prompt,
                       "seed": seed, "compiled_blocks": compiled_blocks}, sort_keys=True)
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


# --------------------------------------------------------------------------------------------------------- job context
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
    # The job's pipeline calls (sampler.Denoising): each gets its own DenoiseState; the job's interventions, map
    # metrics and the text-path cache read the one the transformer runs for (`denoise.current`).
    denoise: Any = None
    compiled_blocks: bool | None = None  # whether the images came from compiled DiT blocks (None: no images)
    baseline_keys: dict = field(default_factory=dict)  # "pPP_sS" → the stock image's cache key (collect reads it)

    def __post_init__(self):
        if self.denoise is None:
            from .sampler import Denoising

            self.denoise = Denoising()

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

    @property
    def intervention_label(self) -> str:
        """The job's interventions in one line (captions, run names)."""
        return intervention_label(self.job)

    # What a metric may ask of the job besides what it ran (the metric never imports the layer that runs it).
    def stock_images(self, prompt: str, seeds: list[int]) -> dict[int, np.ndarray]:
        """Stock images of any prompt at `seeds`, through the sweep's stock-image cache."""
        return stock_images_of(self, prompt, seeds)

    def generate(self, keys: list[tuple[int, int]], with_interventions: bool, desc: str) -> dict:
        """The job's prompts at (prompt, seed) `keys` generated again, with or without its interventions (what a
        metric that records during generation does when the images came from a cache)."""
        return generate_images(self, self.model.pipeline(), with_interventions, keys, desc)

    def stock_key(self, prompt: str, seed: int) -> str:
        """The cache key of `prompt`'s stock image at `seed` (a metric keys its own stock-side files by it)."""
        return baseline_key(self.job, prompt, seed, bool(self.compiled_blocks))

    @property
    def baseline_folder(self) -> Path:
        """The sweep's `_baselines/` (stock images and what metrics keep beside them)."""
        return baseline_folder(self.job)

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
                                   denoising=self.denoise, projector_chains=self.session.projector_chains,
                                   hooks=self.session.hooks,
                                   get_transformer=(lambda: self.model.transformer) if self.job.generates else None,
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


# ---------------------------------------------------------------------------------------------------------- generation
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
                                       on_step=lambda: bar.update(1), denoising=ctx.denoise, session=ctx.session)
            out.update({(p, seed): image for seed, image in zip(seeds, images)})
    bar.close()
    return out


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
                              denoising=ctx.denoise, session=ctx.session)
        ctx.session.baseline_generations += len(fresh)
        for s, image in zip(missing, fresh):
            store_baseline(ctx.session, ctx.job, baseline_key(ctx.job, prompt, s, bool(ctx.compiled_blocks)), image)
            out[s] = image
    return out
