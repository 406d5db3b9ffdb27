"""Word maps, concept maps, Diffusion Lens, causal tracing and attribution patching on the synthetic Krea 2, each
against an independent computation. Generations are 64² (a 4×4 latent grid), 2 steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from krea_sweeps.interventions import InterventionContext, applied
from krea_sweeps.prompts import EncodeCache, encode
from krea_sweeps.sampler import Denoising, Sampler, generate_many
from krea_sweeps.synthetic import SELECT_LAYERS

MSL = 32
PROMPTS = ["a red fox in the snow", "two cups of coffee on a wooden table"]


ENCODINGS = EncodeCache(None)  # in memory only, shared by this module's tests


def enc(model, prompts, layers=None):
    return ENCODINGS.get(model, prompts, MSL, layers)


def context(model, prompts=PROMPTS, state=None) -> InterventionContext:
    return InterventionContext(text_path=model.text_path, encode=lambda ps: enc(model, ps), num_steps=8,
                               denoising=state or Denoising(), prompts=[*prompts, ""],
                               encode_layers=lambda ps, layers: enc(model, ps, layers))


def fused(model, interventions=(), prompts=PROMPTS, encoded=None):
    e = encoded if encoded is not None else enc(model, prompts)
    with torch.no_grad(), applied(list(interventions), context(model, prompts)):
        return model.text_path(e.taps, e.mask)


def images(model, prompt, seeds=(0,), interventions=(), fast=True, **kw):
    pipe = model.pipeline()
    sampler = Sampler(steps=2, max_sequence_length=MSL, fast=fast, **kw).resolved(model.variant)
    cond, neg = enc(model, [prompt]), enc(model, [""])
    ctx = context(model, [prompt])
    with applied(list(interventions), ctx):
        return generate_many(pipe, sampler, cond, neg, list(seeds), denoising=ctx.denoising)


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
def test_word_maps_equal_explicit_softmax_and_leave_the_image_alone(turbo, session, tmp_path, monkeypatch, fast):
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
        record, media = execute(job, session)
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
        assert np.array_equal(media[f"images/p00_s{seed}"][0], image)
    assert (tmp_path / "outputs/adhoc/figures/word_maps_p00.png").exists()
    assert sorted(record["summary"]) == sorted(job.metrics[0].summary_keys(job)) == [
        "word_maps/area", "word_maps/entropy", "word_maps/share", "word_maps/text_share"]


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


# ------------------------------------------------------------------------------------------ patching and tracing
PAIRS = [["a photo of a smiling woman in a garden", "a photo of a serious woman in a garden"],
         ["an ornate wooden door in a stone wall", "a very plain wooden door in a stone wall"]]
CLEAN, CORRUPTED = [a for a, _ in PAIRS], [b for _, b in PAIRS]


@pytest.mark.parametrize("site", ["taps", "slots", "block", "fused"])
def test_patch_all_is_the_clean_run_and_patch_none_the_corrupted(turbo, site):
    """On the valid tokens (pads are masked keys whose own lanes are never read), bit for bit, one prompt a row."""
    from krea_sweeps.interventions import Patch

    valid = [enc(turbo, [b]).mask[0] for b in CORRUPTED]
    for i, (a, b) in enumerate(PAIRS):
        clean, corrupted = fused(turbo, prompts=[a])[0], fused(turbo, prompts=[b])[0]
        everything = fused(turbo, [Patch(pairs=PAIRS, site=site, block=1)], prompts=[b])[0]
        assert torch.equal(everything[valid[i]], clean[enc(turbo, [a]).mask[0]])
        nothing = fused(turbo, [Patch(pairs=PAIRS, site=site, tokens=[40, 41])], prompts=[b])[0]  # hooks, no edit
        assert torch.equal(nothing, corrupted)


@pytest.mark.parametrize("fast", [True, False])
def test_patch_all_generates_the_clean_image(turbo, fast):
    from krea_sweeps.interventions import Patch

    for site in ("slots", "fused"):
        got = images(turbo, CORRUPTED[0], interventions=[Patch(pairs=PAIRS[:1], site=site)], fast=fast)[0]
        assert np.array_equal(got, images(turbo, CLEAN[0], fast=fast)[0])
    one_slot = images(turbo, CORRUPTED[0], interventions=[Patch(pairs=PAIRS[:1], slots=[6])], fast=fast)[0]
    assert not np.array_equal(one_slot, images(turbo, CORRUPTED[0], fast=fast)[0])


def test_patch_token_span_replaces_exactly_those_positions(turbo):
    from krea_sweeps.interventions import Patch
    from krea_sweeps.metrics.tracing import site_states  # canonical layout: [B, T, 12, D] at slots too

    ctx = context(turbo, CORRUPTED)
    b, a = enc(turbo, CORRUPTED[:1]), enc(turbo, CLEAN[:1])
    x_b, x_a = site_states(turbo.text_path, b, "slots"), site_states(turbo.text_path, a, "slots")
    seen = {}
    patch = Patch(pairs=PAIRS[:1], site="slots", slots=["L20", 3], tokens=[4, 6])
    with torch.no_grad(), applied([patch], ctx), \
            torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: None):
        h = turbo.text_path.text_fusion.projector.register_forward_pre_hook(
            lambda m, args: seen.__setitem__("x", args[0]))
        turbo.text_path(b.taps, b.mask)
        h.remove()
    expected = x_b.clone()
    expected[0, 4:6, [3, 6]] = x_a[0, 4:6, [3, 6]]  # same user-text ranks: no padding before the content
    assert torch.equal(seen["x"].transpose(-1, -2), expected)  # the projector's own input is [B, T, D, 12]


def test_restoration_and_attribution_cli(cli):
    import json

    proc = cli("+experiment=causal_tracing", "intervention.slots=6", "wandb.mode=offline", "sampler.steps=2",
               f"sampler.max_sequence_length={MSL}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (cli.cwd / "outputs").glob("causal_tracing/*/result.json")
    record = json.loads(result.read_text())
    assert set(record["summary"]) == {"restoration/image", "restoration/cond"}
    grid = np.load(result.parent / "arrays" / "restoration.p00.grid.npy")
    assert grid.shape[0] == 12 and np.isfinite(grid).all()
    assert (result.parent / "figures" / "restoration_p00.png").exists()
    proc = cli("+experiment=attribution", "intervention.site=block", "wandb.mode=disabled",
               f"sampler.max_sequence_length={MSL}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (cli.cwd / "outputs").glob("attribution/*/result.json")
    record = json.loads(result.read_text())
    assert set(record["summary"]) == {"attribution/total", "attribution/corr_patching"}
    assert (result.parent / "figures" / "attribution_p00.png").exists()


def test_restoration_is_one_for_patch_all_and_zero_for_patch_none(turbo):
    from krea_sweeps.interventions import Patch
    from krea_sweeps.metrics.tracing import aligned_rows, distance, restoration

    b, a = enc(turbo, CORRUPTED[:1]), enc(turbo, CLEAN[:1])
    rows_b, rows_a = aligned_rows(b, a)
    f_a, f_b = fused(turbo, prompts=CLEAN[:1]), fused(turbo, prompts=CORRUPTED[:1])
    d_ba = float(distance(f_b, f_a, rows_b, rows_a))
    for patch, want in ((Patch(pairs=PAIRS, site="taps"), 1.0), (Patch(pairs=PAIRS, tokens=[30, 31]), 0.0)):
        f = fused(turbo, [patch], prompts=CORRUPTED[:1])
        assert restoration(float(distance(f, f_a, rows_b, rows_a)), d_ba) == want


@pytest.mark.parametrize("site", ["taps", "slots", "block"])
def test_attribution_equals_finite_differences(turbo, site):
    """The attribution a[k,t] is the directional derivative of R² along (x_A − x_B) at (k, t): central differences
    on a float64 copy of the text path."""
    import copy

    from krea_sweeps.interventions import Patch
    from krea_sweeps.metrics.tracing import aligned_rows, attribution_grid, distance, site_replaced, site_states
    from krea_sweeps.prompts import Encoded

    tp = copy.deepcopy(turbo.text_path).double()
    for m in tp.modules():  # Krea2RMSNorm upcasts to float32 by design: the same norm in float64 for the copy
        if type(m).__name__ == "Krea2RMSNorm":
            m.forward = lambda x, m=m: torch.nn.functional.rms_norm(x, (m.dim,), weight=m.weight + 1.0, eps=m.eps)
    b, a = enc(turbo, CORRUPTED[:1]), enc(turbo, CLEAN[:1])
    b, a = (Encoded(e.taps.double(), e.mask, e.num_suffix) for e in (b, a))
    patch = Patch(pairs=PAIRS[:1], site=site, block=1)
    grid = attribution_grid(tp, patch, b, a)
    rows_b, rows_a = aligned_rows(b, a)
    with torch.no_grad():
        f_a, f_b = tp(a.taps, a.mask), tp(b.taps, b.mask)
        x_b, x_a = site_states(tp, b, site, 1), site_states(tp, a, site, 1)
    d2 = distance(f_b, f_a, rows_b, rows_a) ** 2

    def r2(x):
        with torch.no_grad(), site_replaced(tp, site, x, 1):
            return float(1 - distance(tp(b.taps, b.mask), f_a, rows_b, rows_a) ** 2 / d2)

    eps = 1e-5
    for k, t in [(0, 0), (6, 4), (11, 2), (3, 7)]:
        delta = torch.zeros_like(x_b)  # canonical layout at every site: [B, T, 12, D]
        delta[0, t, k] = x_a[0, t, k] - x_b[0, t, k]
        fd = (r2(x_b + eps * delta) - r2(x_b - eps * delta)) / (2 * eps)
        assert abs(fd - grid[k, t]) <= 1e-6 * max(1.0, abs(fd)), (k, t, fd, grid[k, t])


def test_tracing_grid_cells_equal_single_patch_interventions(turbo):
    from krea_sweeps.interventions import Patch
    from krea_sweeps.metrics.tracing import aligned_rows, distance, restoration, single_patch_grid

    b, a = enc(turbo, CORRUPTED[1:]), enc(turbo, CLEAN[1:])
    for site in ("slots", "taps"):
        grid = single_patch_grid(turbo.text_path, Patch(pairs=PAIRS, site=site), b, a)
        rows_b, rows_a = aligned_rows(b, a)
        f_a, f_b = fused(turbo, prompts=CLEAN[1:]), fused(turbo, prompts=CORRUPTED[1:])
        for k, t in [(6, 2), (0, 0), (11, 5)]:
            f = fused(turbo, [Patch(pairs=PAIRS, site=site, slots=[k], tokens=[t, t + 1])], prompts=CORRUPTED[1:])
            want = restoration(float(distance(f, f_a, rows_b, rows_a)), float(distance(f_b, f_a, rows_b, rows_a)))
            assert abs(grid[k, t] - want) < 1e-5, (site, k, t, grid[k, t], want)


def test_word_maps_vs_stock_are_one_for_an_intervention_that_changes_nothing(turbo, session, tmp_path,
                                                                             monkeypatch):
    """The lens identity (tap 6 ← layer 20) attaches hooks but changes no bit: its maps equal the stock run's."""
    from krea_sweeps.task import execute

    job = plan_job(tmp_path, monkeypatch, ["metrics=[word_maps]", "model=turbo", "intervention=lens",
                                           "intervention.layer=20", "intervention.tap=6",
                                           "prompts.prompts=[a red fox in the snow]"])
    assert not job.is_stock
    summary = execute(job, session).record["summary"]
    assert sorted(summary) == sorted(job.metrics[0].summary_keys(job))
    assert summary["word_maps/corr_stock"] == pytest.approx(1.0, abs=1e-12)
    assert summary["word_maps/iou_stock"] == 1.0


