"""Generation (config group `sampler`) through diffusers' own `Krea2Pipeline`, fed our encoded `prompt_embeds`.

Nothing here re-implements the sampler: the pipeline runs the scheduler, CFG and VAE decode. What we add is the
`DenoiseState` — which CFG branch and which denoising step the transformer (and so `text_fusion`) is running for —
so interventions can be gated to the positive branch and to a step window. diffusers calls the transformer for the
positive prompt first and then, when guidance > 0, for the negative one, every step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .errors import require, require_finite


@dataclass
class DenoiseState:
    """Where generation is: `branch` in {cond, uncond}, `step` in [0, steps). Conditioning-only runs stay cond/0."""

    branch: str = "cond"
    step: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.branch, self.step, self.calls = "cond", 0, 0


STATE = DenoiseState()


@contextmanager
def track_denoise_state(transformer, guidance: float, state: DenoiseState = STATE):
    """Count transformer calls to know the branch and step (cond first, then uncond, per step)."""
    calls_per_step = 2 if guidance > 0 else 1

    def pre_hook(module, args):
        state.step, within = divmod(state.calls, calls_per_step)
        state.branch = "cond" if within == 0 else "uncond"
        state.calls += 1

    state.reset()
    handle = transformer.register_forward_pre_hook(pre_hook)
    try:
        yield state
    finally:
        handle.remove()
        state.reset()


@dataclass
class Sampler:
    """Steps/guidance default to the variant's (Raw 28 / 4.5 CFG, Turbo 8 / 0); resolution to 64² on the synthetic
    model and 1024² on the real one."""

    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int = 512
    negative_prompt: str = ""

    def __post_init__(self):
        for key in ("height", "width"):
            value = getattr(self, key)
            require(value is None or (int(value) > 0 and int(value) % 16 == 0), f"sampler.{key}",
                    f"{value} is not a positive multiple of 16", f"use e.g. sampler.{key}=1024 (or 64 on the synthetic model)")
        require(self.steps is None or int(self.steps) >= 1, "sampler.steps", f"{self.steps} steps", "give at least 1 step")
        if self.guidance is not None:
            require_finite(self.guidance, "sampler.guidance")
            require(self.guidance >= 0, "sampler.guidance", f"{self.guidance} < 0",
                    "use 0 for no CFG, 4.5 for Raw (diffusers' convention: = CFG 5.5)")
        require(self.max_sequence_length >= 1, "sampler.max_sequence_length", f"{self.max_sequence_length}",
                "give a positive token count (Krea 2 uses 512)")

    def resolved(self, variant) -> "Sampler":
        """A copy with the variant's defaults filled in."""
        size = 64 if variant.synthetic else 1024
        return Sampler(
            steps=int(self.steps if self.steps is not None else variant.steps),
            guidance=float(self.guidance if self.guidance is not None else variant.guidance),
            height=int(self.height or size),
            width=int(self.width or size),
            max_sequence_length=self.max_sequence_length,
            negative_prompt=self.negative_prompt,
        )

    def identity(self) -> dict:
        return {"steps": self.steps, "guidance": self.guidance, "height": self.height, "width": self.width,
                "max_sequence_length": self.max_sequence_length, "negative_prompt": self.negative_prompt}


@torch.no_grad()
def generate(pipe, sampler: Sampler, cond, neg, seed: int, on_step=None) -> np.ndarray:
    """One image [H, W, 3] in [0, 1] for one encoded prompt and seed, through `Krea2Pipeline.__call__`."""

    def step_end(_pipe, _i, _t, kwargs):
        on_step()
        return kwargs

    use_cfg = sampler.guidance > 0
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with track_denoise_state(pipe.transformer, sampler.guidance):
        out = pipe(
            prompt_embeds=cond.taps,
            prompt_embeds_mask=cond.mask,
            negative_prompt_embeds=neg.taps if use_cfg else None,
            negative_prompt_embeds_mask=neg.mask if use_cfg else None,
            height=sampler.height,
            width=sampler.width,
            num_inference_steps=sampler.steps,
            guidance_scale=sampler.guidance,
            generator=generator,
            output_type="np",
            max_sequence_length=sampler.max_sequence_length,
            callback_on_step_end=step_end if on_step is not None else None,
        )
    return out.images[0]
