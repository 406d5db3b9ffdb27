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
    assert set(SITES) >= {"taps", "slots", "projector", "fusion_attention", "block", "fused"}
    assert {s.form for s in SITES.values()} == {"states", "weight", "key_mask"}
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


def test_during_a_job_the_session_names_each_site_and_op_and_after_it_nothing(session, tmp_path, monkeypatch):
    from conftest import compose

    from krea_sweeps.models import LoadedModel
    from krea_sweeps.plan import plan
    from krea_sweeps.task import execute

    monkeypatch.chdir(tmp_path)
    job = plan(compose(["wandb.mode=disabled", "model=turbo", "sampler.steps=2", f"sampler.max_sequence_length={MSL}",
                        "intervention=solo", "intervention.slot=6", "prompts.prompts=[a red fox in the snow]",
                        "interventions=[{_target_: krea_sweeps.interventions.Steer, site: fused, "
                        "pairs: [[a smiling face, a neutral face]]}]"]))
    transformer = LoadedModel(job.variant, session.models).transformer  # the one the job's pipeline uses
    seen = []
    handle = transformer.register_forward_pre_hook(lambda m, a: seen.append(session.attached()))
    try:
        record = execute(job, session).record
    finally:
        handle.remove()
    assert seen and all(names == ["intervention: gains @ projector", "interventions[0]: steer @ fused"]
                        for names in seen)
    assert session.attached() == []
    assert record["fitted"][1]["consistency"] is None  # one pair: no pairwise consistency
    assert record["interventions"] == [i.describe() for i in job.interventions]
