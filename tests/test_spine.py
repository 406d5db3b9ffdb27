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
@pytest.mark.parametrize("model", ["turbo", "toy_turbo"])  # the random-weight and the trained toy model
def test_encode_equals_pipeline_get_text_hidden_states_bitwise(model, request):
    turbo = request.getfixturevalue(model)
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
@pytest.mark.parametrize("variant", ["turbo", "raw", "toy_turbo", "toy_raw"])
def test_generation_equals_krea2pipeline_with_prompt_bitwise(variant, request):
    from krea_sweeps.sampler import Denoising, Sampler, generate

    model = request.getfixturevalue(variant)
    pipe = model.pipeline()
    sampler = Sampler(steps=3, max_sequence_length=48).resolved(model.variant)
    layers = tuple(model.variant.select_layers)
    cond = encode(model.tokenizer, model.text_encoder, ["a red fox"], 48, layers)
    neg = encode(model.tokenizer, model.text_encoder, [""], 48, layers)
    ours = generate(pipe, sampler, cond, neg, seed=5, denoising=Denoising())
    ref = pipe("a red fox", height=64, width=64, num_inference_steps=3, guidance_scale=sampler.guidance,
               generator=torch.Generator().manual_seed(5), output_type="np", max_sequence_length=48).images[0]
    assert ours.shape == (64, 64, 3)
    assert np.array_equal(ours, ref)


