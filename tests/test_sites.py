"""The site registry: each site declared once, one generic attach for any (site, op, gates), named hooks the session
lists, and the explicit fit step (describe() the same before and after a run)."""

from __future__ import annotations

import pytest
import torch

from krea_sweeps.errors import ConfigError
from krea_sweeps.interventions import (SITES, Ablate, HookRegistry, InterventionContext, Knockout, Op, Site, Solo,
                                       Steer, applied, attach, fit_all, register_site)
from krea_sweeps.prompts import EncodeCache
from krea_sweeps.sampler import Denoising

MSL = 32
PROMPTS = ["a red fox in the snow", "two cups of coffee on a wooden table"]
PAIRS = [["a smiling face", "a neutral face"], ["a happy dog", "a calm dog"]]
ENCODINGS = EncodeCache(None)


def context(model, **kw) -> InterventionContext:
    return InterventionContext(text_path=model.text_path, encode=lambda ps: ENCODINGS.get(model, ps, MSL),
                               denoising=Denoising(), **kw)


def fused(model, ctx, scope):
    enc = ENCODINGS.get(model, PROMPTS, MSL)
    with torch.no_grad(), scope:
        return model.text_path(enc.taps, enc.mask)


class Always:
    @staticmethod
    def active(state) -> bool:
        return True


class Copy(Op):
    name = "copy"

    def states(self, x, call):
        return x.clone()


class ScaleSlot(Op):
    name = "scale_slot"
    needs_slots = True

    def __init__(self, slot: int, factor: float):
        self.slot, self.factor = slot, factor

    def states(self, x, call):
        y = x.clone()
        y[..., self.slot, :] = y[..., self.slot, :] * self.factor
        return y


def test_each_site_is_declared_once():
    assert set(SITES) >= {"taps", "slots", "projector", "fusion_attention", "block", "fused", "refiner_attention",
                          "dit_text", "dit_attention"}
    assert {f for s in SITES.values() for f in s.forms} == {"states", "weight", "key_mask", "processor"}
    with pytest.raises(ValueError, match="already declared"):
        register_site(Site("taps", lambda ctx, i: ctx.text_path.text_fusion, "pre", "states"))


@pytest.mark.parametrize("site", ["taps", "slots", "block", "fused"])
def test_a_copying_op_at_any_states_site_is_bit_identical_and_leaves_nothing(turbo, site):
    ctx = context(turbo)
    stock = fused(turbo, ctx, torch.no_grad())
    assert torch.equal(fused(turbo, ctx, attach(site, Copy(), Always(), ctx)), stock)
    assert ctx.hooks.names() == []
    tf = turbo.text_path.text_fusion
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tf.modules())


