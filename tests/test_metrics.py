"""Metrics (issue 4): exact attention probabilities, aggregates with known answers, conditioning metrics against the
stock model, image metrics on images with closed-form answers, and the run-level guarantees (baselines generated
once per sweep, conditioning-only runs never load the DiT blocks or the VAE)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import compose
from krea_sweeps.errors import ConfigError
from krea_sweeps.metrics.attention import (attention_probabilities, average_layer_stats, layer_attention_stats,
                                           probed, token_attention_stats)
from krea_sweeps.metrics.image import ClipScore, Diversity, image_statistics, rgb_rms
from krea_sweeps.prompts import encode

SEQ = 48  # tokens after the prefix drop: plenty for the test prompts, fast on CPU
PROMPTS = ["A red fox sitting in fresh snow.", "A lighthouse on a rocky coast at dusk, long exposure."]


def attention_modules(text_path):
    tf = text_path.text_fusion
    return [b.attn for b in tf.layerwise_blocks] + [b.attn for b in tf.refiner_blocks]


@pytest.fixture(scope="module")
def encoded(turbo):
    return encode(turbo.tokenizer, turbo.text_encoder, PROMPTS, SEQ, tuple(turbo.variant.select_layers))


@pytest.fixture
def job_ctx(tmp_path, monkeypatch, session):
    """A planned job's JobContext on the synthetic model (prompts encoded; nothing generated)."""
    from krea_sweeps.models import LoadedModel
    from krea_sweeps.plan import plan
    from krea_sweeps.task import JobContext

    monkeypatch.chdir(tmp_path)

    def make(*overrides):
        job = plan(compose([f"sampler.max_sequence_length={SEQ}", "wandb.mode=disabled", *overrides]))
        ctx = JobContext(job=job, model=LoadedModel(job.variant, session.models), session=session)
        ctx.encoded = ctx.encode(job.prompts)
        return ctx

    return make


# ------------------------------------------------------------------------------------ attention probabilities
def test_probe_leaves_features_bitwise_and_restores_processors(turbo, encoded):
    text_path = turbo.text_path
    modules = attention_modules(text_path)
    before = [m.processor for m in modules]
    with torch.no_grad():
        stock = text_path(encoded.taps, encoded.mask)
        with probed(modules) as calls:
            probed_out = text_path(encoded.taps, encoded.mask)
    assert torch.equal(stock, probed_out)
    assert all(m.processor is p for m, p in zip(modules, before))
    assert [len(c) for c in calls] == [1] * len(modules)
    with pytest.raises(RuntimeError), probed(modules):
        raise RuntimeError("inside")
    assert all(m.processor is p for m, p in zip(modules, before))


