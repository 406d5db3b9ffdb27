"""Word maps, concept maps, Diffusion Lens, causal tracing and attribution patching on the synthetic Krea 2, each
against an independent computation. Generations are 64² (a 4×4 latent grid), 2 steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from krea_sweeps.interventions import InterventionContext, applied
from krea_sweeps.prompts import encode, encode_cache
from krea_sweeps.sampler import DenoiseState, Sampler, generate_many
from krea_sweeps.synthetic import SELECT_LAYERS

MSL = 32
PROMPTS = ["a red fox in the snow", "two cups of coffee on a wooden table"]


def enc(model, prompts, layers=None):
    return encode_cache(None).get(model, prompts, MSL, layers)


def context(model, prompts=PROMPTS, state=None) -> InterventionContext:
    return InterventionContext(text_path=model.text_path, encode=lambda ps: enc(model, ps), num_steps=8,
                               state=state or DenoiseState(), prompts=[*prompts, ""],
                               encode_layers=lambda ps, layers: enc(model, ps, layers))


def fused(model, interventions=(), prompts=PROMPTS, encoded=None):
    e = encoded if encoded is not None else enc(model, prompts)
    with torch.no_grad(), applied(list(interventions), context(model, prompts)):
        return model.text_path(e.taps, e.mask)


def images(model, prompt, seeds=(0,), interventions=(), fast=True, **kw):
    pipe = model.pipeline()
    sampler = Sampler(steps=2, max_sequence_length=MSL, fast=fast, **kw).resolved(model.variant)
    cond, neg = enc(model, [prompt]), enc(model, [""])
    with applied(list(interventions), context(model, [prompt])):
        return generate_many(pipe, sampler, cond, neg, list(seeds))


# ------------------------------------------------------------------------------------------------------------ lens
@pytest.mark.parametrize("tap", [0, 6, 11])
def test_lens_identity_is_bit_identical(turbo, tap):
    from krea_sweeps.interventions import Lens

    lens = Lens(layer=SELECT_LAYERS[tap], tap=tap)
    assert torch.equal(fused(turbo, [lens]), fused(turbo))
    if tap == 6:
        for fast in (True, False):
            a = images(turbo, PROMPTS[0], fast=fast)[0]
            b = images(turbo, PROMPTS[0], interventions=[lens], fast=fast)[0]
            assert np.array_equal(a, b)


@pytest.mark.parametrize("layer,tap", [(0, None), (13, None), (36, None), (30, 3)])
def test_lens_feeds_the_encoder_layer_into_the_taps(turbo, layer, tap):
    from krea_sweeps.interventions import Lens

    # Independent: encode with the layer itself tapped where the lens puts it, then run the stock text path.
    layers = tuple(layer if (tap is None or k == tap) else SELECT_LAYERS[k] for k in range(12))
    from krea_sweeps.prompts import Encoded

    direct = Encoded.cat([encode(turbo.tokenizer, turbo.text_encoder, [p], MSL, layers) for p in PROMPTS])
    expected = fused(turbo, encoded=direct)
    got = fused(turbo, [Lens(layer=layer, tap=tap)])
    assert torch.equal(got, expected)
    assert not torch.equal(got, fused(turbo))


def test_lens_bad_input():
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.interventions import Lens

    for kw, key in [({"layer": 37}, "intervention.layer"), ({"layer": -1}, "intervention.layer"),
                    ({"layer": 3, "tap": 12}, "intervention.tap"), ({}, "intervention.layer")]:
        with pytest.raises(ConfigError) as info:
            Lens(**kw)
        assert info.value.key == key


# ------------------------------------------------------------------------------------------------------- word maps
def plan_job(tmp_path, monkeypatch, overrides):
    from conftest import compose

    from krea_sweeps.plan import plan

    monkeypatch.chdir(tmp_path)
    return plan(compose(["wandb.mode=disabled", "sampler.steps=2", f"sampler.max_sequence_length={MSL}",
                         *overrides]))


def explicit_text_attention(q, k, rotary, mask, text_len):
    """softmax(Q·Kᵀ/√d) over ALL keys (text + image, key mask applied), image-query rows × text-key columns,
    mean over heads — written out here without the recorder's chunking or logsumexp."""
    from diffusers.models.embeddings import apply_rotary_emb

    q = apply_rotary_emb(q, rotary, sequence_dim=1).double()
    k = apply_rotary_emb(k, rotary, sequence_dim=1).double()
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)[:, :, text_len:, :text_len].mean(1)