def test_one_op_at_taps_and_at_slots_matches_the_direct_computation(turbo):
    """Slot 6 × 2 at the taps is the text path on hand-scaled taps; at the slots (after the layerwise blocks) it is
    the projector with w_6 doubled (up to float rounding): the site's layout conversion puts the slot axis right."""
    ctx = context(turbo)
    enc = ENCODINGS.get(turbo, PROMPTS, MSL)
    taps = enc.taps.clone()
    taps[:, :, 6] *= 2.0
    with torch.no_grad():
        direct = turbo.text_path(taps, enc.mask)
    assert torch.equal(fused(turbo, ctx, attach("taps", ScaleSlot(6, 2.0), Always(), ctx)), direct)
    gains = [2.0 if k == 6 else 1.0 for k in range(12)]
    from krea_sweeps.interventions import Rebalance

    weight_edit = fused(turbo, ctx, applied([Rebalance(gains=gains)], ctx))
    at_slots = fused(turbo, ctx, attach("slots", ScaleSlot(6, 2.0), Always(), ctx))
    assert torch.allclose(at_slots, weight_edit, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(at_slots, fused(turbo, ctx, torch.no_grad()), atol=1e-4)


def test_a_site_that_does_not_take_the_op_is_one_clear_line():
    with pytest.raises(ConfigError) as info:
        Steer(pairs=PAIRS, site="projector")
    assert info.value.key == "intervention.site" and "taps, slots, block, fused" in str(info.value)
    with pytest.raises(ConfigError) as info:
        Solo(slot=1, strength=0.5, site="fusion_attention")
    assert info.value.key == "intervention.site" and "hide or keep" in str(info.value)
    with pytest.raises(ConfigError) as info:  # slot-addressing op at a site without slots
        attach("fused", ScaleSlot(0, 2.0), Always(), InterventionContext()).__enter__()
    assert "has none" in str(info.value)


def test_gates_are_read_from_the_generation_state(turbo):
    ctx = context(turbo)
    solo = Solo(slot=6, steps=[1, 3])
    assert solo.depends_on_step and not Solo(slot=6).depends_on_step
    stock = fused(turbo, ctx, torch.no_grad())
    for branch, step, edited in [("cond", 0, False), ("cond", 1, True), ("cond", 3, False), ("uncond", 1, False)]:
        with ctx.denoising.at(branch, step):
            out = fused(turbo, ctx, applied([solo], ctx))
        assert torch.equal(out, stock) != edited, (branch, step)


def test_the_session_lists_the_attached_hooks_by_name(turbo):
    hooks = HookRegistry()
    ctx = context(turbo, hooks=hooks)
    solo, knockout = Solo(slot=6), Knockout(keys=["L20"], blocks=[0, 1])
    knockout.config_key = "interventions[0]"  # as plan sets it for a list entry
    seen = []
    tf = turbo.text_path.text_fusion
    handle = tf.register_forward_hook(lambda m, a, o: seen.append(hooks.names()))
    try:
        fused(turbo, ctx, applied([solo, knockout], ctx))
    finally:
        handle.remove()
    assert seen[0] == ["intervention: gains @ projector", "interventions[0]: key_mask @ fusion_attention[0]",
                       "interventions[0]: key_mask @ fusion_attention[1]"]
    assert hooks.names() == []


def test_fit_is_explicit_and_describe_is_the_same_before_and_after(turbo):
    ctx = context(turbo)
    steer, ablate = Steer(pairs=PAIRS, site="slots"), Ablate(mode="mean", targets=[6])
    before = [steer.describe(), ablate.describe()]
    assert steer.fitted() is None and ablate.fitted() is None
    records = fit_all([steer, ablate], ctx)
    reference = ENCODINGS.get(turbo, ablate.reference_prompts, MSL)
    assert set(records[0]) == {"consistency", "direction_norm"}
    assert records[1] == {"reference_tokens": int(reference.mask.sum())}
    fused(turbo, ctx, applied([steer, ablate], ctx))
    assert [steer.describe(), ablate.describe()] == before
    assert steer.fitted() is records[0]  # fitted once: attaching did not learn again


def _attached_while_the_dit_runs(job, session) -> tuple[dict, list[list[str]]]:
    """Run `job`; its record, and what the session lists as attached at each forward of the job's transformer."""
    from krea_sweeps.models import LoadedModel
    from krea_sweeps.task import execute

    transformer = LoadedModel(job.variant, session.models).transformer  # the one the job's pipeline uses
    seen = []
    handle = transformer.register_forward_pre_hook(lambda m, a: seen.append(session.attached()))
    try:
        return execute(job, session).record, seen
    finally:
        handle.remove()


def test_during_a_job_the_session_names_each_site_and_op_and_after_it_nothing(session, tmp_path, monkeypatch):
    from conftest import compose

    from krea_sweeps.plan import plan

    monkeypatch.chdir(tmp_path)
    job = plan(compose(["wandb.mode=disabled", "model=turbo", "sampler.steps=2", f"sampler.max_sequence_length={MSL}",
                        "intervention=solo", "intervention.slot=6", "prompts.prompts=[a red fox in the snow]",
                        "interventions=[{_target_: krea_sweeps.interventions.Steer, site: fused, "
                        "pairs: [[a smiling face, a neutral face]]}]"]))
    record, seen = _attached_while_the_dit_runs(job, session)
    assert seen and all(names == ["intervention: gains @ projector", "interventions[0]: steer @ fused"]
                        for names in seen)
    assert session.attached() == []
    assert record["fitted"][1]["consistency"] is None  # one pair: no pairwise consistency
    assert record["interventions"] == [i.describe() for i in job.interventions]


# ---------------------------------------------------------------------------------------------------- DiT sites
def dit_text(model, ctx, scope, prompts=PROMPTS):
    """The DiT's text tokens [B, T, D_dit] for `prompts`: text_fusion then txt_in, as the transformer runs them."""
    enc = ENCODINGS.get(model, prompts, MSL)
    with torch.no_grad(), scope:
        return model.text_path.txt_in(model.text_path(enc.taps, enc.mask))


def test_a_copying_op_at_dit_text_is_bit_identical_and_leaves_nothing(turbo):
    ctx = context(turbo)
    stock = dit_text(turbo, ctx, torch.no_grad())
    assert stock.dim() == 3  # [B, T, D_dit]: no slot axis
    assert torch.equal(dit_text(turbo, ctx, attach("dit_text", Copy(), Always(), ctx)), stock)
    assert ctx.hooks.names() == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in turbo.text_path.modules())


