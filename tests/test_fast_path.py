"""The fast generation path gives the eager path's images (float32, synthetic Krea 2) and does less work.

Tolerance: images are in [0, 1]; trimming and batching change only matmul shapes, measured max |Δ| ≈ 1.5e-6, so
`ATOL = 1e-4` leaves headroom without hiding a real difference (an intervention moves pixels by > 1e-2). The text-path
cache alone is bit-exact. Timings live in bench/, never here.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from krea_sweeps.interventions import Intervention, InterventionContext, applied
from krea_sweeps.models import TextPath
from krea_sweeps.prompts import encode
from krea_sweeps.sampler import Denoising, Sampler, TextPathCache, generate, generate_many, trim_padding

ATOL = 1e-4
SEQ = 64  # short padding keeps the eager reference quick; trimming still drops most of it


@dataclass
class ProjectorOneHot(Intervention):
    """Test-local stand-in for a projector "solo": w' = w_k·e_k at forward time, gated by branch and step window."""

    slot: int = 3
    kind: ClassVar[str] = "test_projector_one_hot"

    @contextmanager
    def attach(self, ctx: InterventionContext):
        def hook(module, args, output):
            if not self.active(ctx.state):
                return None
            w = torch.zeros_like(module.weight)
            w[0, self.slot] = module.weight[0, self.slot]
            return F.linear(args[0], w)

        handle = ctx.text_path.text_fusion.projector.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def _setup(model, steps=3):
    pipe = model.pipeline()
    layers = tuple(model.variant.select_layers)
    cond = encode(model.tokenizer, model.text_encoder, ["a red fox in fresh snow"], SEQ, layers)
    neg = encode(model.tokenizer, model.text_encoder, ["blurry"], SEQ, layers)
    eager = Sampler(steps=steps, max_sequence_length=SEQ).resolved(model.variant)
    return pipe, cond, neg, eager


def _fast(eager: Sampler, **levers) -> Sampler:
    from dataclasses import replace

    return replace(eager, fast=True, **levers)


@contextmanager
def _intervened(pipe, interventions, steps):
    ctx = InterventionContext(text_path=TextPath.of(pipe.transformer), num_steps=steps)
    with applied(interventions, ctx):
        yield ctx.denoising


@contextmanager
def _count_calls(module, state):
    calls = []
    handle = module.register_forward_hook(lambda m, a, o: calls.append((state.branch, state.step)))
    try:
        yield calls
    finally:
        handle.remove()


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ------------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("variant", ["turbo", "raw"])  # raw: CFG, cond and negative of different trimmed lengths
def test_fast_path_equals_eager_without_intervention(variant, request):
    pipe, cond, neg, eager = _setup(request.getfixturevalue(variant))
    ref = generate(pipe, eager, cond, neg, seed=3, denoising=Denoising())
    fast = generate(pipe, _fast(eager), cond, neg, seed=3, denoising=Denoising())
    trimmed_only = generate(pipe, _fast(eager, cache_text_path=False), cond, neg, seed=3, denoising=Denoising())
    assert _max_diff(fast, ref) < ATOL
    assert np.array_equal(fast, trimmed_only)  # the cache is bit-exact: same calls, reused


@pytest.mark.parametrize("steps_window", [None, [1, 3]])
def test_fast_path_equals_eager_with_a_gated_intervention(raw, steps_window):
    """Raw has CFG: the edit applies to the positive branch only (and, with a window, to steps 1–2 only)."""
    pipe, cond, neg, eager = _setup(raw)
    stock = generate(pipe, eager, cond, neg, seed=1, denoising=Denoising())
    solo = ProjectorOneHot(apply_to="cond", steps=steps_window)
    with _intervened(pipe, [solo], eager.steps) as state:
        ref = generate(pipe, eager, cond, neg, seed=1, denoising=state)
        fast = generate(pipe, _fast(eager), cond, neg, seed=1, denoising=state)  # the window is declared: no caching
        flagged = generate(pipe, _fast(eager), cond, neg, seed=1, denoising=state, step_dependent=True)
    assert _max_diff(ref, stock) > 1e-2  # the intervention does something
    assert _max_diff(fast, ref) < ATOL
    assert np.array_equal(fast, flagged)
    assert np.array_equal(generate(pipe, eager, cond, neg, seed=1, denoising=Denoising()), stock)  # detached exactly