def test_attention_probabilities_are_exact(turbo, encoded):
    """Rows sum to 1; P equals the kernel's own output for V = identity and an independent float64 recomputation
    from the block's input; P·V, gated and projected, equals the attention module's output."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    text_path = turbo.text_path
    modules = attention_modules(text_path)
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
               for i, m in enumerate(modules)]
    try:
        with torch.no_grad(), probed(modules, keep_inputs=True) as calls:
            text_path(encoded.taps, encoded.mask)
    finally:
        for h in handles:
            h.remove()
    for i, (attn, module_calls) in enumerate(zip(modules, calls)):
        call = module_calls[0]
        P, x = call.probs, call.inputs
        n, heads, s, _ = P.shape
        refiner = i >= 2
        assert (n, s) == ((2, SEQ) if refiner else (2 * SEQ, 12))
        assert torch.allclose(P.sum(-1), torch.ones(n, heads, s), atol=1e-5)
        if refiner:  # padded keys get exactly nothing
            assert P.masked_select((~encoded.mask)[:, None, None, :].expand_as(P)).abs().max() == 0
        # 1. the kernel itself, with V = identity over keys, returns P
        eye = torch.eye(s).expand(n, heads, s, s).permute(0, 2, 1, 3).contiguous()  # [N, S_k, H, S_k]
        kernel_p = dispatch_attention_fn(x["query"], x["key"], eye, attn_mask=x["mask"],
                                         backend=attn.processor._attention_backend)  # [N, S_q, H, S_k]
        assert torch.allclose(kernel_p.permute(0, 2, 1, 3), P, atol=1e-6)
        # 2. independent recomputation in float64 from the block's input hidden states
        h = inputs[i].double()

        def project(linear, norm, n_heads):
            y = torch.nn.functional.linear(h, linear.weight.double()).unflatten(-1, (n_heads, attn.head_dim))
            return torch.nn.functional.rms_norm(y, (attn.head_dim,), weight=norm.weight.double() + 1, eps=norm.eps)

        q = project(attn.to_q, attn.norm_q, attn.num_heads)
        k = project(attn.to_k, attn.norm_k, attn.num_kv_heads)
        k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=2)
        scores = torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(attn.head_dim)
        if x["mask"] is not None:
            scores = scores.masked_fill(~x["mask"], -math.inf)
        assert torch.allclose(scores.softmax(-1).float(), P, atol=1e-5)
        # 3. P·V through the gate and output projection is the module's output
        v = x["value"].repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=2)
        pv = torch.einsum("nhqk,nkhd->nqhd", P, v.float()).flatten(2)
        out = attn.to_out[0](pv * torch.sigmoid(x["gate"]))
        assert torch.allclose(out, x["output"], atol=1e-5)


def test_all_masked_rows_are_zero_not_nan():
    q, k = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    mask = torch.tensor([[False, True, True], [False, False, False], [True, True, True]]).view(1, 1, 3, 3)
    P = attention_probabilities(q, k, mask)
    assert not P.isnan().any()
    assert torch.equal(P[0, :, 1], torch.zeros(2, 3)) and P[0, :, 0, 0].abs().max() == 0


def test_content_tokens_follow_template_arithmetic(turbo, encoded):
    tok = turbo.tokenizer
    assert encoded.num_suffix.tolist() == [5, 5]
    for i, prompt in enumerate(PROMPTS):
        n = len(tok(prompt).input_ids)
        assert encoded.mask.shape[1] == SEQ  # prefix (34) dropped: max_sequence_length positions remain
        assert int(encoded.mask[i].sum()) == n + 5  # prompt + 5-token template suffix after the padding
        content = encoded.content[i]
        assert int(content.sum()) == n and bool(content[:n].all())  # the prompt's tokens, at the front
    long = encode(tok, turbo.text_encoder, ["word " * 40], 16, tuple(turbo.variant.select_layers))
    assert int(long.mask.sum()) == 16 and int(long.content.sum()) == 16 - 5  # truncated prompt


THINK = ("<|im_start|>system\nignored<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
         "<think>\nOrange fur against white snow, low winter sun.\n</think>\n")


def test_raw_route_content_tokens_are_the_user_text_alone(turbo):
    """A `<think>` prompt's tail is far longer than the 5-token suffix: its content tokens must still be exactly the
    user text, so think_vs_plain compares the same tokens — the encoder is causal, so they are the same states."""
    layers = tuple(turbo.variant.select_layers)
    think = encode(turbo.tokenizer, turbo.text_encoder, [THINK.format(PROMPTS[0]), PROMPTS[1]], SEQ, layers)
    plain = encode(turbo.tokenizer, turbo.text_encoder, PROMPTS, SEQ, layers)
    n = len(turbo.tokenizer(PROMPTS[0]).input_ids)
    tail = len(turbo.tokenizer(THINK.format(PROMPTS[0]).split("user\n", 1)[1][len(PROMPTS[0]):]).input_ids)
    assert think.num_suffix.tolist() == [tail, 5] and tail > 5
    assert int(think.mask[0].sum()) == n + tail and int(think.content[0].sum()) == n
    for i in range(2):
        assert torch.allclose(think.taps[i][think.content[i]], plain.taps[i][plain.content[i]], atol=1e-5)
    # the fast path drops the pad columns: the same content tokens must survive, row by row
    from krea_sweeps.sampler import trim_padding

    trimmed = trim_padding(think)
    assert trimmed.mask.shape[1] < SEQ and torch.equal(trimmed.num_suffix, think.num_suffix)
    for i in range(2):
        assert torch.equal(trimmed.taps[i][trimmed.content[i]], think.taps[i][think.content[i]])
        alone = trim_padding(think.index(i))  # one prompt: no pads left at all, the mask is all True
        assert bool(alone.mask.all()) and torch.equal(alone.taps[0][alone.content[0]], think.taps[i][think.content[i]])
    with pytest.raises(ConfigError, match="sampler.max_sequence_length"):  # a tail that leaves no room
        encode(turbo.tokenizer, turbo.text_encoder, [THINK.format("a fox")], 8, layers)


def test_encode_cache_keeps_each_rows_tail_length_on_disk(turbo, tmp_path):
    from krea_sweeps.prompts import EncodeCache

    prompts = [THINK.format(PROMPTS[0]), PROMPTS[0]]
    first = EncodeCache(tmp_path).get(turbo, prompts, SEQ)
    again = EncodeCache(tmp_path)  # a fresh process's cache: everything read back from the safetensors files
    loaded = again.get(turbo, prompts, SEQ)
    assert again.hits == 2 and again.misses == 0
    assert torch.equal(loaded.num_suffix, first.num_suffix) and loaded.num_suffix[0] > 5
    assert torch.equal(loaded.content, first.content)
    assert torch.equal(loaded.index(0).content[0], first.content[0])


def test_think_and_plain_metrics_average_the_same_tokens(job_ctx):
    """tap_norms and fusion_attention over a `<think>` prompt's content tokens = over the same prompt without it."""
    from krea_sweeps.metrics.conditioning import FusionAttention, TapNorms

    think = job_ctx("prompts=think", "metrics=[tap_norms]")
    plain = job_ctx("prompts=think_plain", "metrics=[tap_norms]")
    n = [len(plain.model.tokenizer(p).input_ids) for p in plain.job.prompts]
    a, b = TapNorms().compute(think), TapNorms().compute(plain)
    assert a.summary == pytest.approx(b.summary, rel=1e-5)
    fa = FusionAttention(save_probs=False).compute(think)
    assert [r["content_tokens"] for r in fa.rows] == n