def test_denoise_state_tracks_branch_and_step_under_cfg(raw):
    """Branch and step come from what the pipeline passes: at every transformer call the state's step is the
    scheduler's index of the timestep being run, and the branch is the embeddings object's — with the positive and
    negative prompts given as one and the same tensor (identity, not content, tells them apart)."""
    from krea_sweeps.sampler import Denoising, Sampler, generate

    pipe = raw.pipeline()
    state = Denoising()
    seen = []

    def record(module, args):
        seen.append((state.branch, state.step, pipe.scheduler.index_for_timestep(pipe.current_timestep)))

    handle = pipe.transformer.text_fusion.register_forward_pre_hook(record)
    try:
        layers = tuple(raw.variant.select_layers)
        cond = encode(raw.tokenizer, raw.text_encoder, ["x"], 16, layers)
        generate(pipe, Sampler(steps=3, max_sequence_length=16).resolved(raw.variant), cond, cond, seed=0,
                 denoising=state)
    finally:
        handle.remove()
    assert [(b, s) for b, s, _ in seen] == [("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1), ("cond", 2),
                                            ("uncond", 2)]
    assert all(s == index for _, s, index in seen)
    assert (state.branch, state.step, state.seeds) == ("cond", 0, [])  # no call running: the text path's own
    assert not state.calls and not state.running


def test_denoise_state_branch_is_the_embeddings_object_not_the_call_order(raw):
    """A transformer called negative first (and twice in a row) still gets the right branch; embeddings that are
    neither object the pipeline prepared (e.g. both halves batched, as a batched-CFG release would) raise."""
    import torch

    from krea_sweeps.sampler import Denoising

    pipe = raw.pipeline()
    layers = tuple(raw.variant.select_layers)
    pos = encode(raw.tokenizer, raw.text_encoder, ["a red fox"], 16, layers)
    neg = encode(raw.tokenizer, raw.text_encoder, [""], 16, layers)
    state = Denoising()
    seen = []
    handle = pipe.transformer.text_fusion.register_forward_pre_hook(lambda m, a: seen.append(state.branch))
    transformer = pipe.transformer
    image = torch.zeros(1, 16, transformer.config.in_channels)
    ids = torch.zeros(16 + 16, 3)

    def call(embeds, mask):
        transformer(hidden_states=image, encoder_hidden_states=embeds, timestep=torch.ones(1), position_ids=ids,
                    encoder_attention_mask=mask, return_dict=False)

    try:
        with torch.no_grad(), state.following(pipe, pos.taps, neg.taps, [0]) as (_, _, positive, negative):
            n_embeds, n_mask = pipe.encode_prompt(None, prompt_embeds=negative, prompt_embeds_mask=neg.mask)
            p_embeds, p_mask = pipe.encode_prompt(None, prompt_embeds=positive, prompt_embeds_mask=pos.mask)
            call(n_embeds, n_mask)
            call(n_embeds, n_mask)
            call(p_embeds, p_mask)
            with pytest.raises(RuntimeError, match="cannot tell the CFG branch"):
                call(torch.cat([p_embeds, n_embeds]), torch.cat([p_mask, n_mask]))
    finally:
        handle.remove()
    assert seen == ["uncond", "uncond", "cond"]
    assert "encode_prompt" not in pipe.__dict__


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

    alone = LoadedModel(ModelVariant(name="turbo", base="turbo"))._load_text_path()
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
def test_default_run_is_the_toy_with_its_world_prompts_and_writes_an_offline_wandb_run(cli_process):
    """The README's `python run.py`, as a real process, with the user's defaults (not the tests' plumbing pins): the
    trained toy Turbo on the toy world's captions, tagged synthetic:toy with its warning, scenes in the record;
    everything is on disk and logged before its fast exit."""
    from wandb_offline import offline_runs, read_run

    cli = cli_process
    result = cli(user_defaults=True)
    assert result.returncode == 0, result.stderr[-2000:]
    job = cli.cwd / "outputs" / "default" / "stock"
    record = json.loads((job / "result.json").read_text())
    assert record["status"] == "done" and record["synthetic"] is True and record["synthetic_weights"] == "toy"
    assert {"image_stats/sharpness", "image_stats/contrast"} <= set(record["summary"])
    assert len(record["rows"]) == 4 and all((job / p).exists() for p in record["images"])
    assert [s["caption"] for s in record["scenes"]] == record["job"]["prompts"]  # each prompt has its ground truth
    assert set(record["timings"]) >= {"encode", "load", "total"}
    log = result.stdout + result.stderr
    assert "done stock" in log and "wandb sync" in log and "toy Krea 2" in log  # the warning
    (run_dir,) = offline_runs(job)
    run = read_run(run_dir)
    assert {"synthetic", "synthetic:toy", "variant:turbo"} <= set(run["run"]["tags"])
    assert run["config"]["model"]["name"] == "turbo"
    # comparable across jobs: job_type = the kind of edit, stable keys W&B can group and filter on
    assert run["run"]["job_type"] == "stock" and run["config"]["variant"] == "turbo"
    assert run["config"]["intervention"]["kind"] == "stock" and run["config"]["synthetic"] is True
    assert {"site", "slot", "layer", "strength"} <= set(run["config"]["intervention"])
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


# ------------------------------------------------------------------------------------------------ review fixes
def test_bf16_text_path_alone_matches_the_full_transformer_and_diffusers_dtype_rule(tmp_path):
    """One dtype rule for every loading path: diffusers' `from_pretrained` keeps `_keep_in_fp32_modules` in float32
    for bf16 too; the single-file DiT and the slice-read text path follow it."""
    from diffusers import Krea2Transformer2DModel

    from krea_sweeps.models import LoadedModel, ModelVariant, TextPath

    model = LoadedModel(ModelVariant(name="turbo", base="turbo", dtype="bfloat16", device="cpu"))
    alone, full = model._load_text_path(), model.transformer
    gen = torch.Generator().manual_seed(0)
    taps = torch.randn(2, 10, 12, 32, generator=gen).to(torch.bfloat16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        assert torch.equal(alone(taps, mask), TextPath.of(full)(taps, mask))
    full.save_pretrained(str(tmp_path / "transformer"))
    folder = Krea2Transformer2DModel.from_pretrained(str(tmp_path), subfolder="transformer", torch_dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in folder.named_parameters()}
    assert {n: p.dtype for n, p in full.named_parameters()} == dtypes
    assert dtypes["text_fusion.layerwise_blocks.0.norm1.weight"] == torch.float32
    assert dtypes["text_fusion.layerwise_blocks.0.attn.to_q.weight"] == torch.bfloat16
    assert {n: p.dtype for n, p in alone.named_parameters()} == {n: d for n, d in dtypes.items()
                                                                 if n.startswith(("text_fusion.", "txt_in."))}



def test_float32_module_list_is_diffusers_own_and_the_text_path_is_built_from_config():
    """Our FP32_MODULES is diffusers' declaration for Krea 2 (checked here, so a release that changes it fails a test),
    and the slice-read text path is the DiT's own modules from its config: every tensor real (none left on the meta
    device), the same parameter names and shapes as the full DiT's text modules, equal values."""
    from diffusers import Krea2Transformer2DModel

    from krea_sweeps.models import FP32_MODULES, LoadedModel, ModelVariant

    assert tuple(Krea2Transformer2DModel._keep_in_fp32_modules) == FP32_MODULES
    model = LoadedModel(ModelVariant(name="turbo", base="turbo", device="cpu"))
    alone, full = model._load_text_path(), model.transformer
    tensors = dict(alone.state_dict())
    assert not any(t.is_meta for t in tensors.values())
    reference = {k: v for k, v in full.state_dict().items() if k.startswith(("text_fusion.", "txt_in."))}
    assert tensors.keys() == reference.keys()
    assert all(torch.equal(tensors[k], reference[k]) for k in tensors)


def _lora_with_text_path_keys(raw) -> dict:
    """The synthetic Turbo LoRA plus weights on the text path (`txtfusion.…wq`, `txtmlp.1`), original naming."""
    from krea_sweeps.synthetic import build_turbo_lora

    gen = torch.Generator().manual_seed(3)
    q = raw.transformer.text_fusion.layerwise_blocks[0].attn.to_q.weight
    lin = raw.transformer.txt_in.linear_1.weight
    out = build_turbo_lora()
    for key, (out_dim, in_dim) in {"txtfusion.layerwise_blocks.0.attn.wq": q.shape, "txtmlp.1": lin.shape}.items():
        out[f"diffusion_model.{key}.lora_A.weight"] = 0.5 * torch.randn(2, in_dim, generator=gen)
        out[f"diffusion_model.{key}.lora_B.weight"] = 0.5 * torch.randn(out_dim, 2, generator=gen)
    return out


def test_turbo_lora_conditioning_follows_its_strength_after_a_generation_job(raw, tmp_path):
    """A LoRA with text-path weights reaches the text path, at the strength of the job asking, not of the job before."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from krea_sweeps.models import LoadedModel, ModelVariant
    from krea_sweeps.sampler import Denoising, Sampler, generate

    lora = tmp_path / "turbo_lora_with_text.safetensors"
    save_file(_lora_with_text_path_keys(raw), str(lora))

    def turbo_lora(strength: float) -> LoadedModel:
        model = LoadedModel(ModelVariant(name="turbo_lora", base="raw", lora="turbo", lora_strength=strength, is_distilled=True, steps=1,
                                         guidance=0.0))
        model.sources = replace(model.sources, lora=str(lora))
        return model

    assert not LoadedModel(ModelVariant(name="turbo_lora", base="raw", lora="turbo")).lora_touches_text_path  # synthetic LoRA: blocks only
    generating = turbo_lora(1.0)
    assert generating.lora_touches_text_path
    layers = tuple(raw.variant.select_layers)
    cond = encode(raw.tokenizer, raw.text_encoder, ["a red fox"], 16, layers)
    generate(generating.pipeline(), Sampler(steps=1, max_sequence_length=16).resolved(generating.variant), cond, cond, 0,
             denoising=Denoising())
    with torch.no_grad():
        half = turbo_lora(0.5).text_path(cond.taps, cond.mask)
        zero = turbo_lora(0.0).text_path(cond.taps, cond.mask)
        one = turbo_lora(1.0).text_path(cond.taps, cond.mask)
        stock = raw.text_path(cond.taps, cond.mask)
    assert torch.allclose(zero, stock, atol=1e-6)
    assert (half - zero).abs().max() > 1e-3 and (one - half).abs().max() > 1e-3


def test_variant_identity_is_resolved_and_keys_the_stock_images(monkeypatch):
    from conftest import compose

    from krea_sweeps import synthetic
    from krea_sweeps.models import ModelVariant, sources_for
    from krea_sweeps.plan import plan
    from krea_sweeps.task import baseline_key

    auto = ModelVariant(name="turbo", base="turbo").identity()
    assert auto == ModelVariant(name="turbo", base="turbo", dtype="float32", device="cpu").identity()  # `auto` resolved
    assert auto["dtype"] == "torch.float32" and auto["device"] == "cpu"
    assert auto["transformer"] == sources_for(ModelVariant(name="turbo", base="turbo")).transformer
    assert auto["synthetic_version"] == synthetic.SYNTHETIC_VERSION
    assert ModelVariant(name="turbo", base="turbo", dtype="bfloat16").identity() != auto

    job = plan(compose(["metrics=[image_stats]"]))
    key = baseline_key(job, "a fox", 0, compiled_blocks=False)
    assert baseline_key(job, "a fox", 0, compiled_blocks=True) != key
    assert baseline_key(plan(compose(["metrics=[image_stats]", "model.dtype=float32"])), "a fox", 0, False) == key
    toy = plan(compose(["metrics=[image_stats]", "model/synthetic_weights=toy"]))  # the trained toy: its own files
    assert toy.variant.identity()["synthetic_version"].startswith("toy-")
    assert baseline_key(toy, "a fox", 0, compiled_blocks=False) != key
    strengths = [plan(compose(["model=turbo_lora", f"model.lora_strength={s}", "metrics=[image_stats]"]))
                 for s in (0.5, 0.8)]
    assert len({baseline_key(j, "a fox", 0, False) for j in strengths}) == 2

    # A new synthetic model (version bump) moves every part: the stock images' and the encode cache's keys
    # (prompts.EncodeCache keys on `sources.text_encoder`) both change.
    before = sources_for(ModelVariant(name="turbo", base="turbo"), ensure=False)
    monkeypatch.setattr(synthetic, "SYNTHETIC_VERSION", "v-next")
    after = sources_for(ModelVariant(name="turbo", base="turbo"), ensure=False)
    assert after.text_encoder != before.text_encoder and after.transformer != before.transformer
    assert baseline_key(job, "a fox", 0, compiled_blocks=False) != key


def _multirun_hydra_cfg(sweep, job: str):
    """What `HydraConfig.get()` holds for one job of a `-m` sweep (the fields `plan` reads)."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    return OmegaConf.create({"runtime": {"output_dir": str(sweep / job)}, "mode": RunMode.MULTIRUN,
                             "sweep": {"dir": str(sweep)}})