def test_batched_seeds_equal_one_call_per_seed(turbo):
    pipe, cond, neg, eager = _setup(turbo)
    singles = [generate(pipe, eager, cond, neg, seed=s, denoising=Denoising()) for s in (0, 1, 2)]
    batched = generate_many(pipe, _fast(eager, batch_seeds=True), cond, neg, [0, 1, 2], denoising=Denoising())
    assert len(batched) == 3 and all(_max_diff(b, s) < ATOL for b, s in zip(batched, singles))
    assert _max_diff(batched[0], batched[1]) > 1e-2  # each seed kept its own noise


# ------------------------------------------------------------------------------------------------ less work
@pytest.mark.parametrize("variant, per_image", [("turbo", 1), ("raw", 2)])  # once per image and CFG branch
def test_text_path_runs_once_per_image_when_cached(variant, per_image, request):
    pipe, cond, neg, eager = _setup(request.getfixturevalue(variant), steps=4)
    state = Denoising()
    with _count_calls(pipe.transformer.text_fusion.projector, state) as eager_calls:
        generate(pipe, eager, cond, neg, seed=0, denoising=state)
    with _count_calls(pipe.transformer.text_fusion.projector, state) as fast_calls:
        generate_many(pipe, _fast(eager), cond, neg, [0, 1], denoising=state)
    with _count_calls(pipe.transformer.text_fusion.projector, state) as batch_calls:
        generate_many(pipe, _fast(eager, batch_seeds=True), cond, neg, [0, 1], denoising=state)
    assert len(eager_calls) == 4 * per_image
    assert len(fast_calls) == 2 * per_image and {s for _, s in fast_calls} == {0}
    assert len(batch_calls) == per_image


def test_a_step_window_bypasses_the_cache(raw):
    pipe, cond, neg, eager = _setup(raw, steps=4)
    with _intervened(pipe, [ProjectorOneHot(apply_to="cond", steps=[1, 2])], eager.steps) as state:
        with _count_calls(pipe.transformer.text_fusion.projector, state) as calls:
            generate(pipe, _fast(eager), cond, neg, seed=0, denoising=state)
    cond_calls = [s for b, s in calls if b == "cond"]
    assert cond_calls == [0, 1, 2, 3]  # the branch with a declared step window recomputed every step
    assert [s for b, s in calls if b == "uncond"] == [0]  # the untouched branch still cached


def test_fast_path_leaves_no_hooks_behind(raw):
    pipe, cond, neg, eager = _setup(raw, steps=2)
    tf = pipe.transformer.text_fusion
    before = (len(pipe.transformer._forward_pre_hooks), len(tf._forward_pre_hooks), len(tf._forward_hooks))
    generate(pipe, _fast(eager), cond, neg, seed=0, denoising=Denoising())
    after = (len(pipe.transformer._forward_pre_hooks), len(tf._forward_pre_hooks), len(tf._forward_hooks))
    assert before == after
    assert pipe.transformer.text_fusion is tf and pipe.transformer.get_submodule("txt_in") is pipe.transformer.txt_in
    assert not any(type(m).__name__ == "CachedTextModule" for m in pipe.transformer.modules())
    assert "encode_prompt" not in pipe.__dict__  # the pipeline's own method again
    assert "forward" not in tf.__dict__ and "forward" not in pipe.transformer.txt_in.__dict__
    assert "_call_impl" not in tf.__dict__ and "_call_impl" not in pipe.transformer.txt_in.__dict__


def test_trim_padding_keeps_only_valid_tokens(turbo):
    _, cond, _, _ = _setup(turbo)
    trimmed = trim_padding(cond)
    assert trimmed.mask.all() and trimmed.taps.shape[1] == int(cond.mask.sum())
    assert torch.equal(trimmed.taps[0], cond.taps[0][cond.mask[0]])


def test_text_path_cache_drops_an_entry_edited_in_place():
    """A forward hook's in-place edit is part of the stored output (applied once, not again per hit); an output its
    consumer edits in place afterwards is not reused."""
    lin = torch.nn.Linear(2, 2)
    lin.register_forward_hook(lambda m, a, o: o.add_(1.0))
    parent = torch.nn.Sequential(lin)
    x = torch.ones(1, 2)
    with torch.no_grad():
        eager = lin(x)
        with TextPathCache(Denoising()).wrapping(parent, "0") as cache:
            first = parent(x)
            second = parent(x)
            assert second is first and torch.equal(first, eager) and cache.hits == 1
            second.mul_(0.0)  # the consumer edits the cached tensor in place
            third = parent(x)
    assert torch.equal(third, eager) and cache.misses == 2
    assert parent[0] is lin  # the very module put back


