"""Generation (config group `sampler`) through diffusers' own `Krea2Pipeline`, fed our encoded `prompt_embeds`.

Nothing here re-implements the sampler: the pipeline runs the scheduler, CFG and VAE decode. What we add is the
`DenoiseState` — which CFG branch and which denoising step the transformer (and so `text_fusion`) is running for —
so interventions can be gated to the positive branch and to a step window. diffusers calls the transformer for the
positive prompt first and then, when guidance > 0, for the negative one, every step.

The fast path (`sampler.fast=true`, the config default) keeps the same pipeline call and changes only what it is fed
and how the transformer's text modules are called, each lever exact in math and switchable on its own:
- `trim_padding`: drop the padded columns of `prompt_embeds`. Text tokens all sit at the RoPE origin and pads are only
  ever masked keys whose own outputs are discarded, so the result is the same math on ~40 instead of 512 tokens; the
  DiT then runs without a key mask (diffusers' contract: `None` when every text token is valid).
- `cache_text_path`: `text_fusion` and `txt_in` do not depend on the step, so they run once per image and branch
  instead of once per step — unless something inside them reads the step (an intervention's step window).
- `batch_seeds`: the seeds of one prompt in one pipeline call (a generator list); pays when per-call overhead dominates.
- `compile`: `compile_repeated_blocks(fullgraph=True)` on the DiT blocks (CUDA only with `auto`). Compiling lasts for
  the process: a later `fast=false` call runs the compiled blocks too, so it warns, and `runs_compiled` enters the
  stock-image cache key and the job's record.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .errors import as_float, as_int, require

log = logging.getLogger(__name__)


class DenoiseState:
    """Where generation is: `branch` in {cond, uncond}, `step` in [0, steps). Conditioning-only runs stay cond/0.

    Reads of `step` (and `calls`) are counted, so the text-path cache can tell a step-dependent edit (one that
    consulted the step) from a step-independent one and never reuse the former's output across steps."""

    def __init__(self, branch: str = "cond", step: int = 0, calls: int = 0):
        self.branch = branch
        self._step = step
        self._calls = calls
        self.step_reads = 0

    @property
    def step(self) -> int:
        self.step_reads += 1
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = value

    @property
    def calls(self) -> int:
        self.step_reads += 1
        return self._calls

    @calls.setter
    def calls(self, value: int) -> None:
        self._calls = value

    def reset(self) -> None:
        self.branch, self._step, self._calls = "cond", 0, 0

    def __repr__(self) -> str:
        return f"DenoiseState(branch={self.branch!r}, step={self._step}, calls={self._calls})"


STATE = DenoiseState()