def test_steer_add_at_dit_text_is_the_hand_computed_edit_and_undo_is_exact(turbo, tmp_path):
    """An existing op (steer, mode=add) at the DiT's text tokens: the DiT receives txt_in's output + s·d̂, computed
    here without any hook; strength 0 is bit-identical; after detaching the tokens are the stock ones bit for bit."""
    import numpy as np

    ctx = context(turbo)
    stock = dit_text(turbo, ctx, torch.no_grad())
    d = np.random.default_rng(0).standard_normal(stock.shape[-1]).astype(np.float32)
    np.save(tmp_path / "d.npy", d)
    steer = Steer(site="dit_text", mode="add", strength=0.5, direction_file=str(tmp_path / "d.npy"))
    got = dit_text(turbo, ctx, applied([steer], ctx))
    d_hat = torch.from_numpy(d).double()
    d_hat = (d_hat / d_hat.norm()).float()
    assert torch.equal(got, stock + 0.5 * d_hat) and not torch.equal(got, stock)
    identity = Steer(site="dit_text", mode="add", strength=0.0, direction_file=str(tmp_path / "d.npy"))
    assert torch.equal(dit_text(turbo, ctx, applied([identity], ctx)), stock)
    assert torch.equal(dit_text(turbo, ctx, torch.no_grad()), stock)  # undo: exact
    assert ctx.hooks.names() == []


def test_steer_pairs_at_dit_text_learn_in_the_dit_text_space(turbo):
    """Fitting at dit_text captures txt_in's output (text_fusion then txt_in): the direction is the difference of the
    pairs' token-pooled DiT text tokens, recomputed here from the modules directly."""
    from krea_sweeps.interventions.sites import pool_tokens

    ctx = context(turbo)
    steer = Steer(site="dit_text", pairs=PAIRS)
    direction = steer.direction(ctx)

    def pooled(prompts):
        enc = ENCODINGS.get(turbo, prompts, MSL)
        return pool_tokens(dit_text(turbo, ctx, torch.no_grad(), prompts), enc.mask)

    expected = (pooled([a for a, _ in PAIRS]) - pooled([b for _, b in PAIRS])).mean(0).float()
    assert direction.shape == expected.shape and torch.allclose(direction, expected, rtol=1e-6, atol=1e-7)


class ZeroAttention(Op):
    """Edits attention itself: the block's attention output is zeroed (its processor still runs)."""

    name = "zero_attention"

    def processor(self, inner, index):
        return lambda attn, *args, **kwargs: inner(attn, *args, **kwargs) * 0


class ReadAttention(Op):
    name = "read_attention"

    def __init__(self):
        self.seen = []

    def processor(self, inner, index):
        def run(attn, *args, **kwargs):
            out = inner(attn, *args, **kwargs)
            self.seen.append((index, out.shape))
            return out
        return run


def test_a_processor_op_at_dit_attention_reads_or_edits_and_undo_is_exact(turbo):
    """The joint attention of DiT block i, addressed by block index: a reading op leaves the image bit-identical, an
    editing op at block 1 changes it, and after detaching the processors are the very same objects again."""
    import numpy as np

    from krea_sweeps.sampler import Sampler, generate

    pipe = turbo.pipeline()
    sampler = Sampler(steps=2, max_sequence_length=MSL).resolved(turbo.variant)
    cond, neg = ENCODINGS.get(turbo, PROMPTS[:1], MSL), ENCODINGS.get(turbo, [""], MSL)
    ctx = context(turbo, transformer=turbo.transformer)
    processors = [b.attn.processor for b in turbo.transformer.transformer_blocks]

    def image(scope):
        with scope:
            return generate(pipe, sampler, cond, neg, 0, denoising=ctx.denoising)

    stock = image(torch.no_grad())
    read = ReadAttention()
    assert np.array_equal(image(attach("dit_attention", read, Always(), ctx)), stock)
    assert sorted({i for i, _ in read.seen}) == list(range(len(processors)))  # default: every DiT block
    assert not np.array_equal(image(attach("dit_attention", ZeroAttention(), Always(), ctx, at=[1])), stock)
    assert [b.attn.processor for b in turbo.transformer.transformer_blocks] == processors
    assert np.array_equal(image(torch.no_grad()), stock)
    with pytest.raises(ConfigError, match="intervention.blocks"):
        attach("dit_attention", read, Always(), ctx, at=[len(processors)]).__enter__()
    with pytest.raises(ConfigError, match="intervention.site"):
        attach("dit_attention", read, Always(), context(turbo)).__enter__()  # no transformer in the context
    with pytest.raises(ConfigError, match="use one of"):
        attach("dit_text", ReadAttention(), Always(), ctx).__enter__()  # a processor op at a states site


