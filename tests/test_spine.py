"""The spine: tokenizer, encoding, generation, loading, and the run.py job lifecycle on the synthetic Krea 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from krea_sweeps.prompts import TEMPLATE_PREFIX, TEMPLATE_SUFFIX, encode, tokenize


# ------------------------------------------------------------------------------------------------ tokenizer
def test_qwen_tokenizer_template_lengths_and_specials(turbo):
    tok = turbo.tokenizer
    assert len(tok(TEMPLATE_PREFIX).input_ids) == 34
    assert len(tok(TEMPLATE_SUFFIX).input_ids) == 5
    assert tok.convert_tokens_to_ids("<think>") == 151667
    assert tok.convert_tokens_to_ids("</think>") == 151668
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.pad_token_id == 151643
    assert tok("Hello world").input_ids == [9707, 1879]  # Qwen's BPE, not a toy vocabulary


def test_raw_chat_route_keeps_the_assistant_turn(turbo):
    tok = turbo.tokenizer
    raw = ("<|im_start|>system\nignored system turn<|im_end|>\n<|im_start|>user\nA cat<|im_end|>\n"
           "<|im_start|>assistant\n<think>\nfur, whiskers\n</think>\n")
    ids, mask, prefix = tokenize(tok, [raw], 32)
    kept = ids[0][mask[0]].tolist()
    assert 151667 in kept and 151668 in kept  # <think> ... </think> survive
    text = tok.decode(kept[prefix:])
    assert text.startswith("A cat") and "ignored system turn" not in text
    assert ids.shape[1] == 32 + prefix  # same total length as the standard route


# ------------------------------------------------------------------------------------------------ encoding
def test_encode_equals_pipeline_get_text_hidden_states_bitwise(turbo):
    pipe = turbo.pipeline()
    prompts = ["A red fox sitting in fresh snow.", "A lighthouse."]
    ours = encode(turbo.tokenizer, turbo.text_encoder, prompts, 64, tuple(turbo.variant.select_layers))
    ref_taps, ref_mask = pipe.get_text_hidden_states(prompts, 64)
    assert ours.taps.shape == (2, 64, 12, 32)
    assert torch.equal(ours.taps, ref_taps) and torch.equal(ours.mask, ref_mask)


def test_encode_cache_encodes_each_prompt_once_and_reloads_from_disk(turbo, tmp_path):
    from krea_sweeps.prompts import EncodeCache

    cache = EncodeCache(tmp_path)
    a = cache.get(turbo, ["one", "two"], 32)
    b = cache.get(turbo, ["two", "one"], 32)
    assert cache.misses == 2 and cache.hits == 2
    assert torch.equal(a.taps[0], b.taps[1])
    fresh = EncodeCache(tmp_path)
    c = fresh.get(turbo, ["one"], 32)
    assert fresh.misses == 0 and torch.equal(c.taps[0], a.taps[0])


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("variant", ["turbo", "raw"])
def test_generation_equals_krea2pipeline_with_prompt_bitwise(variant, request):
    from krea_sweeps.sampler import Sampler, generate

    model = request.getfixturevalue(variant)
    pipe = model.pipeline()
    sampler = Sampler(steps=3, max_sequence_length=48).resolved(model.variant)
    layers = tuple(model.variant.select_layers)
    cond = encode(model.tokenizer, model.text_encoder, ["a red fox"], 48, layers)
    neg = encode(model.tokenizer, model.text_encoder, [""], 48, layers)
    ours = generate(pipe, sampler, cond, neg, seed=5)
    ref = pipe("a red fox", height=64, width=64, num_inference_steps=3, guidance_scale=sampler.guidance,
               generator=torch.Generator().manual_seed(5), output_type="np", max_sequence_length=48).images[0]
    assert ours.shape == (64, 64, 3)
    assert np.array_equal(ours, ref)


def test_denoise_state_tracks_branch_and_step_under_cfg(raw):
    from krea_sweeps.sampler import STATE, Sampler, generate

    pipe = raw.pipeline()
    seen = []
    handle = pipe.transformer.text_fusion.register_forward_pre_hook(lambda m, a: seen.append((STATE.branch, STATE.step)))
    try:
        layers = tuple(raw.variant.select_layers)
        cond = encode(raw.tokenizer, raw.text_encoder, ["x"], 16, layers)
        generate(pipe, Sampler(steps=2, max_sequence_length=16).resolved(raw.variant), cond, cond, seed=0)
    finally:
        handle.remove()
    assert seen == [("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1)]


# ------------------------------------------------------------------------------------------------ loading
def test_single_file_round_trip_and_text_path_reads_only_its_tensors(turbo, monkeypatch):
    """The synthetic DiT is stored with original (`txtfusion.*`) keys; diffusers' single-file loader gives it back
    unchanged, and the text-path load reads only text_fusion/txt_in tensors."""
    import safetensors

    from krea_sweeps import models
    from krea_sweeps.synthetic import build_transformer

    reference = build_transformer("turbo").state_dict()
    loaded = turbo.transformer.state_dict()
    assert set(loaded) == set(reference)
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)

    read_keys = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.inner = real_open(*a, **k)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read_keys.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    tensors = models.read_text_path_tensors(turbo.sources.transformer)
    assert read_keys and all(k.startswith(("txtfusion.", "txtmlp.")) for k in read_keys)
    assert set(tensors) == {k for k in reference if k.startswith(("text_fusion.", "txt_in."))}
    assert all(torch.equal(tensors[k], reference[k]) for k in tensors)


def test_text_path_alone_matches_the_full_transformer(turbo):
    from krea_sweeps.models import LoadedModel, ModelVariant, TextPath

    alone = LoadedModel(ModelVariant(name="turbo"))._load_text_path()
    full = TextPath.of(turbo.transformer)
    taps = torch.randn(1, 10, 12, 32)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 7:] = False
    assert torch.equal(alone(taps, mask), full(taps, mask))


def test_raw_and_turbo_have_their_published_projectors_and_differ_elsewhere(turbo, raw):
    from krea_sweeps.synthetic import projector_values

    values = projector_values()
    assert torch.equal(turbo.transformer.text_fusion.projector.weight[0], torch.tensor(values["turbo"]))
    assert torch.equal(raw.transformer.text_fusion.projector.weight[0], torch.tensor(values["raw"]))
    assert not torch.equal(turbo.transformer.img_in.weight, raw.transformer.img_in.weight)
    assert turbo.text_encoder is raw.text_encoder  # one shared frozen encoder
    assert not any(p.requires_grad for p in turbo.transformer.parameters())


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model=nope"], "model"),
        (["prompts=nope"], "prompts"),
        (["model.path=/does/not/exist.safetensors"], "model.path"),
        (["prompts=file"], "prompts.path"),
        (["prompts=file", "prompts.path=/does/not/exist.txt"], "prompts.path"),
        (["sampler.height=100"], "sampler.height"),
        (["seeds=[]"], "seeds"),
        (["sampler.guidance=nan"], "sampler.guidance"),
    ],
)
def test_bad_input_fails_in_one_line_before_any_load(overrides, key, cli):
    result = cli(*overrides, "wandb.mode=disabled")
    assert result.returncode != 0
    err = result.stderr.strip().splitlines()
    assert any(key in line for line in err), result.stderr
    assert "loading" not in result.stdout + result.stderr  # nothing was loaded
    assert not list(cli.cwd.rglob("result.json"))


def test_empty_prompt_file_and_non_krea_checkpoint_are_rejected(cli, tmp_path):
    from safetensors.torch import save_file

    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    result = cli("prompts=file", f"prompts.path={empty}", "wandb.mode=disabled")
    assert result.returncode == 2 and "prompts.path" in result.stderr and "no prompts" in result.stderr
    bogus = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(bogus))
    result = cli(f"model.path={bogus}", "model.text_encoder_path=x", "model.vae_path=x",
                 "model.transformer_config=x", "wandb.mode=disabled")
    assert result.returncode == 2 and "not a Krea 2 checkpoint" in result.stderr


# ------------------------------------------------------------------------------------------------ the run
def test_default_run_writes_result_images_and_an_offline_wandb_run(cli):
    from wandb_offline import offline_runs, read_run

    result = cli()
    assert result.returncode == 0, result.stderr[-2000:]
    job = cli.cwd / "outputs" / "default" / "stock"
    record = json.loads((job / "result.json").read_text())
    assert record["status"] == "done" and record["synthetic"] is True
    assert {"image_stats/sharpness", "image_stats/contrast"} <= set(record["summary"])
    assert len(record["rows"]) == 2 and all((job / p).exists() for p in record["images"])
    assert set(record["timings"]) >= {"encode", "load", "total"}
    log = result.stdout + result.stderr
    assert "done stock" in log and "wandb sync" in log
    (run_dir,) = offline_runs(job)
    run = read_run(run_dir)
    assert "synthetic" in run["run"]["tags"] and "variant:turbo" in run["run"]["tags"]
    assert run["config"]["model"]["name"] == "turbo"
    assert run["summary"]["image_stats/sharpness"] == pytest.approx(record["summary"]["image_stats/sharpness"])
    assert run["exit_code"] == 0


def test_two_job_multirun_loads_once_and_gives_two_runs_in_one_group(cli):
    from wandb_offline import offline_runs, read_run

    result = cli("-m", "seeds=0,1", "prompts.prompts=[a small boat]", "sampler.max_sequence_length=32")
    assert result.returncode == 0, result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert log.count("loading transformer") == 1 and log.count("loading text_encoder") == 1
    sweep = cli.cwd / "outputs" / "default"
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    assert len(records) == 2
    runs = [read_run(d) for d in offline_runs(sweep)]
    assert len(runs) == 2
    assert {r["run"]["group"] for r in runs} == {"default"}
    assert len({r["run"]["id"] for r in runs}) == 2
    assert sorted(r["config"]["seeds"] for r in runs) == [0, 1]
    by_seed = {r["config"]["seeds"]: r for r in runs}
    for rec in records:
        seed = rec["config"]["seeds"]
        assert by_seed[seed]["summary"]["image_stats/intensity"] == pytest.approx(rec["summary"]["image_stats/intensity"])
    assert records[0]["summary"] != records[1]["summary"]  # different seeds, different images