@pytest.mark.parametrize("fast", [True, False])
def test_word_maps_equal_explicit_softmax_and_leave_the_image_alone(turbo, tmp_path, monkeypatch, fast):
    from krea_sweeps.task import execute

    job = plan_job(tmp_path, monkeypatch, ["metrics=[word_maps]", "seeds=[0,1]", f"sampler.fast={fast}",
                                           "metrics.word_maps.compare_stock=false", "model=turbo"])
    transformer = turbo.transformer
    calls = []  # per attention call: (q, k, rotary, mask, sequence length)

    def on_block(module, args, kwargs):
        hs, temb, rotary = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
        seen = {}
        hq = module.attn.norm_q.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o))
        hk = module.attn.norm_k.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o))
        calls.append((seen, rotary, mask, hs.shape[1], (hq, hk)))

    def after_block(module, args, output):
        for h in calls[-1][4]:
            h.remove()

    handles = [b.register_forward_pre_hook(on_block, with_kwargs=True) for b in transformer.transformer_blocks]
    handles += [b.register_forward_hook(after_block) for b in transformer.transformer_blocks]
    try:
        record = execute(job)
    finally:
        for h in handles:
            h.remove()
    blocks, steps, n_img = len(transformer.transformer_blocks), 2, 16
    prompts, seeds = job.prompts, job.seeds
    assert len(calls) >= len(prompts) * len(seeds) * steps * blocks
    calls = calls[-len(prompts) * len(seeds) * steps * blocks:]  # the recorded run (the last generation)
    arrays = tmp_path / "outputs" / "adhoc" / "arrays"
    i = 0
    for p in range(len(prompts)):
        mask = job_mask = enc(turbo, [prompts[p]]).mask[0]
        for seed in seeds:
            total = 0
            for _ in range(steps * blocks):
                seen, rotary, m, length, _h = calls[i]
                i += 1
                text_len = length - n_img
                maps = explicit_text_attention(seen["q"], seen["k"], rotary, m, text_len)[0]
                total = total + (maps if text_len == int(job_mask.sum()) else maps[:, mask])
            expected = (total / (steps * blocks)).float().numpy()
            got = np.load(arrays / f"word_maps.p{p:02d}_s{seed}.tokens.npy")
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
            words = np.load(arrays / f"word_maps.p{p:02d}.words.npy")
            grid = np.load(arrays / f"word_maps.p{p:02d}_s{seed}.grid.npy")
            full = np.load(arrays / f"word_maps.p{p:02d}_s{seed}.npy")
            assert grid.shape == (len(words), 4, 4) and full.shape == (len(words), 64, 64)
    # Recording never changes the image: the job's images (recorded) equal a plain generation without the metric.
    plain = images(turbo, prompts[0], seeds=[0, 1], fast=fast)
    for seed, image in zip(seeds, plain):
        assert np.array_equal(record["_wandb_images"][f"images/p00_s{seed}"][0], image)
    assert (tmp_path / "outputs/adhoc/figures/word_maps_p00.png").exists()
    assert set(record["summary"]) == {"word_maps/text_share", "word_maps/share", "word_maps/entropy",
                                      "word_maps/area"}


def test_words_merge_sub_tokens_by_offsets(turbo):
    from krea_sweeps.metrics.word_maps import content_token_spans, words_of

    prompt = "A close-up portrait, unbelievably ornate lilies."
    n = int(enc(turbo, [prompt]).content.sum())
    spans = content_token_spans(turbo.tokenizer, prompt, n)
    words, members = words_of(prompt, spans)
    assert words == ["A", "close-up", "portrait", ",", "unbelievably", "ornate", "lilies", "."]
    assert sorted(t for m in members for t in m) == list(range(n))  # every content token in exactly one word
    ids = turbo.tokenizer(prompt).input_ids
    assert len(ids) == n
    for word, m in zip(words, members):
        assert turbo.tokenizer.decode([ids[t] for t in m]).strip() == word


def test_map_summaries_on_hand_made_maps():
    from krea_sweeps.metrics.word_maps import compare_maps, map_stats

    m = np.zeros((4, 4))
    m[0, 3] = 1.0
    s = map_stats(m)
    assert s["share"] == 1 / 16 and s["entropy"] == 0.0 and s["area"] == 1 / 16
    assert (s["com_y"], s["com_x"]) == (0.125, 0.875)
    u = map_stats(np.ones((4, 4)))
    assert abs(u["entropy"] - 1.0) < 1e-12 and u["area"] == 1.0 and (u["com_y"], u["com_x"]) == (0.5, 0.5)
    assert compare_maps(m, m) == {"corr": 1.0, "iou": 1.0}
    other = np.zeros((4, 4))
    other[3, 0] = 1.0
    c = compare_maps(m, other)
    assert c["iou"] == 0.0 and c["corr"] < 0