def _job_with(session, tmp_path, monkeypatch, overrides):
    from conftest import compose

    from krea_sweeps.plan import plan

    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return plan(compose(["wandb.mode=disabled", "model=turbo", "sampler.steps=2", f"sampler.max_sequence_length={MSL}",
                         "prompts.prompts=[a red fox in the snow]", *overrides]))


def test_steer_at_dit_text_from_config_is_named_during_the_job_and_moves_the_image(session, tmp_path, monkeypatch):
    """`intervention.site=dit_text` from the command line: installed by the generic attach (named in the session while
    the DiT runs), recorded with its site; strength 0 gives the stock image statistics, strength 4 others."""
    summaries = {}
    for strength in (0.0, 4.0):
        job = _job_with(session, tmp_path / str(strength), monkeypatch,
                        ["intervention=steer", "intervention.site=dit_text", "intervention.mode=add",
                         f"intervention.strength={strength}", "intervention.pairs=[[a smiling face, a neutral face]]"])
        record, seen = _attached_while_the_dit_runs(job, session)
        assert record["interventions"][0]["site"] == "dit_text"
        assert all(names == ([] if strength == 0 else ["intervention: steer @ dit_text"]) for names in seen)
        assert seen or strength == 0  # strength 0 is the stock job: its images may come from the stock-image cache
        summaries[strength] = record["summary"]
    assert session.attached() == []
    key = "image_stats/sharpness"
    assert key in summaries[0.0] and summaries[0.0][key] != summaries[4.0][key]


def test_map_metric_probes_are_named_hooks_at_dit_attention_during_the_job(session, tmp_path, monkeypatch):
    """word_maps records through a read-only op at dit_attention (one per DiT block), listed by the session while the
    DiT runs and gone after the job."""
    from krea_sweeps.models import LoadedModel

    job = _job_with(session, tmp_path, monkeypatch, ["metrics=[word_maps]", "sampler.fast=false", "intervention=solo",
                                                     "intervention.slot=6"])  # its own images: never from a cache
    _, seen = _attached_while_the_dit_runs(job, session)
    blocks = len(LoadedModel(job.variant, session.models).transformer.transformer_blocks)
    probes = [f"metrics.word_maps: word_maps @ dit_attention[{i}]" for i in range(blocks)]
    assert any(names == ["intervention: gains @ projector", *probes] for names in seen)
    assert session.attached() == []


@pytest.mark.parametrize("synthetic_weights", ["random", "toy"])
def test_a_direction_of_the_wrong_width_at_dit_text_is_one_line_before_any_load(tmp_path, monkeypatch, no_loads,
                                                                               synthetic_weights):
    """At dit_text a steer direction has the DiT's width (heads × head dim, read from the config): another width (the
    encoder's, on the toy) is refused at plan time, naming the key, and the DiT's is accepted — nothing loaded."""
    import numpy as np

    from krea_sweeps.synthetic import TEXT_DIM

    from conftest import compose

    from krea_sweeps.plan import _widths, plan

    monkeypatch.chdir(tmp_path)
    overrides = [f"model/synthetic_weights={synthetic_weights}", "intervention=steer", "intervention.site=dit_text",
                 "intervention.mode=add"]
    dit_dim = _widths(plan(compose(["wandb.mode=disabled", *overrides[:2]])).variant)["dit_dim"]
    assert dit_dim != TEXT_DIM or synthetic_weights == "random"  # the random model's DiT is as wide as its encoder
    wrong = [dit_dim + 8] + ([TEXT_DIM] if TEXT_DIM != dit_dim else [])  # the encoder's width, where it differs
    for width, ok in [*((w, False) for w in wrong), (dit_dim, True)]:
        np.save(tmp_path / f"d{width}.npy", np.ones(width, dtype=np.float32))
        args = ["wandb.mode=disabled", *overrides, f"intervention.direction_file={tmp_path / f'd{width}.npy'}"]
        if ok:
            assert plan(compose(args)).interventions[0].site == "dit_text"
        else:
            with pytest.raises(ConfigError, match="DiT hidden size") as info:
                plan(compose(args))
            assert info.value.key == "intervention.direction_file"
    assert no_loads == []