# ------------------------------------------------------------------------------------------------ config
def test_sampler_config_defaults_to_the_fast_path_and_opts_out():
    from conftest import compose

    from krea_sweeps.errors import ConfigError
    from krea_sweeps.plan import instantiate

    fast = instantiate(compose().sampler, "sampler")
    eager = instantiate(compose(["sampler.fast=false"]).sampler, "sampler")
    assert fast.fast and fast.trim_padding and fast.cache_text_path and fast.compile == "auto"
    assert not eager.fast and eager.identity() != fast.identity()  # separate baseline caches
    with pytest.raises(ConfigError, match="sampler.compile"):
        instantiate(compose(["sampler.compile=sometimes"]).sampler, "sampler")


# ------------------------------------------------------------------------------------------------ real interventions
def _real_interventions():
    """One of each kind that acts before the projector, where padding and batching change the tensors' shapes."""
    from krea_sweeps.interventions import Ablate, Knockout, Solo, Steer

    pairs = [["a smiling face", "a neutral face"], ["a happy dog", "a calm dog"]]
    return {
        "solo_taps": lambda: Solo(slot=2, site="taps"),
        "ablate_noise_taps": lambda: Ablate(mode="noise", targets=[0, "L20"], seed=5),
        "ablate_noise_slots": lambda: Ablate(site="slots", mode="noise", targets=["L20"], seed=2),
        "ablate_mean_slots": lambda: Ablate(site="slots", mode="mean", targets=["L20"],
                                            reference_prompts=["a quiet harbour", "a city street at night"]),
        "steer_add": lambda: Steer(pairs=pairs, mode="add", strength=4.0),
        "knockout": lambda: Knockout(keys=["L2", "L20", "L35"]),
    }


@pytest.mark.parametrize("name", list(_real_interventions()))
def test_fast_path_equals_eager_with_real_interventions(raw, name):
    """Trimmed and batched (2 seeds in one call) generations equal the eager, padded, one-seed-per-call ones with the
    real classes attached — Ablate's noise included, which is drawn per valid-token rank, not per padded shape."""
    pipe, cond, neg, eager = _setup(raw)
    layers = tuple(raw.variant.select_layers)
    ctx = InterventionContext(text_path=TextPath.of(pipe.transformer), num_steps=eager.steps,
                              encode=lambda ps: encode(raw.tokenizer, raw.text_encoder, ps, SEQ, layers))
    stock = generate(pipe, eager, cond, neg, seed=1, denoising=Denoising())
    with applied([_real_interventions()[name]()], ctx):
        ref = generate_many(pipe, eager, cond, neg, [1, 2], denoising=ctx.denoising)
        trimmed = generate_many(pipe, _fast(eager), cond, neg, [1, 2], denoising=ctx.denoising)
        batched = generate_many(pipe, _fast(eager, batch_seeds=True), cond, neg, [1, 2], denoising=ctx.denoising)
    assert _max_diff(ref[0], stock) > 1e-2  # the intervention does something
    for fast in (trimmed, batched):
        assert len(fast) == 2 and all(_max_diff(f, r) < ATOL for f, r in zip(fast, ref)), name


# ------------------------------------------------------------------------------------------------ review fixes
@dataclass
class TapsEditStandIn(Intervention):
    """Test-local stand-in for a taps-site edit (tap_scale, solo@taps, ablate@taps, steer@taps): a `text_fusion`
    pre-hook that returns a new tensor on every call."""

    kind: ClassVar[str] = "test_taps_reversed"

    @contextmanager
    def attach(self, ctx: InterventionContext):
        def hook(module, args, kwargs):  # the 12 taps in reverse layer order: a large, deterministic edit
            if not self.active(ctx.state):
                return None
            return (args[0].flip(2), *args[1:]), kwargs

        handle = ctx.text_path.text_fusion.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def test_a_taps_pre_hook_keeps_the_text_path_once_per_image_and_branch(raw):
    """The cache is keyed on the tensor the transformer passed, before text_fusion's own hooks make a new one (Raw:
    CFG, so two branches per image)."""
    pipe, cond, neg, eager = _setup(raw, steps=3)
    stock = generate(pipe, eager, cond, neg, seed=0, denoising=Denoising())
    with _intervened(pipe, [TapsEditStandIn(apply_to="both")], eager.steps) as state:
        ref = generate(pipe, eager, cond, neg, seed=0, denoising=state)
        with _count_calls(pipe.transformer.text_fusion.projector, state) as calls:
            fast = generate_many(pipe, _fast(eager), cond, neg, [0, 1], denoising=state)
    assert _max_diff(ref, stock) > 1e-2  # the stand-in does something
    assert sorted(calls) == [("cond", 0), ("cond", 0), ("uncond", 0), ("uncond", 0)]  # 2 images × 2 branches
    assert _max_diff(fast[0], ref) < ATOL