def test_resume_reruns_a_job_whose_inputs_changed_under_the_same_overrides(tmp_path, caplog):
    from conftest import compose

    from krea_sweeps.runner import run_job

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    cfg = compose(["prompts=file", f"prompts.path={prompts}", "metrics=[projector]", "wandb.mode=disabled"])
    hydra_cfg = _multirun_hydra_cfg(tmp_path / "sweep", "job")
    result = tmp_path / "sweep" / "job" / "result.json"
    caplog.set_level("INFO", logger="krea_sweeps")
    run_job(cfg, hydra_cfg)
    first = json.loads(result.read_text())
    run_job(cfg, hydra_cfg)
    assert "skip job" in caplog.text and json.loads(result.read_text()) == first
    caplog.clear()
    prompts.write_text("a blue whale\n")  # same command line, same folder, different input
    run_job(cfg, hydra_cfg)
    second = json.loads(result.read_text())
    assert "rerun job: its inputs changed" in caplog.text and "skip job" not in caplog.text
    assert second["job"]["prompts"] == ["a blue whale"] and second["fingerprint"] != first["fingerprint"]


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["sampler.steps=abc"], "sampler.steps", "not a whole number"),
        (["sampler.height=abc"], "sampler.height", "not a whole number"),
        (["model.steps=2.5"], "model.steps", "not a whole number"),
        (["model.guidance=abc"], "model.guidance", "not a number"),
        (["model.lora_strength=abc"], "model.lora_strength", "not a number"),
        (["sampler.guidance=true"], "sampler.guidance", "not a number"),
    ],
)
def test_bad_numbers_name_their_key_at_composition(overrides, key, words):
    """Typed groups (krea_sweeps/configs.py): a wrong type never reaches planning."""
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.sweeps import check_keys_compose

    with pytest.raises(ConfigError) as info:
        check_keys_compose([*overrides, "metrics=[projector]"])
    assert info.value.key == key and words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["seeds=[0,0]"], "seeds", "repeated"),
        (["+sampler.foo=1"], "sampler.foo", "has no field 'foo'"),
    ],
)
def test_bad_seeds_and_fields_name_their_key_at_planning(overrides, key, words):
    from conftest import compose

    from krea_sweeps.errors import ConfigError
    from krea_sweeps.plan import plan

    with pytest.raises(ConfigError) as info:
        plan(compose([*overrides, "metrics=[projector]"]))
    assert info.value.key == key and words in str(info.value) and "\n" not in str(info.value)


