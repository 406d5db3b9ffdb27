"""Generation (config group `sampler`) through diffusers' own `Krea2Pipeline`, fed our encoded `prompt_embeds`.

Nothing here re-implements the sampler: the pipeline runs the scheduler, CFG and VAE decode. What we add is the
`DenoiseState` — which CFG branch and which denoising step the transformer (and so `text_fusion`) is running for,
read off what the pipeline passes (which embeddings object, which step its callback reports), never by counting
calls — so interventions can be gated to the positive branch and to a step window.

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
    """Where generation is, as the pipeline says it — one object per job (or test), bound to each pipeline call it
    follows and passed explicitly to whatever gates on it (interventions via `InterventionContext.state`, map
    metrics, the text-path cache). Read `branch`, `step` and `seeds`; nothing here counts calls.

    - `branch` ∈ {cond, uncond}: which embeddings object the transformer receives as `encoder_hidden_states` — the
      one the pipeline made from our positive `prompt_embeds`, or from our negative ones (`following` records both
      as `Krea2Pipeline.encode_prompt` returns them). Anything else (e.g. a batched-CFG release) raises.
    - `step`: the denoising step index, from the pipeline's `callback_on_step_end` (0 until step 0 ends, then i+1);
      equal to the scheduler's index of the timestep the transformer is running.
    - `seeds`: the images of the current pipeline call, in batch order.
    - `step_dependent`: per branch, how many attached edits declared that they vary with the step there
      (`Intervention.depends_on_step`); while > 0 the text-path cache stores nothing for that branch.

    Outside a pipeline call it reads cond / step 0: conditioning-only runs see the text path as the positive branch
    does at the first step."""

    def __init__(self, branch: str = "cond", step: int = 0):
        self.branch = branch
        self.step = step
        self.seeds: list[int] = []
        self.step_dependent = {"cond": 0, "uncond": 0}
        self._embeddings: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.branch, self.step, self.seeds, self._embeddings = "cond", 0, [], {}

    def branch_of(self, embeddings) -> str:
        """The CFG branch whose embeddings object `embeddings` is (identity, not content: equal prompts stay apart)."""
        for branch, given in self._embeddings.items():
            if embeddings is given:
                return branch
        raise RuntimeError(
            "krea_sweeps cannot tell the CFG branch: the transformer received text embeddings that are neither the "
            "positive nor the negative prompt_embeds this Krea2Pipeline call prepared (a diffusers release that "
            "batches both halves into one call?). Gated interventions would edit the wrong rows; use the diffusers "
            "version pinned in pyproject.toml (>=0.42.1,<0.43), which calls the transformer once per branch.")

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

    @contextmanager
    def following(self, pipe, positive, negative, seeds: list[int]):
        """Bind this state to one `pipe(...)` call whose `prompt_embeds` is `positive` and `negative_prompt_embeds`
        is `negative` (None without CFG); yields the `callback_on_step_end` that advances `step`.

        `encode_prompt` (public) is wrapped on the instance for the call to learn which objects it returns for which
        input; a pre-hook on the transformer (first in line, before anything that rebuilds its arguments) reads the
        branch off the object it receives. Both are removed on exit and the state reads cond / 0 again."""
        if negative is not None and negative is positive:  # one object passed twice: give the negative its own
            negative = negative.detach()                     # identity (a view: no copy)
        encode_prompt = pipe.encode_prompt

        def recording_encode_prompt(*args, **kwargs):
            out = encode_prompt(*args, **kwargs)
            given = kwargs.get("prompt_embeds")
            if given is not None and given is positive:
                self._embeddings["cond"] = out[0]
            elif given is not None and given is negative:
                self._embeddings["uncond"] = out[0]
            return out

        def transformer_pre_hook(module, args, kwargs):
            self.branch = self.branch_of(kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None))

        def step_end(_pipe, i, _t, callback_kwargs):
            self.step = int(i) + 1
            return callback_kwargs

        self.reset()
        self.seeds = list(seeds)
        pipe.encode_prompt = recording_encode_prompt
        handle = pipe.transformer.register_forward_pre_hook(transformer_pre_hook, with_kwargs=True, prepend=True)
        try:
            yield step_end, positive, negative
        finally:
            handle.remove()
            del pipe.encode_prompt  # the class's method again
            self.reset()

    def __repr__(self) -> str:
        return f"DenoiseState(branch={self.branch!r}, step={self.step}, seeds={self.seeds})"


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
def generate(pipe, sampler: Sampler, cond, neg, seed: int, on_step=None, state: DenoiseState | None = None,
             step_dependent: bool = False, session=None) -> np.ndarray:
    """One image [H, W, 3] in [0, 1] for one encoded prompt and seed, through `Krea2Pipeline.__call__`."""
    return generate_many(pipe, sampler, cond, neg, [seed], on_step=on_step, state=state,
                         step_dependent=step_dependent, session=session)[0]


@torch.no_grad()
def generate_many(pipe, sampler: Sampler, cond, neg, seeds: list[int], on_step=None, state: DenoiseState | None = None,
                  step_dependent: bool = False, session=None) -> list[np.ndarray]:
    """Images for one encoded prompt and several seeds, in seed order.

    `state`: the `DenoiseState` that attached interventions and metrics gate on (`InterventionContext.state`); each
    pipeline call binds it. Without one, a fresh state is followed (nothing attached can be reading it).
    The text-path cache stores nothing for a branch while `state` counts an attached edit that declared
    `depends_on_step` there, and is off when `step_dependent=True` (for callers that know more than what is attached).
    `session` records which DiTs this process compiled (default: the process's session)."""
    from .session import current_session

    state = state if state is not None else DenoiseState()
    session = session if session is not None else current_session()
    if not sampler.fast:
        warn_if_eager_on_compiled(pipe.transformer, session)
        return [_pipeline_call(pipe, sampler, cond, neg, [seed], on_step, state)[0] for seed in seeds]
    if sampler.trim_padding:
        cond, neg = trim_padding(cond), trim_padding(neg)
    groups = [list(seeds)] if sampler.batch_seeds else [[s] for s in seeds]
    out = []
    cache_text = sampler.cache_text_path and not step_dependent
    with fast_transformer(pipe.transformer, sampler, cache_text=cache_text, state=state, session=session):
        for group in groups:
            out.extend(_pipeline_call(pipe, sampler, cond, neg, group, on_step, state))
    return out


def _pipeline_call(pipe, sampler: Sampler, cond, neg, seeds: list[int], on_step, state: DenoiseState) -> list[np.ndarray]:
    """One `Krea2Pipeline.__call__` for `len(seeds)` images of one prompt (seed i's noise from its own generator, so
    a batch's latents equal the single-seed ones), followed by `state`."""
    use_cfg = sampler.guidance > 0
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    with state.following(pipe, cond.taps, neg.taps if use_cfg else None, seeds) as (advance, positive, negative):
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
def fast_transformer(transformer, sampler: Sampler, cache_text: bool, state: DenoiseState, session):
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
            cache = TextPathCache(state)
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
        cache, state = self.cache, self.cache.state
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
    """The text-path cache of one `generate_many` call: entries, hit/miss counts, and the state it keys on."""

    def __init__(self, state: DenoiseState | None = None):
        self.state = state if state is not None else DenoiseState()
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
