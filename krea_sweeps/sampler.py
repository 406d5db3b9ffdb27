"""Generation (config group `sampler`) through diffusers' own `Krea2Pipeline`, fed our encoded `prompt_embeds`.

Nothing here re-implements the sampler: the pipeline runs the scheduler, CFG and VAE decode. What we add is a
`DenoiseState` per pipeline call — which CFG branch and which denoising step the transformer (and so `text_fusion`)
is running for, read off what the pipeline passes (which embeddings object, which step its callback reports), never
by counting calls — and `Denoising`, which follows a job's calls and says which one the transformer is running for
now, so interventions can be gated to the positive branch and to a step window, per call.

The fast path (`sampler.fast=true`, the config default) keeps the same pipeline call and changes only what it is fed
and how the transformer's text modules are called, each lever exact in math and switchable on its own:
- `trim_padding`: drop the padded columns of `prompt_embeds`. Text tokens all sit at the RoPE origin and pads are only
  ever masked keys whose own outputs are discarded, so the result is the same math on ~40 instead of 512 tokens; the
  DiT then runs without a key mask (diffusers' contract: `None` when every text token is valid).
- `cache_text_path`: `text_fusion` and `txt_in` do not depend on the step, so they run once per image and branch
  instead of once per step — unless an attached edit declares `depends_on_step` (any step window does).
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
from torch import nn

from .configs import SamplerFields
from .errors import require, require_finite

log = logging.getLogger(__name__)


class DenoiseState:
    """Where one `Krea2Pipeline` call is, as the pipeline says it — one object per pipeline call, made where the
    pipeline is called (`Denoising.following`) and never shared with another call. Nothing here counts calls.

    - `branch` ∈ {cond, uncond}: which embeddings object the transformer receives as `encoder_hidden_states` — the
      one the pipeline made from this call's positive `prompt_embeds`, or from its negative ones (recorded as
      `Krea2Pipeline.encode_prompt` returns them). Read off each transformer call by `Denoising`.
    - `step`: the denoising step index, from the pipeline's `callback_on_step_end` (0 until step 0 ends, then i+1);
      equal to the scheduler's index of the timestep the transformer is running.
    - `seeds`: the images of this pipeline call, in batch order."""

    def __init__(self, branch: str = "cond", step: int = 0, seeds: list[int] | None = None):
        self.branch = branch
        self.step = step
        self.seeds: list[int] = list(seeds or [])
        self.embeddings: dict[str, torch.Tensor] = {}

    def owns(self, embeddings) -> str | None:
        """The branch whose embeddings object `embeddings` is in this call (identity, not content: equal prompts
        stay apart), or None."""
        for branch, given in self.embeddings.items():
            if embeddings is given:
                return branch
        return None

    def __repr__(self) -> str:
        return f"DenoiseState(branch={self.branch!r}, step={self.step}, seeds={self.seeds})"


# The text path run on its own (conditioning-only metrics, fit, capture): no pipeline call, so the positive branch
# at the first step — what gates read there. Never advanced: a pipeline call gets a state of its own.
CONDITIONING = DenoiseState()


class Denoising:
    """The pipeline calls one job (or test) follows, and which of them the transformer is running for right now.

    Each pipeline call gets its own `DenoiseState` (`following`, called where the pipeline is called); while the
    transformer runs for a call, `current` is that call's state, so what is attached (interventions' hooks through
    `InterventionContext.state`, map metrics, the text-path cache) reads the state of the call it is inside — two
    interleaved calls (a second pipeline call inside a step callback) never share or reset each other's state.
    Outside any transformer call `current` is `CONDITIONING` (cond / step 0): the text path run on its own.

    `generate`/`generate_many` take one as a required argument: a call cannot be made without saying which
    interventions' tracker follows it. `step_dependent` counts, per branch, the attached edits that declared they
    vary with the step (`Intervention.depends_on_step`); while > 0 the text-path cache stores nothing for that
    branch. `branch`, `step` and `seeds` read `current`'s."""

    def __init__(self):
        self.calls: list[DenoiseState] = []    # the pipeline calls in progress (outer first)
        self.running: list[DenoiseState] = []  # the calls whose transformer forward is in progress (innermost last)
        self.step_dependent = {"cond": 0, "uncond": 0}

    @property
    def current(self) -> DenoiseState:
        return self.running[-1] if self.running else CONDITIONING

    @property
    def branch(self) -> str:
        return self.current.branch

    @property
    def step(self) -> int:
        return self.current.step

    @property
    def seeds(self) -> list[int]:
        return self.current.seeds

    @contextmanager
    def at(self, branch: str = "cond", step: int = 0, seeds: list[int] | None = None):
        """`current` reads (branch, step) while the body runs: the text path called by hand as a pipeline call
        would at that point (tests, tracing)."""
        state = DenoiseState(branch, step, seeds)
        self.running.append(state)
        try:
            yield state
        finally:
            self.running.remove(state)

    @contextmanager
    def declaring(self, depends_on_step: bool, apply_to: str = "both"):
        """While the body runs, count an attached edit that varies with the step in the branches it applies to (the
        text-path cache then stores nothing for them)."""
        branches = [b for b in self.step_dependent if apply_to in ("both", b)] if depends_on_step else []
        for b in branches:
            self.step_dependent[b] += 1
        try:
            yield
        finally:
            for b in branches:
                self.step_dependent[b] -= 1

    @property
    def varies_with_step(self) -> bool:
        """Whether an attached edit declared that the current branch's text path varies with the step."""
        return self.step_dependent.get(self.branch, 0) > 0

    def owner(self, embeddings) -> tuple[DenoiseState, str]:
        """The call in progress that prepared `embeddings`, and its branch; anything else raises."""
        for state in reversed(self.calls):
            branch = state.owns(embeddings)
            if branch is not None:
                return state, branch
        raise RuntimeError(
            "krea_sweeps cannot tell the CFG branch: the transformer received text embeddings that are neither the "
            "positive nor the negative prompt_embeds of a Krea2Pipeline call this Denoising follows (a diffusers "
            "release that batches both halves into one call, or a pipeline call made without `following`?). Gated "
            "interventions would edit the wrong rows; use the diffusers version pinned in pyproject.toml "
            "(>=0.42.1,<0.43), which calls the transformer once per branch, and generate through "
            "sampler.generate_many.")

    @contextmanager
    def following(self, pipe, positive, negative, seeds: list[int]):
        """Follow one `pipe(...)` call whose `prompt_embeds` is `positive` and `negative_prompt_embeds` is `negative`
        (None without CFG) with a new `DenoiseState`; yields (state, the `callback_on_step_end` that advances its
        step, positive, negative).

        `encode_prompt` (public) is wrapped on the instance for the call to learn which objects it returns for which
        input; a pre-hook on the transformer (first in line, before anything that rebuilds its arguments) makes the
        call that prepared the embeddings it receives `current` until the forward ends (a forward hook that runs
        also when the forward raises). All of it is removed on exit; a call inside this one (from a step callback)
        nests: it wraps `encode_prompt` again and restores this call's wrapper when it ends."""
        if negative is not None and negative is positive:  # one object passed twice: give the negative its own
            negative = negative.detach()                     # identity (a view: no copy)
        state = DenoiseState(seeds=seeds)
        had_own = "encode_prompt" in pipe.__dict__
        encode_prompt = pipe.encode_prompt

        def recording_encode_prompt(*args, **kwargs):
            out = encode_prompt(*args, **kwargs)
            given = kwargs.get("prompt_embeds")
            if given is not None and given is positive:
                state.embeddings["cond"] = out[0]
            elif given is not None and given is negative:
                state.embeddings["uncond"] = out[0]
            return out

        def enter(module, args, kwargs):
            owner, branch = self.owner(kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None))
            if owner is state:
                state.branch = branch
                self.running.append(state)

        def leave(module, args, output):
            if self.running and self.running[-1] is state:
                self.running.pop()

        def step_end(_pipe, i, _t, callback_kwargs):
            state.step = int(i) + 1
            return callback_kwargs

        transformer = pipe.transformer
        pipe.encode_prompt = recording_encode_prompt
        self.calls.append(state)
        handles = [transformer.register_forward_pre_hook(enter, with_kwargs=True, prepend=True),
                   transformer.register_forward_hook(leave, always_call=True)]
        try:
            yield state, step_end, positive, negative
        finally:
            for handle in handles:
                handle.remove()
            self.calls.remove(state)
            while state in self.running:
                self.running.remove(state)
            if had_own:
                pipe.encode_prompt = encode_prompt  # the enclosing call's wrapper
            else:
                del pipe.encode_prompt  # the class's method again

    def __repr__(self) -> str:
        return f"Denoising(current={self.current!r}, calls={len(self.calls)})"