# ------------------------------------------------------------------------------------ aggregates, known answers
def hub_tensor(peaks: list[int], heads: int = 2, peak: float = 0.45) -> torch.Tensor:
    """Tokens whose every (head, query) row puts `peak` on key peaks[t] and (1 − peak)/11 on each other key."""
    P = torch.full((len(peaks), heads, 12, 12), (1 - peak) / 11, dtype=torch.float64)
    for t, k in enumerate(peaks):
        P[t, :, :, k] = peak
    return P


def test_layer_aggregates_on_a_hand_made_tensor():
    s = layer_attention_stats(hub_tensor([6, 6, 6, 3]))
    col = np.full(12, 0.05)
    col[6], col[3] = (3 * 0.45 + 0.05) / 4, (0.45 + 3 * 0.05) / 4  # 0.35, 0.15
    assert np.allclose(s["strength"].numpy(), col) and math.isclose(float(s["strength"].sum()), 1.0)
    assert np.allclose(s["mean_map"].numpy(), np.tile(col, (12, 1)))
    assert s["hub"] == 6 and math.isclose(s["hub_ratio"], 0.35 / 0.15)
    share = np.zeros(12)
    share[6], share[3] = 0.75, 0.25
    assert np.allclose(s["top_key_share"].numpy(), share)
    assert s["head_hubs"].tolist() == [6, 6] and s["head_hub_agreement"] == 1.0
    h = -(0.45 * math.log(0.45) + 11 * 0.05 * math.log(0.05))
    assert math.isclose(s["entropy"], h) and math.isclose(s["entropy_norm"], h / math.log(12))
    uniform = layer_attention_stats(torch.full((3, 2, 12, 12), 1 / 12, dtype=torch.float64))
    assert math.isclose(uniform["entropy_norm"], 1.0)
    # per-prompt averaging: each prompt weighs equally, the hub comes from the averaged strengths
    avg = average_layer_stats([layer_attention_stats(hub_tensor([6])), layer_attention_stats(hub_tensor([3] * 9))])
    assert np.allclose(avg["top_key_share"].numpy()[[3, 6]], [0.5, 0.5])
    assert math.isclose(float(avg["strength"][3]), float(avg["strength"][6]))


def test_token_aggregates_on_a_hand_made_tensor():
    key_mask = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)  # 6 prompt, 2 pad, 2 suffix
    queries = torch.tensor([0, 1, 2])
    sink = torch.zeros(2, 3, 10, dtype=torch.float64)
    sink[..., 9] = 1.0  # all mass on the last suffix token (rank 7)
    s = token_attention_stats(sink, queries, key_mask, window=2)
    assert s["received_entropy_norm"] == 0.0 and s["top_received_x_uniform"] == 8.0 and s["top_received_rank"] == 7
    assert s["local_share"] == 0.0
    uniform = torch.zeros(2, 3, 10, dtype=torch.float64)
    uniform[..., key_mask] = 1 / 8
    u = token_attention_stats(uniform, queries, key_mask, window=2)
    assert math.isclose(u["received_entropy_norm"], 1.0) and math.isclose(u["top_received_x_uniform"], 1.0)
    assert math.isclose(u["local_share"], u["local_share_uniform"])
    assert math.isclose(u["local_share_uniform"], (3 + 4 + 5) / 3 / 8)  # ranks within ±2 of 0, 1, 2