# ---------------------------------------------------------------------------------------------------- concept maps
def test_concept_stream_equals_the_block_on_text_image_concepts_with_that_mask(turbo):
    """Independent: run the DiT block itself on [text; image; concepts] with a mask where text and image never see the
    concepts and the concepts never see the text; its concept rows must equal the hook's stream, its other rows the
    stock block's."""
    from krea_sweeps.metrics.concept_maps import CapturingProcessor, concept_block_step
    from krea_sweeps.interventions.hooks import probing

    tr = turbo.transformer
    block = tr.transformer_blocks[1]
    g = torch.Generator().manual_seed(0)
    hidden = tr.config.attention_head_dim * tr.config.num_attention_heads
    T, N, C = 5, 16, 3
    hs = torch.randn(1, T + N, hidden, generator=g)
    concepts = torch.randn(1, C, hidden, generator=g)
    temb = torch.randn(1, 1, 6 * hidden, generator=g) * 0.1
    pos = torch.cat([torch.zeros(T, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.),
                                                                      indexing="ij"), -1).reshape(N, 3)])
    rotary = tr.rotary_emb(pos)
    seen = {}
    with torch.no_grad():
        with probing(InterventionContext(transformer=tr), "dit_attention", "capture",
                     lambda old, i: CapturingProcessor(old, seen), at=[1]):
            stock = block(hs, temb, rotary)
        stream, _ = concept_block_step(block, concepts, temb, seen, N)
        full_pos = torch.cat([pos, torch.zeros(C, 3)])
        mask = torch.ones(T + N + C, T + N + C, dtype=torch.bool)
        mask[: T + N, T + N:] = False   # text and image never attend to the concepts
        mask[T + N:, :T] = False        # the concepts never attend to the text
        joint = block(torch.cat([hs, concepts], 1), temb, tr.rotary_emb(full_pos), mask[None, None])
    torch.testing.assert_close(joint[:, T + N:], stream, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(joint[:, : T + N], stock, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast", [True, False])
def test_concept_maps_leave_the_image_bit_identical(turbo, session, tmp_path, monkeypatch, fast):
    from krea_sweeps.task import execute

    job = plan_job(tmp_path, monkeypatch, ["metrics=[concept_maps]", "model=turbo", f"sampler.fast={fast}",
                                           "metrics.concept_maps.concepts=[fox,snow,sky]",
                                           "prompts.prompts=[a red fox in the snow]", "seeds=[0,1]"])
    record, media = execute(job, session)
    plain = images(turbo, "a red fox in the snow", seeds=[0, 1], fast=fast)
    for seed, image in zip([0, 1], plain):
        assert np.array_equal(media[f"images/p00_s{seed}"][0], image)
    arrays = tmp_path / "outputs" / "adhoc" / "arrays"
    grid = np.load(arrays / "concept_maps.p00_s0.grid.npy")
    assert grid.shape == (3, 4, 4)
    np.testing.assert_allclose(grid.sum(0), 1.0, rtol=1e-5)  # a softmax over concepts at every image token
    assert [str(c) for c in np.load(arrays / "concept_maps.concepts.npy")] == ["fox", "snow", "sky"]
    assert sorted(record["summary"]) == sorted(job.metrics[0].summary_keys(job))
    assert (tmp_path / "outputs/adhoc/figures/concept_maps_p00.png").exists()


@pytest.mark.parametrize("cls, kwargs, key", [
    ("WordMaps", {"blocks": [0, -1]}, "metrics.word_maps.blocks"),
    ("WordMaps", {"steps": ["a"]}, "metrics.word_maps.steps"),
    ("ConceptMaps", {"concepts": ["a", "b"], "blocks": [True]}, "metrics.concept_maps.blocks"),
])
def test_map_metrics_refuse_bad_index_lists_naming_the_key(cls, kwargs, key):
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.metrics import concept_maps, word_maps

    metric = getattr(word_maps if cls == "WordMaps" else concept_maps, cls)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        metric(**kwargs)


def test_map_metrics_keep_index_lists_sorted_and_unique():
    from krea_sweeps.metrics.word_maps import WordMaps

    assert WordMaps(blocks=[2, 0, 2], steps=None).blocks == [0, 2]