def test_eager_call_on_compiled_blocks_warns_and_says_so(turbo, caplog):
    """`sampler.fast=false` after the blocks were compiled in this process is not diffusers' eager call: warned once,
    and reported by `runs_compiled` (which keys the stock images and is recorded per job). What was compiled is the
    session's record; nothing is written on the model."""
    from krea_sweeps.sampler import blocks_compiled, compile_blocks, runs_compiled
    from krea_sweeps.session import Session

    session = Session()
    pipe, cond, neg, eager = _setup(turbo, steps=1)
    before = set(pipe.transformer.__dict__)
    assert not blocks_compiled(pipe.transformer, session) and not runs_compiled(eager, pipe.transformer, session)
    try:
        # a real torch.compile of the repeated blocks; the eager backend needs no C++ toolchain
        assert compile_blocks(pipe.transformer, session, backend="eager")
        assert not compile_blocks(pipe.transformer, session, backend="eager")  # once per transformer
        assert blocks_compiled(pipe.transformer, session) and runs_compiled(eager, pipe.transformer, session)
        assert not blocks_compiled(pipe.transformer, Session())  # another session did not compile it
        with caplog.at_level("WARNING", logger="krea_sweeps.sampler"):
            generate(pipe, eager, cond, neg, seed=0, session=session, denoising=Denoising())
            generate(pipe, eager, cond, neg, seed=0, session=session, denoising=Denoising())
    finally:
        for block in pipe.transformer.transformer_blocks:  # leave the shared transformer as it was (test-only poke)
            block._compiled_call_impl = None
        torch._dynamo.reset()
    assert caplog.text.count("compiled earlier in this process") == 1
    assert set(pipe.transformer.__dict__) == before  # no bookkeeping attributes on the model


# ------------------------------------------------------------------------------------------------ declared step use
@dataclass
class PerCallDrift(Intervention):
    """Test-local stateful edit that changes on every call without a step window: adds `0.5 · calls` to the fused
    features. It varies per call, so it must declare `depends_on_step` or the cache would freeze its first output."""

    declared: bool = True
    kind: ClassVar[str] = "test_per_call_drift"

    @property
    def depends_on_step(self) -> bool:
        return self.declared

    @contextmanager
    def attach(self, ctx: InterventionContext):
        calls = [0]

        def hook(module, args, output):
            if not self.active(ctx.state):
                return None
            calls[0] += 1
            return output + 0.5 * calls[0]

        handle = ctx.text_path.text_fusion.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def test_a_declared_per_call_edit_is_not_frozen_by_the_cache(turbo):
    """Fresh attach per generation (its counter restarts): declared ⇒ the fast path equals the eager path; the same
    edit undeclared is frozen at its first call — the declaration, not a guess, is what turns the cache off."""
    pipe, cond, neg, eager = _setup(turbo, steps=3)
    stock = generate(pipe, eager, cond, neg, seed=0, denoising=Denoising())
    runs = {}
    for label, sampler, declared in [("eager", eager, True), ("fast", _fast(eager), True),
                                     ("fast_undeclared", _fast(eager), False)]:
        with _intervened(pipe, [PerCallDrift(declared=declared)], eager.steps) as state:
            runs[label] = generate(pipe, sampler, cond, neg, seed=0, denoising=state)
    assert _max_diff(runs["eager"], stock) > 1e-2
    assert _max_diff(runs["fast"], runs["eager"]) < ATOL
    assert _max_diff(runs["fast_undeclared"], runs["eager"]) > 1e-3  # frozen: what declaring prevents


def test_identity_through_the_cache_is_bit_identical(raw):
    """The cache wrapper changes nothing: with an identity edit attached (a step window too, so the cache is off for
    the cond branch only), cached and uncached fast images are bit-identical, and equal the stock fast image."""
    from krea_sweeps.interventions import TapScale

    pipe, cond, neg, eager = _setup(raw, steps=2)
    stock = generate(pipe, _fast(eager), cond, neg, seed=2, denoising=Denoising())
    for steps in (None, [1, 2]):
        with _intervened(pipe, [TapScale(gains=[1.0] * 12, steps=steps)], eager.steps) as state:
            cached = generate(pipe, _fast(eager), cond, neg, seed=2, denoising=state)
            uncached = generate(pipe, _fast(eager, cache_text_path=False), cond, neg, seed=2, denoising=state)
        assert np.array_equal(cached, uncached) and np.array_equal(cached, stock), steps
