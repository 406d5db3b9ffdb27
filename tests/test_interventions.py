"""Interventions on the synthetic Krea 2: exactness (identity, removal), equivalences between sites, gating by CFG
branch and step, bad input. Conditioning-only checks go through `TextPath`; generations are 64², 2 steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from krea_sweeps.errors import ConfigError
from krea_sweeps.interventions import (Ablate, InterventionContext, Knockout, LeaveOneOut, Rebalance, Solo, Steer,
                                       TapScale, applied)
from krea_sweeps.prompts import EncodeCache
from krea_sweeps.sampler import Denoising

MSL = 32
PROMPTS = ["a red fox in the snow", "two cups of coffee on a wooden table"]
PAIRS = [["a smiling face", "a neutral face"], ["a happy dog", "a calm dog"], ["a laughing child", "a quiet child"]]
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")


ENCODINGS = EncodeCache(None)  # in memory only, shared by this module's tests


def encode(model, prompts):
    return ENCODINGS.get(model, prompts, MSL)


def context(model, denoising: Denoising | None = None, **kw) -> InterventionContext:
    return InterventionContext(text_path=model.text_path, encode=lambda ps: encode(model, ps), num_steps=8,
                               denoising=denoising or Denoising(), **kw)


def fused(model, ctx=None, interventions=(), enc=None):
    enc = enc or encode(model, PROMPTS)
    with torch.no_grad(), applied(list(interventions), ctx or context(model)):
        return model.text_path(enc.taps, enc.mask)


def snapshot(module: torch.nn.Module) -> dict:
    """Every parameter value, hook dict and attention processor under `module`."""
    return {
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "hooks": {n: tuple(tuple(getattr(m, d).keys()) for d in HOOK_DICTS) for n, m in module.named_modules()},
        "processors": {n: m.processor for n, m in module.named_modules() if hasattr(m, "processor")},
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["hooks"] == b["hooks"]
    assert all(a["processors"][n] is b["processors"][n] for n in a["processors"])
    assert a["params"].keys() == b["params"].keys()
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])


def close(a, b, tol=1e-6) -> bool:
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def direction_file(tmp_path, shape=(12, 32)) -> str:
    path = tmp_path / f"d{'x'.join(map(str, shape))}.npy"  # one file per shape
    np.save(path, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    return str(path)


# ------------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("model", ["turbo", "toy_turbo"])  # the random-weight and the trained toy model
def test_identity_settings_are_bit_identical_to_none(model, tmp_path, request):
    from krea_sweeps.export import write_diff

    turbo = request.getfixturevalue(model)
    from krea_sweeps.interventions import LoraFile

    stock = fused(turbo)
    diff_file = write_diff(tmp_path / "solo.safetensors", turbo.text_path.text_fusion.projector.weight,
                           [1.0 if i == 3 else 0.0 for i in range(12)], {})
    identities = [
        Rebalance(gains=[1.0] * 12), Rebalance(preset="uniform", renorm="rms"), Rebalance(strength=0.0),
        Rebalance(strength=0.0, site="slots"), Rebalance(strength=0.0, site="taps"),
        Solo(slot=3, strength=0.0), LeaveOneOut(layer=20, strength=0.0),
        TapScale(), TapScale(multiplier=1.0, renorm="rms"),
        Steer(direction_file=direction_file(tmp_path), mode="amplify", strength=0.0),
        Steer(pairs=PAIRS, mode="add", strength=0.0, site="slots"),
        Knockout(keys=[]), Ablate(targets=[]), LoraFile(path=str(diff_file), strength=0.0),
    ]
    for intervention in identities:
        assert intervention.is_identity, intervention
        assert torch.equal(fused(turbo, interventions=[intervention]), stock), intervention.describe()


def every_kind(tmp_path):
    return [
        Solo(slot=6), Solo(slot=2, site="taps"), Solo(layer=35, site="fusion_attention"), LeaveOneOut(slot="L20"),
        Rebalance(preset="deep_boost", renorm="rms"), Rebalance(gains=[0.5] * 12, site="slots"),
        TapScale(multiplier=1.5, renorm="rms"), Knockout(keys=["L20"], blocks=[0]),
        Ablate(site="slots", mode="mean", targets=[1, "L20"]), Ablate(mode="resample", targets=[4]),
        Ablate(mode="noise", targets=[0, 11], seed=3),
        Steer(pairs=PAIRS, mode="project_out", site="fused"), Steer(direction_file=direction_file(tmp_path), mode="add"),
    ]


@pytest.mark.parametrize("model", ["turbo", "toy_turbo"])
def test_removal_restores_everything_even_after_an_exception(model, tmp_path, request):
    turbo = request.getfixturevalue(model)
    tp = turbo.text_path
    before, stock = snapshot(tp), fused(turbo)
    ctx = context(turbo)
    for intervention in every_kind(tmp_path):
        with pytest.raises(RuntimeError, match="boom"):
            with torch.no_grad(), applied([intervention], ctx):
                edited = fused(turbo, ctx)
                assert not torch.equal(edited, stock), intervention.describe()
                assert not torch.isnan(edited).any()
                raise RuntimeError("boom")
        assert_same_snapshot(snapshot(tp), before)
        assert torch.equal(fused(turbo), stock), intervention.describe()
    # All at once, composed. Steers go first: a pair direction is measured through the path as attached so far, and
    # the rest together (solo 6, leave-one-out 6, fusion solo, ablations) leave no prompt-dependence to measure.
    composed = sorted(every_kind(tmp_path), key=lambda i: i.kind != "steer")
    with torch.no_grad(), applied(composed, ctx):
        assert not torch.isnan(fused(turbo, ctx)).any()
    assert_same_snapshot(snapshot(tp), before)
    assert torch.equal(fused(turbo), stock)


# ----------------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("slot", [0, 6, 11])
def test_solo_at_projector_equals_weight_replaced_by_wk_ek(turbo, slot):
    weight = turbo.text_path.text_fusion.projector.weight
    edited = fused(turbo, interventions=[Solo(slot=slot)])
    original = weight.detach().clone()
    one_hot = torch.zeros_like(original)
    one_hot[0, slot] = original[0, slot]
    try:
        with torch.no_grad():
            weight.copy_(one_hot)
        replaced = fused(turbo)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert torch.equal(edited, replaced)


def test_projector_gains_equal_slot_scaling(turbo):
    for gains in (Rebalance().gains, [0.3 * i - 1.0 for i in range(12)]):
        at_projector = fused(turbo, interventions=[Rebalance(gains=gains, strength=0.7)])
        at_slots = fused(turbo, interventions=[Rebalance(gains=gains, strength=0.7, site="slots")])
        assert close(at_projector, at_slots, 1e-6)
        assert not torch.equal(at_projector, fused(turbo))


@pytest.mark.parametrize("slot", [3, 6])
def test_ablate_zero_at_slots_equals_leave_one_out_at_projector(turbo, slot):
    ablated = fused(turbo, interventions=[Ablate(site="slots", mode="zero", targets=[slot])])
    assert close(ablated, fused(turbo, interventions=[LeaveOneOut(slot=slot)]), 1e-6)


def test_solo_sites_are_different_operations(turbo):
    enc = encode(turbo, PROMPTS)
    e6 = torch.zeros(12)
    e6[6] = 1.0
    with torch.no_grad():
        direct = turbo.text_path(enc.taps * e6[:, None], enc.mask)
    at_taps = fused(turbo, interventions=[Solo(layer=20, site="taps")])
    assert torch.equal(at_taps, direct)
    at_projector = fused(turbo, interventions=[Solo(layer=20)])
    at_attention = fused(turbo, interventions=[Solo(layer=20, site="fusion_attention")])
    assert not close(at_taps, at_projector, 1e-3) and not close(at_attention, at_projector, 1e-3)


def test_rebalance_rms_renorm_keeps_each_projector_token_rms(turbo):
    grabbed = []  # the projector's (possibly edited) output is the first refiner block's input
    refiner = turbo.text_path.text_fusion.refiner_blocks[0]
    handle = refiner.register_forward_pre_hook(lambda m, args: grabbed.append(args[0]))
    try:
        fused(turbo)
        fused(turbo, interventions=[Rebalance(renorm="rms")])
        fused(turbo, interventions=[Rebalance()])
    finally:
        handle.remove()
    rms = [g.pow(2).mean(-1).sqrt() for g in grabbed]
    assert close(rms[1], rms[0], 1e-5) and not close(rms[2], rms[0], 1e-2)


def test_ablate_modes_match_direct_computation(turbo):
    from krea_sweeps.sampler import trim_padding

    enc = encode(turbo, PROMPTS)
    ref = encode(turbo, ["a quiet harbour", "a city street at night"])
    m = ref.mask.float()[..., None, None]
    mean = (ref.taps * m).sum((0, 1)) / m.sum((0, 1))
    direct = enc.taps.clone()
    direct[:, :, [2, 6]] = mean[[2, 6]]
    with torch.no_grad():
        expected = turbo.text_path(direct, enc.mask)
    ablate = Ablate(mode="mean", targets=[2, "L20"], reference_prompts=["a quiet harbour", "a city street at night"])
    assert torch.equal(fused(turbo, interventions=[ablate]), expected)
    # noise: seeded (same output twice) and norm-matched per token
    grabbed = []
    block = turbo.text_path.text_fusion.layerwise_blocks[0]
    handle = block.register_forward_pre_hook(lambda mod, args: grabbed.append(args[0]))
    try:
        noisy = [fused(turbo, interventions=[Ablate(mode="noise", targets=[6], seed=1)]) for _ in range(2)]
    finally:
        handle.remove()
    assert torch.equal(*noisy)
    flat = enc.taps.reshape(-1, 12, enc.taps.shape[-1])
    assert torch.allclose(grabbed[0][:, 6].norm(dim=-1), flat[:, 6].norm(dim=-1), rtol=1e-5)
    assert not torch.allclose(grabbed[0][:, 6], flat[:, 6])
    # resample from the prompt itself is the identity, padded or trimmed (states aligned by token rank)
    for site in ("taps", "slots"):
        itself = Ablate(site=site, mode="resample", targets=[0, 6, 11], source_prompt=PROMPTS[1])
        one = encode(turbo, PROMPTS[1:])
        for e in (one, trim_padding(one)):
            assert torch.equal(fused(turbo, interventions=[itself], enc=e), fused(turbo, enc=e))
        other = Ablate(site=site, mode="resample", targets=[6], source_prompt=PROMPTS[0])
        assert not torch.equal(fused(turbo, interventions=[other], enc=trim_padding(one)), fused(turbo, enc=trim_padding(one)))


def with_weight(model, weight: torch.Tensor, enc=None) -> torch.Tensor:
    """Fused features with the projector weight replaced by `weight` (restored after): the reference for w'."""
    param = model.text_path.text_fusion.projector.weight
    original = param.detach().clone()
    try:
        with torch.no_grad():
            param.copy_(weight)
        return fused(model, enc=enc)
    finally:
        with torch.no_grad():
            param.copy_(original)