@dataclass
class Sampler(SamplerFields):
    """Steps/guidance default to the variant's (Raw 28 / 4.5 CFG, Turbo 8 / 0); resolution to 64² on the synthetic
    model and 1024² on the real one. `fast` is off when built in code (bit-identical to diffusers' own call) and on in
    `conf/sampler/default.yaml`; the four levers below it only act when `fast` is on."""

    def __post_init__(self):
        # Types are checked by composition (`configs.SamplerFields`); what remains are ranges.
        for key in ("height", "width"):
            value = getattr(self, key)
            require(value is None or (value > 0 and value % 16 == 0), f"sampler.{key}",
                    f"{value} is not a positive multiple of 16",
                    f"use e.g. sampler.{key}=1024 (or 64 on the synthetic model)")
        if self.steps is not None:
            require(self.steps >= 1, "sampler.steps", f"{self.steps} steps", "give at least 1 step")
        if self.guidance is not None:
            require_finite(self.guidance, "sampler.guidance")
            require(self.guidance >= 0, "sampler.guidance", f"{self.guidance} < 0",
                    "use 0 for no CFG, 4.5 for Raw (diffusers' convention: = CFG 5.5)")
        require(self.max_sequence_length >= 1, "sampler.max_sequence_length", f"{self.max_sequence_length}",
                "give a positive token count (Krea 2 uses 512)")
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
def generate(pipe, sampler: Sampler, cond, neg, seed: int, *, denoising: Denoising, on_step=None,
             step_dependent: bool = False, session=None) -> np.ndarray:
    """One image [H, W, 3] in [0, 1] for one encoded prompt and seed, through `Krea2Pipeline.__call__`."""
    return generate_many(pipe, sampler, cond, neg, [seed], denoising=denoising, on_step=on_step,
                         step_dependent=step_dependent, session=session)[0]