@contextmanager
def track_denoise_state(transformer, guidance: float, state: DenoiseState = STATE):
    """Count transformer calls to know the branch and step (cond first, then uncond, per step)."""
    calls_per_step = 2 if guidance > 0 else 1

    def pre_hook(module, args):
        state.step, within = divmod(state._calls, calls_per_step)
        state.branch = "cond" if within == 0 else "uncond"
        state._calls += 1

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
    model and 1024² on the real one. `fast` is off when built in code (bit-identical to diffusers' own call) and on in
    `conf/sampler/default.yaml`; the four levers below it only act when `fast` is on."""

    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int = 512
    negative_prompt: str = ""
    fast: bool = False
    trim_padding: bool = True
    cache_text_path: bool = True
    batch_seeds: bool = False
    compile: bool | str = "auto"

    def __post_init__(self):
        # Numbers are converted here, once: Hydra passes command-line text it cannot parse (`=abc`) as a string.
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None:
                value = as_int(value, f"sampler.{key}", example=1024)
                setattr(self, key, value)
            require(value is None or (value > 0 and value % 16 == 0), f"sampler.{key}",
                    f"{value} is not a positive multiple of 16", f"use e.g. sampler.{key}=1024 (or 64 on the synthetic model)")
        if self.steps is not None:
            self.steps = as_int(self.steps, "sampler.steps")
            require(self.steps >= 1, "sampler.steps", f"{self.steps} steps", "give at least 1 step")
        if self.guidance is not None:
            self.guidance = as_float(self.guidance, "sampler.guidance")
            require(self.guidance >= 0, "sampler.guidance", f"{self.guidance} < 0",
                    "use 0 for no CFG, 4.5 for Raw (diffusers' convention: = CFG 5.5)")
        self.max_sequence_length = as_int(self.max_sequence_length, "sampler.max_sequence_length", example=512)
        require(self.max_sequence_length >= 1, "sampler.max_sequence_length", f"{self.max_sequence_length}",
                "give a positive token count (Krea 2 uses 512)")
        for key in ("fast", "trim_padding", "cache_text_path", "batch_seeds"):
            require(isinstance(getattr(self, key), bool), f"sampler.{key}", f"{getattr(self, key)!r} is not a boolean",
                    f"use sampler.{key}=true or false")
        require(self.compile in (True, False, "auto"), "sampler.compile", f"{self.compile!r}",
                "use auto (CUDA only), true or false")

    def resolved(self, variant) -> "Sampler":
        """A copy with the variant's defaults filled in, and `max_sequence_length` checked against the encoder."""
        limit = max_text_tokens(variant)
        require(limit is None or self.max_sequence_length <= limit, "sampler.max_sequence_length",
                f"{self.max_sequence_length} tokens is more than the text encoder supports ({limit})",
                f"use at most {limit} (Krea 2 uses 512)")
        size = 64 if variant.synthetic else 1024
        return replace(
            self,
            steps=int(self.steps if self.steps is not None else variant.steps),
            guidance=float(self.guidance if self.guidance is not None else variant.guidance),
            height=int(self.height or size),
            width=int(self.width or size),
        )

    def fast_levers(self) -> dict | None:
        """The fast-path levers that change outputs (at float tolerance); None on the eager path. The text cache is
        bit-exact, so it stays out of the baseline cache key; compiling is keyed by what actually runs
        (`runs_compiled`, which depends on the device and on earlier jobs in the process), not by this config."""
        if not self.fast:
            return None
        return {"trim_padding": self.trim_padding, "batch_seeds": self.batch_seeds}

    def identity(self) -> dict:
        return {"steps": self.steps, "guidance": self.guidance, "height": self.height, "width": self.width,
                "max_sequence_length": self.max_sequence_length, "negative_prompt": self.negative_prompt,
                "fast": self.fast_levers()}


SYNTHETIC_MAX_POSITIONS = 128000  # transformers' Qwen3-VL text default, which the synthetic encoder keeps
TEMPLATE_PREFIX_TOKENS = 34  # the chat template's system turn, encoded before the prompt (positions it uses)


def max_text_tokens(variant) -> int | None:
    """The longest `max_sequence_length` the variant's text encoder has positions for (its config.json's
    `max_position_embeddings` less the template prefix); None when the config cannot be read without loading."""
    import json

    if variant.synthetic:
        return SYNTHETIC_MAX_POSITIONS - TEMPLATE_PREFIX_TOKENS
    from .models import sources_for

    try:
        config = json.loads((Path(sources_for(variant, ensure=False).text_encoder) / "config.json").read_text())
        return int((config.get("text_config") or config)["max_position_embeddings"]) - TEMPLATE_PREFIX_TOKENS
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(pipe, sampler: Sampler, cond, neg, seed: int, on_step=None, step_dependent: bool = False) -> np.ndarray:
    """One image [H, W, 3] in [0, 1] for one encoded prompt and seed, through `Krea2Pipeline.__call__`."""
    return generate_many(pipe, sampler, cond, neg, [seed], on_step=on_step, step_dependent=step_dependent)[0]


@torch.no_grad()
def generate_many(pipe, sampler: Sampler, cond, neg, seeds: list[int], on_step=None,
                  step_dependent: bool = False) -> list[np.ndarray]:
    """Images for one encoded prompt and several seeds, in seed order.

    `step_dependent=True` (an attached intervention has a step window) turns the text-path cache off outright; the
    cache also turns itself off for any call that reads `STATE.step`, so this flag is a belt to those braces."""
    if not sampler.fast:
        warn_if_eager_on_compiled(pipe.transformer)
        return [_pipeline_call(pipe, sampler, cond, neg, [seed], on_step)[0] for seed in seeds]
    if sampler.trim_padding:
        cond, neg = trim_padding(cond), trim_padding(neg)
    groups = [list(seeds)] if sampler.batch_seeds else [[s] for s in seeds]
    out = []
    with fast_transformer(pipe.transformer, sampler, cache_text=sampler.cache_text_path and not step_dependent):
        for group in groups:
            out.extend(_pipeline_call(pipe, sampler, cond, neg, group, on_step))
    return out


def _pipeline_call(pipe, sampler: Sampler, cond, neg, seeds: list[int], on_step) -> list[np.ndarray]:
    """One `Krea2Pipeline.__call__` for `len(seeds)` images of one prompt (seed i's noise from its own generator, so
    a batch's latents equal the single-seed ones)."""

    def step_end(_pipe, _i, _t, kwargs):
        for _ in seeds:
            on_step()
        return kwargs

    use_cfg = sampler.guidance > 0
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
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
            num_images_per_prompt=len(seeds),
            generator=generators[0] if len(generators) == 1 else generators,
            output_type="np",
            max_sequence_length=sampler.max_sequence_length,
            callback_on_step_end=step_end if on_step is not None else None,
        )
    return list(out.images)