def test_projector_edits_compose_in_list_order(turbo, tmp_path):
    from krea_sweeps.export import write_diff
    from krea_sweeps.interventions import LoraFile

    w = turbo.text_path.text_fusion.projector.weight.detach().clone()
    g, h = torch.tensor(Rebalance().gains), torch.linspace(0.2, 2.0, 12)
    both = fused(turbo, interventions=[Rebalance(gains=g.tolist()), Rebalance(gains=h.tolist())])
    assert close(both, fused(turbo, interventions=[Rebalance(gains=(g * h).tolist())]), 1e-6)
    assert close(both, with_weight(turbo, w * g * h), 1e-6)
    # edits that do not commute apply in list order: solo then lora = w_6·e_6 + diff; lora then solo = (w + diff)_6·e_6
    gains = [3.0 if i == 3 else 1.0 for i in range(12)]
    lora = LoraFile(path=str(write_diff(tmp_path / "r.safetensors", w, gains, {})))
    e6 = torch.zeros(12)
    e6[6] = 1.0
    assert close(fused(turbo, interventions=[Solo(slot=6), lora]), with_weight(turbo, w * e6 + lora.diff), 1e-6)
    assert close(fused(turbo, interventions=[lora, Solo(slot=6)]), with_weight(turbo, (w + lora.diff) * e6), 1e-6)
    # gated out edits drop out of the chain: what is left is bit-identical to that edit alone
    ctx = context(turbo)
    with ctx.denoising.at("uncond"):
        alone = fused(turbo, ctx, [Rebalance(gains=h.tolist(), apply_to="both")])
        assert torch.equal(fused(turbo, ctx, [Rebalance(gains=g.tolist()), Rebalance(gains=h.tolist(),
                                                                                      apply_to="both")]), alone)