@torch.no_grad()
def generate_many(pipe, sampler: Sampler, cond, neg, seeds: list[int], *, denoising: Denoising, on_step=None,
                  step_dependent: bool = False, session=None) -> list[np.ndarray]:
    """Images for one encoded prompt and several seeds, in seed order.

    `denoising` (required: there is no default to fall back on silently): the tracker the attached interventions and
    metrics read (`InterventionContext.denoising`, `JobContext.denoise`); each pipeline call gets its own
    `DenoiseState` from it. The text-path cache stores nothing for a branch while `denoising` counts an attached edit
    that declared `depends_on_step` there, and is off when `step_dependent=True` (for callers that know more than
    what is attached). `session` records which DiTs this process compiled (default: the process's session)."""
    from .session import current_session

    session = session if session is not None else current_session()
    if not sampler.fast:
        warn_if_eager_on_compiled(pipe.transformer, session)
        return [_pipeline_call(pipe, sampler, cond, neg, [seed], on_step, denoising)[0] for seed in seeds]
    if sampler.trim_padding:
        cond, neg = trim_padding(cond), trim_padding(neg)
    groups = [list(seeds)] if sampler.batch_seeds else [[s] for s in seeds]
    out = []
    cache_text = sampler.cache_text_path and not step_dependent
    with fast_transformer(pipe.transformer, sampler, cache_text=cache_text, denoising=denoising, session=session):
        for group in groups:
            out.extend(_pipeline_call(pipe, sampler, cond, neg, group, on_step, denoising))
    return out