# ------------------------------------------------------------------------------------ conditioning metrics
def test_cond_shift_is_zero_for_none_and_positive_for_solo(job_ctx):
    from krea_sweeps.metrics.conditioning import CondShift

    stock = CondShift().compute(job_ctx("metrics=[cond_shift]")).summary
    assert stock["cond_shift/fused/rel_l2"] == 0.0 and stock["cond_shift/normed/rel_l2"] == 0.0
    assert stock["cond_shift/fused/cos"] == pytest.approx(1.0, abs=1e-12)
    solo = CondShift().compute(job_ctx("metrics=[cond_shift]", "intervention=solo", "intervention.slot=7")).summary
    assert solo["cond_shift/fused/rel_l2"] > 0.01 and solo["cond_shift/normed/rel_l2"] > 0.01
    assert solo["cond_shift/fused/cos"] < 1.0


def test_slot_terms_sum_to_the_projector_output(job_ctx):
    from krea_sweeps.metrics.conditioning import SlotContribution, slot_terms
    from krea_sweeps.metrics.trace import text_trace

    ctx = job_ctx("metrics=[slot_contribution]")
    projector = ctx.text_path.text_fusion.projector
    for t in text_trace(ctx).prompts:
        s = slot_terms(t.slots, t.projected, t.weight)
        assert torch.allclose(s["terms"].sum(-1).float(), t.projected, atol=1e-6)
        with torch.no_grad():  # the module itself, on the slots it received
            assert torch.allclose(projector(t.slots).squeeze(-1), t.projected, atol=1e-6)
        assert np.array_equal(np.asarray(t.weight, dtype=np.float64), np.asarray(projector.weight[0], np.float64))
    out = SlotContribution().compute(ctx)
    assert out.summary["slot_contribution/sum_rel_error"] < 1e-6
    # under the card's solo probe only slot 7 (L23) contributes; removing it removes everything
    solo = SlotContribution().compute(job_ctx("metrics=[slot_contribution]", "intervention=solo",
                                              "intervention.slot=7")).summary
    terms = {k: v for k, v in solo.items() if k.startswith("slot_contribution/term_norm/")}
    assert terms.pop("slot_contribution/term_norm/L23") > 0 and set(terms.values()) == {0.0}
    assert solo["slot_contribution/drop/L23"] == 1.0 and solo["slot_contribution/top_drop_layer"] == 23


def test_projector_effective_weights_and_reference(job_ctx):
    from krea_sweeps.metrics.conditioning import ProjectorWeights
    from krea_sweeps.synthetic import projector_values

    turbo_w = np.array(projector_values()["turbo"])
    ctx = job_ctx("metrics=[projector]", "intervention=solo", "intervention.slot=7")
    out = ProjectorWeights(reference="raw").compute(ctx).summary
    assert out["projector/stock/L23"] == turbo_w[7] and out["projector/n_negative"] == 6
    eff = np.array([out[f"projector/effective/L{l}"] for l in ctx.model.variant.select_layers])
    expected = np.zeros(12)
    expected[7] = turbo_w[7]
    assert np.allclose(eff, expected, rtol=1e-6, atol=0) and out["projector/effective_fit_residual"] < 1e-6
    assert out["projector/cos_vs_reference"] == pytest.approx(1.0, abs=1e-4)  # the card: Raw vs Turbo ≈ 1.0
    assert out["projector/cos_vs_reference"] < 1.0  # the synthetic Raw carries the 3-decimal published values
    same = ProjectorWeights(reference="turbo").compute(ctx).summary
    assert same["projector/cos_vs_reference"] == 1.0 and same["projector/max_abs_diff_vs_reference"] == 0.0