def test_composed_rms_renorm_refers_to_the_stock_output(turbo):
    """Whichever entry asks for renorm=rms, the composed output gets the stock projector output's per-token RMS."""
    g, h = Rebalance().gains, [0.2 + 0.15 * i for i in range(12)]
    grabbed = []
    refiner = turbo.text_path.text_fusion.refiner_blocks[0]
    handle = refiner.register_forward_pre_hook(lambda m, args: grabbed.append(args[0]))
    try:
        fused(turbo)
        fused(turbo, interventions=[Rebalance(gains=g, renorm="rms"), Rebalance(gains=h)])
        fused(turbo, interventions=[Rebalance(gains=h), Rebalance(gains=g, renorm="rms")])
        fused(turbo, interventions=[Rebalance(gains=[a * b for a, b in zip(g, h)], renorm="rms")])
    finally:
        handle.remove()
    stock, first, last, product = grabbed
    rms = [x.pow(2).mean(-1).sqrt() for x in grabbed]
    assert close(rms[1], rms[0], 1e-5) and close(rms[2], rms[0], 1e-5)
    assert close(first, product, 1e-5) and close(last, product, 1e-5) and not close(product, stock, 1e-2)


@pytest.mark.parametrize("site", ["taps", "slots"])
def test_ablate_noise_ignores_padding_and_batching(turbo, site):
    """Noise is drawn per valid-token rank, so a prompt gets the same noise padded, trimmed, or in a batch."""
    from krea_sweeps.sampler import trim_padding

    ablate = Ablate(site=site, mode="noise", targets=[0, "L20"], seed=4)
    one, batch = encode(turbo, PROMPTS[1:]), encode(turbo, [PROMPTS[0], PROMPTS[1]])
    padded = fused(turbo, interventions=[ablate], enc=one)[0, one.mask[0]]
    trimmed = fused(turbo, interventions=[ablate], enc=trim_padding(one))[0]
    batched = fused(turbo, interventions=[ablate], enc=batch)[1, batch.mask[1]]
    assert close(trimmed, padded, 1e-5) and close(batched, padded, 1e-5)
    assert not close(padded, fused(turbo, enc=one)[0, one.mask[0]], 1e-3)
    assert not close(padded, fused(turbo, interventions=[Ablate(site=site, mode="noise", targets=[0, "L20"], seed=5)],
                                   enc=one)[0, one.mask[0]], 1e-3)  # the seed matters