def test_instantiate_reports_the_innermost_cause():
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.plan import instantiate

    with pytest.raises(ConfigError) as info:  # one of ours (any other `_target_` is refused before it is called)
        instantiate({"_target_": "krea_sweeps.tracking.WandbConfig", "_args_": list(range(9))}, "wandb")
    assert info.value.key == "wandb" and "TypeError: " in str(info.value) and "positional argument" in str(info.value)


def test_a_non_number_leaves_no_job_folder(cli):
    result = cli("model.guidance=abc", "wandb.mode=disabled")
    assert result.returncode == 2 and "config key `model.guidance`" in result.stderr
    assert "Traceback" not in result.stderr and not list((cli.cwd / "outputs").glob("*/*"))  # no job folder


@pytest.mark.parametrize("key", ["txtfusion.projector.weight", "model.diffusion_model.txtfusion.projector.weight",
                                 "diffusion_model.txtfusion.projector.weight", "text_fusion.projector.weight"])
def test_one_projector_reader_for_export_metric_and_checkpoint_check(key, tmp_path):
    from safetensors.torch import save_file

    from krea_sweeps import export
    from krea_sweeps.metrics import conditioning
    from krea_sweeps.models import _check_krea2_single_file, read_projector_weight

    w = torch.linspace(-0.05, 0.11, 12).view(1, 12)
    file = tmp_path / "dit.safetensors"
    save_file({key: w, "blocks.0.attn.wq.weight": torch.zeros(2, 2)}, str(file))
    weight, found = read_projector_weight(str(file), "k")
    assert found == key and torch.equal(weight, w)
    assert export.read_projector(str(file))[1] == key
    assert np.array_equal(conditioning.read_projector(str(file)), w.double().view(-1).numpy())
    _check_krea2_single_file(str(file))  # accepted


def test_projector_reader_follows_a_sharded_diffusers_index(tmp_path):
    from safetensors.torch import save_file

    from krea_sweeps.errors import ConfigError
    from krea_sweeps.metrics import conditioning
    from krea_sweeps.models import read_projector_weight

    folder = tmp_path / "transformer"
    folder.mkdir()
    w = torch.linspace(-0.05, 0.11, 12).view(1, 12)
    save_file({"text_fusion.projector.weight": w}, str(folder / "part-2.safetensors"))
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, str(folder / "part-1.safetensors"))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "text_fusion.projector.weight": "part-2.safetensors",
        "transformer_blocks.0.attn.to_q.weight": "part-1.safetensors"}}))
    weight, key = read_projector_weight(str(tmp_path), "k")
    assert key == "text_fusion.projector.weight" and torch.equal(weight, w)
    assert np.array_equal(conditioning.read_projector(str(tmp_path)), w.double().view(-1).numpy())
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="not a Krea 2 checkpoint"):
        read_projector_weight(str(tmp_path / "other.safetensors"), "model.path")