def test_fusion_and_refiner_attention_metrics(turbo, job_ctx):
    from krea_sweeps.metrics.conditioning import FusionAttention, RefinerAttention, TapNorms

    ctx = job_ctx("metrics=[fusion_attention,refiner_attention,tap_norms]")
    out = FusionAttention().compute(ctx)
    layers = ctx.model.variant.select_layers
    n_content = [len(turbo.tokenizer(p).input_ids) for p in ctx.job.prompts]
    assert [r["content_tokens"] for r in out.rows] == n_content
    assert out.arrays["block0.probs"].shape == (sum(n_content), 2, 12, 12)
    for b in (0, 1):
        key = f"fusion_attention/block{b}"
        assert sum(out.summary[f"{key}/strength/L{l}"] for l in layers) == pytest.approx(1.0)
        assert sum(out.summary[f"{key}/top_key_share/L{l}"] for l in layers) == pytest.approx(1.0)
        hub = out.summary[f"{key}/hub_layer"]
        assert out.summary[f"{key}/hub_strength"] == max(out.summary[f"{key}/strength/L{l}"] for l in layers)
        assert out.summary[f"{key}/hub_strength"] == out.summary[f"{key}/strength/L{hub}"]
        image, cap = out.images[f"{key}/mean_map"]
        assert image.ndim == 3 and image.shape[2] == 3 and 0 <= image.min() and image.max() <= 1 and cap
    ref = RefinerAttention().compute(ctx).summary
    for b in (0, 1):
        assert 0 < ref[f"refiner_attention/block{b}/received_entropy_norm"] <= 1
        assert ref[f"refiner_attention/block{b}/top_received_x_uniform"] >= 1
    taps = TapNorms().compute(ctx).summary
    assert taps["tap_norms/growth_L35_over_L2"] == pytest.approx(taps["tap_norms/L35"] / taps["tap_norms/L2"])
    from krea_sweeps.metrics.trace import text_trace

    # one shared trace served all three metrics of this stock job (the stock trace is kept per process)
    shared = text_trace(ctx, intervened=False)
    assert text_trace(ctx) is shared and {"fusion_attention", "refiner_attention"} <= shared.parts
    assert ("text_trace", True) not in ctx.cache


def test_conditioning_only_run_never_loads_dit_blocks_or_vae(job_ctx, session):
    from krea_sweeps.session import Session
    from krea_sweeps.task import execute

    fresh = Session()  # seeded with the loaded tokenizer and text encoder, to skip re-reading them
    fresh.models.parts.update({k: v for k, v in session.models.parts.items() if k[0] in ("tokenizer", "text_encoder")})
    ctx = job_ctx("metrics=[projector,fusion_attention,refiner_attention,cond_shift,slot_contribution,tap_norms]",
                  "conditioning_only=true")
    record = execute(ctx.job, fresh).record
    assert fresh.models.load_counts.get("text_path") == 1
    assert "transformer" not in fresh.models.load_counts and "vae" not in fresh.models.load_counts
    assert not any(k[0] in ("transformer", "vae") for k in fresh.models.parts)
    assert record["images"] == [] and "fusion_attention/block0/hub_layer" in record["summary"]


# ------------------------------------------------------------------------------------ image metrics
def checkerboard(n: int = 8) -> np.ndarray:
    board = (np.indices((n, n)).sum(0) % 2).astype(np.float32)
    return np.repeat(board[..., None], 3, axis=-1)


def test_image_statistics_known_answers():
    flat = np.full((16, 16, 3), 0.3, dtype=np.float32)
    s = image_statistics(flat)
    assert s["sharpness"] == 0.0 and s["contrast"] == pytest.approx(0.0, abs=1e-12)
    assert s["intensity"] == pytest.approx(0.3) and s["saturation"] == 0.0 and s["colourfulness"] == pytest.approx(0)
    c = image_statistics(checkerboard())
    # 1-pixel black/white squares: the 4-neighbour Laplacian is ±4 everywhere inside → variance 16
    assert c["sharpness"] == pytest.approx(16.0) and c["contrast"] == pytest.approx(0.5)
    assert c["intensity"] == pytest.approx(0.5) and c["saturation"] == 0.0
    red = np.zeros((4, 4, 3))
    red[..., 0] = 1.0  # rg = 1, yb = 0.5, no spread: 0.3·√1.25
    assert image_statistics(red)["colourfulness"] == pytest.approx(0.3 * math.sqrt(1.25))
    assert image_statistics(red)["saturation"] == 1.0