# ------------------------------------------------------------------------------------------------------------- steer
def test_steer_direction_and_consistency_from_pairs(turbo):
    steer = Steer(pairs=PAIRS)
    before = steer.describe()
    assert steer.fitted() is None
    d = steer.direction(context(turbo))
    pooled = {}
    for side in (0, 1):
        enc = encode(turbo, [p[side] for p in PAIRS])
        m = enc.mask.float()[..., None, None]
        pooled[side] = (enc.taps * m).sum(1) / m.sum(1)
    deltas = (pooled[0] - pooled[1]).flatten(1)
    assert close(d, deltas.mean(0).view(12, -1), 1e-6)
    cos = torch.nn.functional.cosine_similarity
    expected = np.mean([float(cos(deltas[i], deltas[j], dim=0)) for i, j in ((0, 1), (0, 2), (1, 2))])
    assert math.isclose(steer.consistency, expected, abs_tol=1e-5)
    assert steer.fitted()["consistency"] == steer.consistency  # recorded by the fit step, not by describe()
    assert steer.describe() == before
    assert steer.report() == {"steer/consistency": steer.consistency}


@pytest.mark.parametrize("mode", ["amplify", "add", "subtract", "project_out", "clamp"])
def test_steer_modes_match_direct_computation(turbo, tmp_path, mode):
    enc = encode(turbo, PROMPTS)
    d = torch.from_numpy(np.load(direction_file(tmp_path)))
    for normalize in ("whole", "per_tap"):
        steer = Steer(direction_file=direction_file(tmp_path), mode=mode, strength=2.0, value=0.5,
                      normalize=normalize)
        dh = d / (d.norm(dim=-1, keepdim=True) if normalize == "per_tap" else d.norm())
        c = enc.taps
        dot = (c * dh).sum(-1, keepdim=True) if normalize == "per_tap" else (c * dh).sum((-2, -1), keepdim=True)
        direct = {"amplify": c + 2.0 * dot * dh, "add": c + 2.0 * dh, "subtract": c - 2.0 * dh,
                  "project_out": c - dot * dh, "clamp": c + (0.5 - dot) * dh}[mode]
        if mode in ("project_out", "clamp"):
            edited_dot = (direct * dh).sum(-1) if normalize == "per_tap" else (direct * dh).sum((-2, -1))
            assert torch.allclose(edited_dot, torch.full_like(edited_dot, 0.0 if mode == "project_out" else 0.5),
                                  atol=1e-4)
        with torch.no_grad():
            expected = turbo.text_path(direct, enc.mask)
        assert close(fused(turbo, interventions=[steer]), expected, 1e-5), (mode, normalize)


def test_steer_at_fused_matches_direct_computation(turbo):
    steer = Steer(pairs=PAIRS, site="fused", mode="amplify", strength=3.0)
    ctx = context(turbo)
    d = steer.unit_direction(ctx)
    assert d.shape == (32,) and math.isclose(float(d.norm()), 1.0, rel_tol=1e-6)
    stock = fused(turbo)
    expected = stock + 3.0 * (stock * d).sum(-1, keepdim=True) * d
    assert close(fused(turbo, ctx, [steer]), expected, 1e-6)


# ---------------------------------------------------------------------------------------------------------- knockout
def explicit_attention(attn, x, mask, guard: bool = True):
    """softmax(QKᵀ/√d + mask)·V through the module's own projections, written out (rows with no key → 0, or NaN
    without the guard, as some kernels give)."""
    q = attn.norm_q(attn.to_q(x).unflatten(-1, (attn.num_heads, attn.head_dim))).transpose(1, 2)
    k = attn.norm_k(attn.to_k(x).unflatten(-1, (attn.num_kv_heads, attn.head_dim))).transpose(1, 2)
    v = attn.to_v(x).unflatten(-1, (attn.num_kv_heads, attn.head_dim)).transpose(1, 2)
    groups = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = probs.nan_to_num(0.0) if guard else probs  # the guard: a row with no key attends to nothing
    out = (probs @ v).transpose(1, 2).flatten(2)
    return attn.to_out[0](out * torch.sigmoid(attn.to_gate(x)))


@pytest.mark.parametrize("keys,queries", [(["L20"], None), ([0, 6, 7], [6, 8]), (list(range(12)), None),
                                          (list(range(12)), [3])])