def _pipeline_call(pipe, sampler: Sampler, cond, neg, seeds: list[int], on_step, denoising: Denoising
                   ) -> list[np.ndarray]:
    """One `Krea2Pipeline.__call__` for `len(seeds)` images of one prompt (seed i's noise from its own generator, so
    a batch's latents equal the single-seed ones), with a `DenoiseState` of its own that `denoising` follows."""
    use_cfg = sampler.guidance > 0
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    with denoising.following(pipe, cond.taps, neg.taps if use_cfg else None, seeds) as (_, advance, positive,
                                                                                         negative):
        def step_end(_pipe, i, t, kwargs):
            kwargs = advance(_pipe, i, t, kwargs)
            if on_step is not None:
                for _ in seeds:
                    on_step()
            return kwargs

        out = pipe(
            prompt_embeds=positive,
            prompt_embeds_mask=cond.mask,
            negative_prompt_embeds=negative,
            negative_prompt_embeds_mask=neg.mask if use_cfg else None,
            height=sampler.height,
            width=sampler.width,
            num_inference_steps=sampler.steps,
            guidance_scale=sampler.guidance,
            num_images_per_prompt=len(seeds),
            generator=generators[0] if len(generators) == 1 else generators,
            output_type="np",
            max_sequence_length=sampler.max_sequence_length,
            callback_on_step_end=step_end,
        )
    return list(out.images)


# ------------------------------------------------------------------------------------------------------ fast path
def trim_padding(encoded):
    """Keep only the token columns valid in some row (all of them for one prompt): `[prompt | suffix]` without the
    pads in between. Rows shorter than the longest keep their mask; a single prompt ends with an all-True mask."""
    from .prompts import Encoded

    keep = encoded.mask.any(dim=0)
    return Encoded(encoded.taps[:, keep], encoded.mask[:, keep], encoded.num_suffix)


def compile_blocks(transformer, session, **compile_kwargs) -> bool:
    """`compile_repeated_blocks(fullgraph=True)` once per transformer and session (the process's record of what it
    compiled: nothing is written on the model). Our hooks and the interventions' hooks sit on the transformer and
    inside `text_fusion`, outside the compiled blocks, so they keep firing after compiling."""
    if transformer in session.compiled:
        return False
    transformer.compile_repeated_blocks(**({"fullgraph": True} | compile_kwargs))
    session.compiled.add(transformer)
    log.info("compiled %s's repeated blocks (first call pays the compile)", type(transformer).__name__)
    return True


def should_compile(sampler: Sampler, device) -> bool:
    return sampler.compile is True or (sampler.compile == "auto" and torch.device(device).type == "cuda")


def blocks_compiled(transformer, session) -> bool:
    """Whether this process compiled the DiT's blocks (`compile_blocks`). Nothing undoes it, so every later call
    runs them. Blocks compiled by someone else's `Module.compile` are not seen: torch has no public flag for it."""
    return transformer in session.compiled


def runs_compiled(sampler: Sampler, transformer, session) -> bool:
    """Whether `generate_many(…, sampler)` on `transformer` runs compiled blocks: already compiled, or about to be
    (fast path with compiling on for this device). Compiled and eager images differ at float tolerance."""
    return blocks_compiled(transformer, session) or (sampler.fast and should_compile(sampler, transformer.device))