def test_rgb_rms_and_diversity_known_answers():
    from types import SimpleNamespace

    board = checkerboard()
    assert rgb_rms(board, board.copy()) == 0.0
    assert rgb_rms(np.zeros((4, 4, 3)), np.ones((4, 4, 3))) == 1.0
    assert rgb_rms(board, np.full_like(board, 0.5)) == pytest.approx(0.5)
    black, white = np.zeros((4, 4, 3)), np.ones((4, 4, 3))
    job = SimpleNamespace(seeds=[0, 1, 2], images={(0, 0): black, (0, 1): white, (0, 2): black,
                                                   (1, 0): board, (1, 1): board, (1, 2): board})
    out = Diversity().compute(job)
    assert [r["rgb_rms"] for r in out.rows] == pytest.approx([2 / 3, 0.0])
    assert out.summary["diversity/rgb_rms"] == pytest.approx(1 / 3)


def tiny_clip(folder):
    """A random-weight CLIP saved as a real transformers folder (byte-level vocabulary, no merges)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in bytes_to_unicode().values():
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer(vocab=vocab, merges=[])).save_pretrained(folder)
    return folder


def test_clip_score_with_a_local_clip_model(tmp_path):
    from types import SimpleNamespace

    folder = tiny_clip(tmp_path / "clip")
    metric = ClipScore(path=str(folder))
    metric.validate(SimpleNamespace(cfg=None))
    rng = np.random.default_rng(0)
    images = {(p, s): rng.random((64, 64, 3)) for p in (0, 1) for s in (0, 1)}
    out = metric.compute(SimpleNamespace(images=images, prompts=["a red fox", "a lighthouse on a coast"]))
    assert len(out.rows) == 4 and all(0 <= r["clip_score"] <= 100 for r in out.rows)
    assert out.summary["clip_score/score"] == pytest.approx(np.mean([r["clip_score"] for r in out.rows]))
    assert metric.compute(SimpleNamespace(images=images, prompts=["a red fox", "a lighthouse on a coast"])).rows \
        == out.rows  # deterministic


# ------------------------------------------------------------------------------------ declared summary keys
def assert_declares_exactly(metric, job, summary: dict) -> None:
    """Each reported key is declared and each declared key reported: what `objective` is checked against up front."""
    from krea_sweeps.metrics.base import key_matches

    declared = metric.summary_keys(job)
    assert declared is not None, f"{metric.name} declares no summary keys"
    assert [k for k in summary if not any(key_matches(d, k) for d in declared)] == [], metric.name
    assert [d for d in declared if not any(key_matches(d, k) for k in summary)] == [], metric.name


def test_every_metric_declares_exactly_the_keys_it_reports(job_ctx):
    from pathlib import Path

    metric_names = sorted(f.stem for f in (Path(__file__).parents[1] / "conf" / "metrics").glob("*.yaml"))
    conditioning = ["projector", "fusion_attention", "refiner_attention", "cond_shift", "slot_contribution",
                    "tap_norms"]
    ctx = job_ctx(f"metrics=[{','.join(conditioning)}]", "metrics.projector.reference=raw", "intervention=solo",
                  "intervention.slot=6")
    for metric in ctx.job.metrics:
        assert_declares_exactly(metric, ctx.job, metric.compute(ctx).summary)
    image = job_ctx("metrics=[image_stats,image_distance,diversity]", "seeds=[0,1]")  # clip_score: needs a model
    rng = np.random.default_rng(0)
    image.images = {(p, s): rng.random((8, 8, 3)) for p in range(len(image.job.prompts)) for s in (0, 1)}
    image.baseline_images = {k: rng.random((8, 8, 3)) for k in image.images}
    for metric in image.job.metrics:
        assert_declares_exactly(metric, image.job, metric.compute(image).summary)
    methods = ["attribution", "concept_maps", "restoration", "word_maps"]  # their declared keys: tests/test_methods.py
    covered = [m.name for m in ctx.job.metrics + image.job.metrics] + methods + ["clip_score"]
    assert sorted(covered) == metric_names  # all covered (clip_score needs a CLIP model: its keys are checked above)
    assert ClipScore(path="somewhere").summary_keys(image.job) == ["clip_score/score"]


# ------------------------------------------------------------------------------------ bad input
def test_bad_metric_input_fails_before_model_load(turbo, tmp_path, monkeypatch, caplog):
    from krea_sweeps.plan import plan
    from krea_sweeps.sweeps import check_keys_compose

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        plan(compose(["metrics=[image_distance]", "conditioning_only=true"]))
    assert e.value.key == "metrics.image_distance"
    with pytest.raises(ConfigError) as e:
        plan(compose(["metrics=[diversity]", "seeds=[0]"]))
    assert e.value.key == "seeds"
    with pytest.raises(ConfigError) as e:
        plan(compose(["metrics=[clip_score]"]))  # no CLIP path: an error, not an empty summary
    assert e.value.key == "metrics.clip_score.path" and "no CLIP model" in e.value.problem
    with pytest.raises(ConfigError) as e:
        plan(compose(["metrics=[clip_score]", f"metrics.clip_score.path={turbo.sources.text_encoder}"]))
    assert e.value.key == "metrics.clip_score.path" and "not a CLIP model" in e.value.problem
    with pytest.raises(ConfigError) as e:  # a choice: typed, so composition refuses it
        check_keys_compose(["metrics=[projector]", "metrics.projector.reference=sdxl"])
    assert e.value.key == "metrics.projector.reference" and "use one of: raw, turbo" in str(e.value)
    assert plan(compose(["metrics=[diversity]", "seeds=[0,1]"])).generates
    caplog.set_level("WARNING")
    assert ClipScore(path=None).compute(None).summary == {}
    assert "clip_score skipped" in caplog.text


def test_unknown_metric_is_one_clear_line(cli):
    r = cli("metrics=[nope]", "wandb.mode=disabled")
    assert r.returncode != 0
    assert "nope" in r.stderr and "fusion_attention" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------ runs
def test_three_job_sweep_generates_each_stock_image_once(cli):
    r = cli("-m", "intervention=solo", "intervention.slot=0,7,11", "metrics=[image_distance,image_stats]",
            "prompts.prompts=[A red fox sitting in fresh snow.]", "sampler.steps=2",
            f"sampler.max_sequence_length={SEQ}", "wandb.mode=disabled")
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = cli.cwd / "outputs" / "default"
    results = [json.loads(f.read_text()) for f in sorted(sweep.glob("*/result.json"))]
    assert len(results) == 3
    assert len(list((sweep / "_baselines").glob("*.safetensors"))) == 1  # 1 prompt × 1 seed
    assert sum("baseline" in res["timings"] for res in results) == 1  # generated by the first job only
    for res in results:
        assert res["summary"]["image_distance/rgb_rms"] > 0
        rows = [row for row in res["rows"] if row["metric"] == "image_distance"]
        assert [(row["prompt_idx"], row["seed"]) for row in rows] == [(0, 0)]


def test_conditioning_cli_writes_numbers_to_result_json_and_offline_wandb(cli):
    from wandb_offline import offline_runs, read_run

    r = cli("metrics=[fusion_attention,cond_shift,slot_contribution]", "prompts=styles", "wandb.mode=offline",
            f"sampler.max_sequence_length={SEQ}")
    assert r.returncode == 0, r.stderr[-3000:]
    job_dir = next((cli.cwd / "outputs" / "default").glob("*/result.json")).parent
    result = json.loads((job_dir / "result.json").read_text())
    summary = result["summary"]
    for key in ("fusion_attention/block0/strength/L20", "fusion_attention/block1/hub_layer",
                "fusion_attention/block0/top_key_share/L20", "cond_shift/fused/rel_l2", "slot_contribution/drop/L20"):
        assert key in summary
    assert summary["cond_shift/fused/rel_l2"] == 0.0
    assert {row["metric"] for row in result["rows"]} == {"fusion_attention", "cond_shift", "slot_contribution"}
    assert len([row for row in result["rows"] if row["metric"] == "fusion_attention"]) == 3
    assert (job_dir / "arrays" / "fusion_attention.block0.probs.npy").exists()
    run = read_run(offline_runs(job_dir)[0])
    assert run["summary"]["fusion_attention/block0/strength/L20"] == pytest.approx(
        summary["fusion_attention/block0/strength/L20"])
    for logged in ("rows", "fusion_attention/block0/mean_map", "fusion_attention/block1/head_maps"):  # Table, Images
        assert f"{logged}/_type" in run["history_keys"]
    assert "fusion_attention/block0/mean_map/caption" in run["history_keys"]
    log = (job_dir / "run.log").read_text()
    assert "loading text_path" in log and "loading transformer" not in log and "loading vae" not in log