def test_knockout_equals_explicit_masked_softmax(turbo, keys, queries):
    knockout = Knockout(keys=keys, queries=queries, blocks=[1])
    attn = turbo.text_path.text_fusion.layerwise_blocks[1].attn
    x = torch.randn(5, 12, 32, generator=torch.Generator().manual_seed(0))
    ctx = context(turbo)
    with torch.no_grad(), applied([knockout], ctx):
        hooked = attn(x)
    with torch.no_grad():
        expected = explicit_attention(attn, x, knockout.mask)
        stock = attn(x)
    assert not torch.isnan(hooked).any()
    assert close(hooked, expected, 1e-5)
    assert not close(hooked, stock, 1e-3)
    assert not torch.isnan(fused(turbo, ctx, [knockout])).any()


class UnguardedProcessor:
    """A stand-in attention kernel that gives NaN for a query with no visible key (the written-out softmax)."""

    def __call__(self, attn, x, attention_mask=None, image_rotary_emb=None, **kwargs):
        mask = torch.ones(1, 1, 1, x.shape[-2], dtype=torch.bool) if attention_mask is None else attention_mask
        return explicit_attention(attn, x, mask, guard=False)


def test_composed_knockouts_that_hide_every_key_give_zero_attention_on_any_kernel(turbo):
    attn = turbo.text_path.text_fusion.layerwise_blocks[1].attn
    x = torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(1))
    ctx = context(turbo)
    halves = [Knockout(keys=list(range(6)), blocks=[1]), Knockout(keys=list(range(6, 12)), blocks=[1])]
    stock = attn.processor
    attn.processor = UnguardedProcessor()
    try:
        with torch.no_grad(), applied(halves, ctx):
            composed = attn(x)
        with torch.no_grad(), applied([Knockout(keys=list(range(12)), blocks=[1])], ctx):
            everything = attn(x)
        with torch.no_grad(), applied(halves[:1], ctx):
            half = attn(x)
    finally:
        attn.processor = stock
    assert torch.equal(composed, torch.zeros_like(composed)) and torch.equal(everything, composed)
    assert not torch.isnan(half).any() and half.abs().max() > 0


# ------------------------------------------------------------------------------------------------------------ gating
def test_steps_and_branch_gating_read_the_state_at_call_time(turbo):
    ctx = context(turbo)
    stock = fused(turbo)
    solo = Solo(slot=6, steps=[1, 3])
    with torch.no_grad(), applied([solo], ctx):
        seen = {}
        for branch in ("cond", "uncond"):
            for step in range(4):
                with ctx.denoising.at(branch, step):
                    seen[branch, step] = torch.equal(fused(turbo, ctx), stock)
    assert seen == {("cond", 0): True, ("cond", 1): False, ("cond", 2): False, ("cond", 3): True,
                    ("uncond", 0): True, ("uncond", 1): True, ("uncond", 2): True, ("uncond", 3): True}


def record_text_fusion(model, pipe, sampler, cond, neg, intervention=None):
    """Generate once, recording (branch, step, text_fusion output) for every transformer call."""
    from krea_sweeps.sampler import generate

    calls = []
    ctx = InterventionContext(text_path=model.text_path, num_steps=sampler.steps)
    handle = model.transformer.text_fusion.register_forward_hook(
        lambda m, a, out: calls.append((ctx.state.branch, ctx.state.step, out.detach().clone())))
    try:
        with applied([intervention] if intervention else [], ctx):
            image = generate(pipe, sampler, cond, neg, seed=0, denoising=ctx.denoising)
    finally:
        handle.remove()
    return calls, image