def warn_if_eager_on_compiled(transformer, session) -> None:
    """`sampler.fast=false` promises diffusers' own eager call; after compiling, in this process, it cannot keep it."""
    if blocks_compiled(transformer, session) and transformer not in session.warned_compiled:
        session.warned_compiled.add(transformer)
        log.warning("sampler.fast=false, but the DiT blocks were compiled earlier in this process (compiling cannot "
                    "be undone): these images come from the compiled blocks, not diffusers' eager call bit for bit. "
                    "For the eager reference, run the fast=false jobs in a process of their own.")


@contextmanager
def fast_transformer(transformer, sampler: Sampler, cache_text: bool, denoising: Denoising, session):
    """Install the fast path's hooks for one `generate_many` call; everything is removed on exit.

    - an unmasked DiT when the text holds no pads: the transformer pre-hook drops an all-True key mask and rebuilds
      `position_ids` for the branch's own text length (the pipeline builds them once, from the positive prompt);
      `text_fusion` still receives an all-True mask, so hooks that read it see the same kind of argument as eagerly;
    - the text-path cache (`CachedTextModule`) in place of `text_fusion` and `txt_in`."""
    if should_compile(sampler, transformer.device):
        compile_blocks(transformer, session)
    with ExitStack() as stack:
        if sampler.trim_padding:
            stack.enter_context(_unmasked_dit(transformer))
        if cache_text:
            cache = TextPathCache(denoising)
            stack.enter_context(cache.wrapping(transformer, "text_fusion"))
            stack.enter_context(cache.wrapping(transformer, "txt_in"))
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


class CachedTextModule(nn.Module):
    """Stands in for a text module (`text_fusion`, `txt_in`) of a DiT during one `generate_many` call: returns the
    stored output while its input is the very same tensor (same object, same version) in the same CFG branch — i.e.
    across the steps of one image — and otherwise calls the module, hooks and all.

    Being the DiT's child in the module's place, it sees the call before the module's own hooks, so it is keyed on
    the tensor the transformer passed, not on what a pre-hook made of it (a taps edit returns a new tensor every call,
    which would miss every step). The stored output already holds the hooks' effect, so a hit returns it without
    running them. Nothing is stored while an attached edit declares `depends_on_step` (its output varies with the
    step), and an entry whose output was edited in place afterwards (by a later consumer) is dropped."""

    def __init__(self, inner: nn.Module, cache: "TextPathCache"):
        super().__init__()
        self.inner = inner
        self.cache = cache  # a plain object, not a module: not part of the state dict

    def forward(self, x, *args, **kwargs):
        cache, state = self.cache, self.cache.denoising
        mask = kwargs.get("attention_mask", args[0] if args else None)
        key = (id(self.inner), state.branch)
        entry = cache.entries.get(key)
        if (entry is not None and entry[0] is x and entry[1] == x._version and entry[2] is mask
                and entry[3]._version == entry[4]):
            cache.hits += 1
            return entry[3]
        cache.misses += 1
        out = self.inner(x, *args, **kwargs)
        if not state.varies_with_step and isinstance(out, torch.Tensor):
            cache.entries[key] = (x, x._version, mask, out, out._version)
        else:
            cache.entries.pop(key, None)
        return out


class TextPathCache:
    """The text-path cache of one `generate_many` call: entries, hit/miss counts, and the tracker whose current call
    (its branch) it keys on."""

    def __init__(self, denoising: Denoising):
        self.denoising = denoising
        self.entries: dict[tuple, tuple] = {}
        self.hits = self.misses = 0

    @contextmanager
    def wrapping(self, parent: nn.Module, name: str):
        """`parent.<name>` replaced by a `CachedTextModule` around it (`set_submodule`) while the body runs; the very
        same module object is put back on exit, whatever happens."""
        inner = parent.get_submodule(name)
        parent.set_submodule(name, CachedTextModule(inner, self))
        try:
            yield self
        finally:
            parent.set_submodule(name, inner)
            self.entries.clear()