# ------------------------------------------------------------------------------------------------------ fast path
def trim_padding(encoded):
    """Keep only the token columns valid in some row (all of them for one prompt): `[prompt | suffix]` without the
    pads in between. Rows shorter than the longest keep their mask; a single prompt ends with an all-True mask."""
    from .prompts import Encoded

    keep = encoded.mask.any(dim=0)
    return Encoded(encoded.taps[:, keep], encoded.mask[:, keep], encoded.num_suffix)


def compile_blocks(transformer) -> bool:
    """`compile_repeated_blocks(fullgraph=True)` once per transformer. Our hooks and the interventions' hooks sit on
    the transformer and inside `text_fusion`, outside the compiled blocks, so they keep firing after compiling."""
    if getattr(transformer, "_krea_sweeps_compiled", False):
        return False
    transformer.compile_repeated_blocks(fullgraph=True)
    transformer._krea_sweeps_compiled = True
    log.info("compiled %s's repeated blocks (first call pays the compile)", type(transformer).__name__)
    return True


def should_compile(sampler: Sampler, device) -> bool:
    return sampler.compile is True or (sampler.compile == "auto" and torch.device(device).type == "cuda")


def blocks_compiled(transformer) -> bool:
    """Whether the DiT's blocks were compiled in this process — by `compile_blocks` or by anyone calling
    `Module.compile` (which sets `_compiled_call_impl`). Nothing here undoes it, so every later call runs them."""
    return bool(getattr(transformer, "_krea_sweeps_compiled", False)) or any(
        getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules())


def runs_compiled(sampler: Sampler, transformer) -> bool:
    """Whether `generate_many(…, sampler)` on `transformer` runs compiled blocks: already compiled, or about to be
    (fast path with compiling on for this device). Compiled and eager images differ at float tolerance."""
    return blocks_compiled(transformer) or (sampler.fast and should_compile(sampler, transformer.device))


def warn_if_eager_on_compiled(transformer) -> None:
    """`sampler.fast=false` promises diffusers' own eager call; after compiling, in this process, it cannot keep it."""
    if blocks_compiled(transformer) and not getattr(transformer, "_krea_sweeps_warned_compiled", False):
        transformer._krea_sweeps_warned_compiled = True
        log.warning("sampler.fast=false, but the DiT blocks were compiled earlier in this process (compiling cannot "
                    "be undone): these images come from the compiled blocks, not diffusers' eager call bit for bit. "
                    "For the eager reference, run the fast=false jobs in a process of their own.")


@contextmanager
def fast_transformer(transformer, sampler: Sampler, cache_text: bool, state: DenoiseState = STATE):
    """Install the fast path's hooks for one `generate_many` call; everything is removed on exit.

    - an unmasked DiT when the text holds no pads: the transformer pre-hook drops an all-True key mask and rebuilds
      `position_ids` for the branch's own text length (the pipeline builds them once, from the positive prompt);
      `text_fusion` still receives an all-True mask, so hooks that read it see the same kind of argument as eagerly;
    - the text-path cache (`TextPathCache`) around `text_fusion` and `txt_in`."""
    if should_compile(sampler, transformer.device):
        compile_blocks(transformer)
    with ExitStack() as stack:
        if sampler.trim_padding:
            stack.enter_context(_unmasked_dit(transformer))
        if cache_text:
            cache = TextPathCache(state)
            stack.enter_context(cache.wrapping(transformer.text_fusion))
            stack.enter_context(cache.wrapping(transformer.txt_in))
        yield