def test_apply_to_cond_leaves_the_negative_branch_untouched(raw):
    from krea_sweeps.sampler import Sampler

    pipe = raw.pipeline()
    sampler = Sampler(steps=2, guidance=4.5, max_sequence_length=MSL).resolved(raw.variant)
    cond, neg = encode(raw, ["a lighthouse at dusk"]), encode(raw, [""])
    before = snapshot(raw.transformer)
    stock_calls, stock_image = record_text_fusion(raw, pipe, sampler, cond, neg)
    assert [(b, s) for b, s, _ in stock_calls] == [("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1)]
    for apply_to in ("cond", "uncond"):
        calls, image = record_text_fusion(raw, pipe, sampler, cond, neg, Rebalance(apply_to=apply_to))
        for (branch, step, out), (_, _, ref) in zip(calls, stock_calls):
            assert torch.equal(out, ref) == (branch != apply_to), (apply_to, branch, step)
        assert not np.array_equal(image, stock_image)
    calls, _ = record_text_fusion(raw, pipe, sampler, cond, neg, Solo(slot=6, apply_to="both", steps=[1, 2]))
    assert [torch.equal(out, ref) for (_, _, out), (_, _, ref) in zip(calls, stock_calls)] == [True, True, False, False]
    assert_same_snapshot(snapshot(raw.transformer), before)
    again_calls, again_image = record_text_fusion(raw, pipe, sampler, cond, neg)
    assert np.array_equal(again_image, stock_image)  # removal restores the generation bit for bit


class _Seen:
    """An identity op at `taps` that records, per call of text_fusion, which DenoiseState it ran under (gated)."""

    def __init__(self):
        self.calls = []

    def states(self, x, call):
        self.calls.append((call.state, call.state.branch, call.state.step))
        return x


@pytest.mark.parametrize("fast", [False, True])
def test_each_pipeline_call_has_its_own_state_even_nested_in_another(raw, fast):
    """A second pipeline call made inside the first one's step callback (same transformer, same interventions) gets
    a DenoiseState of its own: neither resets or advances the other's, an op gated to steps=[2,4) fires on exactly
    steps 2 and 3 of each call in both branches, and the outer image is bit-identical to the one made without the
    nested call."""
    from dataclasses import dataclass
    from dataclasses import replace as copy_with

    from krea_sweeps.interventions import Intervention, Op
    from krea_sweeps.sampler import Sampler, generate

    class Seen(_Seen, Op):
        name = "seen"

    @dataclass
    class Watch(Intervention):
        site: str = "taps"

        def make_op(self):
            return seen

    seen = Seen()
    sampler = Sampler(steps=5, guidance=4.5, max_sequence_length=MSL).resolved(raw.variant)
    sampler = copy_with(sampler, fast=fast)
    outer_cond, inner_cond, neg = encode(raw, ["a lighthouse at dusk"]), encode(raw, ["a red fox"]), encode(raw, [""])
    window = dict(apply_to="both", steps=[2, 4])
    raw.pipeline()  # the DiT loaded: raw.text_path is now its own text_fusion / txt_in

    def run(nested: bool):
        ctx = InterventionContext(text_path=raw.text_path, num_steps=sampler.steps)
        seen.calls.clear()
        inner = {}
        steps_seen = []

        def on_step():
            steps_seen.append(ctx.state.step)  # outside the transformer: the text path's own state
            if nested and not inner:  # a second pipeline (its own scheduler) on the same transformer, mid-call
                inner["image"] = generate(raw.pipeline(), sampler, inner_cond, neg, seed=1, denoising=ctx.denoising)

        with applied([Solo(slot=6, **window), Watch(**window)], ctx):
            image = generate(raw.pipeline(), sampler, outer_cond, neg, seed=0, denoising=ctx.denoising,
                             on_step=on_step)
        assert not ctx.denoising.calls and not ctx.denoising.running and steps_seen == [0] * 5
        return image, list(seen.calls), inner.get("image")

    alone, alone_calls, _ = run(nested=False)
    image, calls, inner_image = run(nested=True)
    states = list(dict.fromkeys(state for state, _, _ in calls))
    assert len(states) == 2 and states[0] is not states[1]
    per_call = [[(b, s) for state, b, s in calls if state is st] for st in states]
    expected = [("cond", 2), ("uncond", 2), ("cond", 3), ("uncond", 3)]
    assert per_call == [expected, expected]  # the nested call ran in the outer's step 1 → its window came first
    assert [(b, s) for _, b, s in alone_calls] == expected
    assert np.array_equal(image, alone)  # the outer call's gating was not disturbed by the nested one
    again, _, _ = run(nested=False)
    assert np.array_equal(again, alone)
    ctx = InterventionContext(text_path=raw.text_path, num_steps=sampler.steps)
    with applied([Solo(slot=6, **window)], ctx):
        reference_inner = generate(raw.pipeline(), sampler, inner_cond, neg, seed=1, denoising=ctx.denoising)
    assert np.array_equal(inner_image, reference_inner)  # nor the nested call's


def test_generation_cannot_be_called_without_a_denoising_tracker(raw):
    """No silent default: a pipeline call states which tracker its interventions read."""
    from krea_sweeps.sampler import Sampler, generate, generate_many

    sampler = Sampler(steps=1, max_sequence_length=MSL).resolved(raw.variant)
    cond, neg = encode(raw, ["x"]), encode(raw, [""])
    for call in (lambda: generate(raw.pipeline(), sampler, cond, neg, 0),
                 lambda: generate_many(raw.pipeline(), sampler, cond, neg, [0])):
        with pytest.raises(TypeError, match="denoising"):
            call()


# ------------------------------------------------------------------------------------------------------- bad input
def bad_inputs(tmp_path):
    wrong_shape = direction_file(tmp_path, (11, 32))
    nan_file = tmp_path / "nan.npy"
    np.save(nan_file, np.full((12, 32), np.nan, dtype=np.float32))
    return [
        (lambda: Rebalance(gains=[1.0] * 11), "intervention.gains"),
        (lambda: Rebalance(gains=[float("nan")] + [1.0] * 11), "intervention.gains"),
        (lambda: Rebalance(preset="shallow_boost"), "intervention.preset"),
        (lambda: Rebalance(renorm="rms", site="slots"), "intervention.renorm"),
        (lambda: Solo(slot=12), "intervention.slot"),
        (lambda: Solo(slot=-1), "intervention.slot"),
        (lambda: Solo(), "intervention.slot"),
        (lambda: Solo(layer=21), "intervention.layer"),
        (lambda: Solo(slot=5, layer=20), "intervention.layer"),
        (lambda: Solo(slot=1, site="refiner"), "intervention.site"),
        (lambda: Solo(slot=1, strength=float("inf")), "intervention.strength"),
        (lambda: Solo(slot=1, strength=0.5, site="fusion_attention"), "intervention.site"),
        (lambda: LeaveOneOut(slot="L21"), "intervention.slot"),
        (lambda: Ablate(mode="shuffle"), "intervention.mode"),
        (lambda: Ablate(site="fused"), "intervention.site"),
        (lambda: Knockout(keys=[40]), "intervention.keys"),
        (lambda: Knockout(keys=[1], blocks=[2]), "intervention.blocks"),
        (lambda: TapScale(multiplier=float("nan")), "intervention.multiplier"),
        (lambda: TapScale(gains=[1.0, 2.0]), "intervention.gains"),
        (lambda: Steer(direction_file=wrong_shape), "intervention.direction_file"),
        (lambda: Steer(direction_file=str(nan_file)), "intervention.direction_file"),
        (lambda: Steer(direction_file=str(tmp_path / "missing.npy")), "intervention.direction_file"),
        (lambda: Steer(pairs=[["only one"]]), "intervention.pairs"),
        (lambda: Steer(pairs=PAIRS, mode="invert"), "intervention.mode"),
        (lambda: Solo(slot=1, apply_to="negative"), "intervention.apply_to"),
        (lambda: Solo(slot=1, steps=[0, 9]).validate(InterventionContext(num_steps=8)), "intervention.steps"),
        (lambda: Solo(slot=1, steps=[3, 3]), "intervention.steps"),
        (lambda: Steer(direction_file=direction_file(tmp_path, (12, 31))).validate(InterventionContext(text_dim=32)),
         "intervention.direction_file"),
        (lambda: Steer(direction_file=direction_file(tmp_path, (32,)), site="fused").validate(
            InterventionContext(text_dim=31)), "intervention.direction_file"),
        (lambda: Solo(slot=1, apply_to="uncond").validate(InterventionContext(guidance=0.0)), "intervention.apply_to"),
    ]


def test_bad_input_is_one_line_naming_the_key(tmp_path):
    for make, key in bad_inputs(tmp_path):
        with pytest.raises(ConfigError) as info:
            make()
        assert info.value.key.startswith(key), (key, str(info.value))
        assert "\n" not in str(info.value)


def test_bad_input_fails_before_any_load(tmp_path):
    """A choice fails at composition (typed configs), a range at planning: both one line naming the key."""
    from conftest import compose

    from krea_sweeps.plan import effective_interventions
    from krea_sweeps.sweeps import check_keys_compose

    for overrides, key in [(["intervention=solo", "intervention.slot=12"], "intervention.slot"),
                           (["intervention=rebalance", "intervention.preset=loud"], "intervention.preset"),
                           (["intervention=knockout", "intervention.keys=[L19]"], "intervention.keys")]:
        with pytest.raises(ConfigError) as info:
            check_keys_compose(overrides)
            effective_interventions(compose(overrides))
        assert info.value.key.startswith(key)


def test_plan_checks_what_needs_the_model_config_without_loading_it(tmp_path, no_loads):
    """Steer's direction width (text_hidden_dim) and apply_to=uncond without CFG fail at plan time, before any load."""
    from conftest import compose

    from krea_sweeps.plan import plan

    steer = ["intervention=steer", "intervention.mode=add"]
    uncond = ["intervention=solo", "intervention.slot=6", "intervention.apply_to=uncond"]
    for overrides, key, says in [
        ([*steer, f"intervention.direction_file={direction_file(tmp_path, (12, 31))}"], "intervention.direction_file",
         "[12, 32]"),
        ([*steer, "intervention.site=fused", f"intervention.direction_file={direction_file(tmp_path, (31,))}"],
         "intervention.direction_file", "[32]"),
        (uncond, "intervention.apply_to", "guidance"),  # Turbo: guidance 0, no negative branch
    ]:
        with pytest.raises(ConfigError) as info:
            plan(compose(overrides))
        assert info.value.key == key and says in str(info.value), str(info.value)
    plan(compose([*steer, f"intervention.direction_file={direction_file(tmp_path, (12, 32))}"]))
    for fine in (["model=raw"], ["sampler.guidance=4.5"]):
        plan(compose([*uncond, *fine]))
    plan(compose(["intervention=solo", "intervention.slot=6", "intervention.apply_to=both"]))  # acts on cond
    plan(compose(["intervention.apply_to=uncond"]))  # `none` does nothing on any branch
    assert no_loads == []


def test_errors_of_list_entries_name_the_list_key(turbo):
    import re

    from conftest import compose

    from krea_sweeps.plan import plan

    solo = "{_target_: krea_sweeps.interventions.Solo, slot: 3"
    for overrides, key in [
        (["interventions=[{_target_: krea_sweeps.interventions.Solo, slot: 12}]"], "interventions[0].slot"),
        (["interventions=[{_target_: krea_sweeps.interventions.Rebalance, preset: null}]"], "interventions[0].preset"),
        (["intervention=solo", "intervention.slot=3", "interventions=[{_target_: krea_sweeps.interventions.TapScale},"
          "{_target_: krea_sweeps.interventions.Knockout, keys: [L19]}]"], "interventions[1].keys[0]"),
        ([f"interventions=[{solo}, steps: [0, 99]}}]"], "interventions[0].steps"),  # from validate()
        ([f"interventions=[{solo}, apply_to: uncond}}]"], "interventions[0].apply_to"),
        (["intervention=solo", "intervention.slot=12"], "intervention.slot"),  # the group keeps its own key
    ]:
        with pytest.raises(ConfigError) as info:
            plan(compose(overrides))
        assert info.value.key == key, (key, str(info.value))
        if key.startswith("interventions"):  # the fix text names the real key too
            assert not re.search(r"(?<![\w.])intervention\.", str(info.value)), str(info.value)
    # errors raised while attaching are named the same way
    ablate = Ablate(mode="mean", targets=[1])
    ablate.config_key = "interventions[2]"
    with pytest.raises(ConfigError) as info:
        with applied([ablate], InterventionContext(text_path=turbo.text_path)):
            pass
    assert info.value.key == "interventions[2].mode"


# ------------------------------------------------------------------------------------------------- config and CLI
def test_every_config_instantiates_and_composes():
    from conftest import compose

    from krea_sweeps.plan import effective_interventions

    for name in ("solo", "leave_one_out", "rebalance", "tap_scale", "ablate", "knockout", "steer"):
        extra = {"solo": ["intervention.slot=3"], "leave_one_out": ["intervention.layer=20"],
                 "tap_scale": ["intervention.multiplier=2"]}.get(name, [])
        (one,) = effective_interventions(compose([f"intervention={name}", *extra]))
        assert one.kind == name and not one.is_identity
    cfg = compose(["intervention=solo", "intervention.layer=20",
                   "interventions=[{_target_: krea_sweeps.interventions.Knockout, keys: [L20], blocks: [0]},"
                   "{_target_: krea_sweeps.interventions.TapScale, multiplier: 2}]"])
    described = [i.describe() for i in effective_interventions(cfg)]
    assert [d["kind"] for d in described] == ["solo", "knockout", "tap_scale"]
    assert described[0]["slot"] == 6 and described[0]["layer"] == 20 and described[0]["site"] == "projector"


def test_cli_solo_sweep(cli):
    import json

    proc = cli("-m", "intervention=solo", "intervention.slot=0,7", "wandb.mode=disabled", "sampler.steps=2",
               "sampler.max_sequence_length=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((cli.cwd / "outputs").glob("default/*/result.json"))
    assert len(results) == 2
    jobs = [json.loads(r.read_text())["job"] for r in results]
    described = sorted((j["interventions"][0]["slot"], j["interventions"][0]["layer"], j["interventions"][0]["site"])
                       for j in jobs)
    assert described == [(0, 2, "projector"), (7, 23, "projector")]
    assert all("intervention.slot=" in j["name"] for j in jobs)


def test_wandb_run_name_and_tags_name_slot_layer_and_site():
    from conftest import compose

    from krea_sweeps.plan import plan
    from krea_sweeps.runner import run_name, tags_for

    job = plan(compose(["intervention=solo", "intervention.slot=6"]))
    name = run_name(job)
    assert "solo" in name and "slot=6" in name and "layer=20" in name and "site=projector" in name
    assert {"intervention:solo", "slot:6", "layer:20", "site:projector"} <= set(tags_for(job))
    assert run_name(plan(compose([]))) == "adhoc"  # stock: just the job name


def test_wandb_job_type_and_stable_config_keys_across_kinds():
    """Runs of different kinds compare in W&B: job_type is the kind, and `intervention.kind/.slot/.layer/.strength`
    mean the same in every run (None where a kind has no such field)."""
    from conftest import compose

    from krea_sweeps.plan import plan
    from krea_sweeps.runner import job_type_of, logged_config, wandb_config

    solo = plan(compose(["intervention=solo", "intervention.layer=20"]))
    dial = plan(compose(["intervention=rebalance", "intervention.strength=2"]))
    stock = plan(compose([]))
    assert [job_type_of(j) for j in (solo, dial, stock)] == ["solo", "rebalance", "stock"]
    configs = [wandb_config(logged_config(j), j) for j in (solo, dial, stock)]
    assert [c["intervention"]["kind"] for c in configs] == ["solo", "rebalance", "stock"]
    assert (configs[0]["intervention"]["slot"], configs[0]["intervention"]["layer"]) == (6, 20)
    assert configs[1]["intervention"]["strength"] == 2 and configs[1]["intervention"]["slot"] is None
    assert all(set(("kind", "site", "slot", "layer", "strength")) <= set(c["intervention"]) for c in configs)
    assert {c["variant"] for c in configs} == {"turbo"} and all(c["synthetic"] for c in configs)