@contextmanager
def _unmasked_dit(transformer):
    masks: dict[int, tuple] = {}  # id(mask [B, T]) -> (mask, [B, 1, 1, T] view or None when it has pads)
    position_rows: dict[tuple, torch.Tensor] = {}
    current = {"text_mask": None}

    def transformer_pre_hook(module, args, kwargs):
        mask = kwargs.get("encoder_attention_mask")
        if mask is None:
            return None
        if id(mask) not in masks:  # once per pipeline call and branch: `.all()` syncs the device
            masks[id(mask)] = (mask, mask[:, None, None, :] if bool(mask.all()) else None)  # holding `mask` keeps
        text_mask = masks[id(mask)][1]                                                     # its id unique
        current["text_mask"] = text_mask
        if text_mask is None:
            return None
        kwargs["encoder_attention_mask"] = None
        text_len, image_len = kwargs["encoder_hidden_states"].shape[1], kwargs["hidden_states"].shape[1]
        pos = kwargs["position_ids"]
        if pos.shape[0] != text_len + image_len:  # the negative prompt's trimmed length differs from the positive's
            key = (text_len, id(pos))
            if key not in position_rows:
                position_rows[key] = torch.cat([pos.new_zeros(text_len, pos.shape[1]), pos[-image_len:]])
            kwargs["position_ids"] = position_rows[key]
        return args, kwargs

    def text_fusion_pre_hook(module, args, kwargs):
        if kwargs.get("attention_mask") is None and current["text_mask"] is not None:
            kwargs["attention_mask"] = current["text_mask"]
            return args, kwargs
        return None

    handles = [transformer.register_forward_pre_hook(transformer_pre_hook, with_kwargs=True),
               transformer.text_fusion.register_forward_pre_hook(text_fusion_pre_hook, with_kwargs=True, prepend=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class TextPathCache:
    """Reuse a text module's output while its input is the very same tensor (same object, same version) in the same
    CFG branch — i.e. across the steps of one image. A miss that read `STATE.step` is not stored (its output depends
    on the step), and an entry whose output was edited in place afterwards (by a later consumer) is dropped.

    The cache sits in front of the module's own hooks, so it is keyed on the tensor the transformer passed, not on
    what a pre-hook made of it (a taps edit returns a new tensor every call, which would miss every step). A miss runs
    the module with its hooks (pre-hooks, forward, forward hooks, hooks inside), once per image and branch; the stored
    output already holds their effect, so a hit returns it without running them."""

    def __init__(self, state: DenoiseState = STATE):
        self.state = state
        self.entries: dict[tuple, tuple] = {}
        self.hits = self.misses = 0

    @contextmanager
    def wrapping(self, module):
        """Cache `module`'s calls while the body runs. `Module.__call__` dispatches to `self._call_impl`, which runs the
        hooks and `forward`: an instance attribute of that name sees the call before any hook. The name is torch's
        own (private); were a version to stop dispatching through it, the cache would stop hitting — slower, never
        wrong — and tests/test_fast_path.py's once-per-image counts would fail."""
        own = module.__dict__.get("_call_impl")
        inner = own if own is not None else module._call_impl

        def cached_call(x, *args, **kwargs):
            mask = kwargs.get("attention_mask", args[0] if args else None)
            key = (id(module), self.state.branch)
            entry = self.entries.get(key)
            if (entry is not None and entry[0] is x and entry[1] == x._version and entry[2] is mask
                    and entry[3]._version == entry[4]):
                self.hits += 1
                return entry[3]
            self.misses += 1
            reads = self.state.step_reads
            out = inner(x, *args, **kwargs)
            if self.state.step_reads == reads and isinstance(out, torch.Tensor):
                self.entries[key] = (x, x._version, mask, out, out._version)
            else:
                self.entries.pop(key, None)
            return out

        module._call_impl = cached_call
        try:
            yield self
        finally:
            if own is not None:
                module._call_impl = own
            else:
                del module._call_impl
            self.entries.clear()
