"""Memory that fits the card: the session's model cache evicts under a budget, offload modes are config, and a job
that cannot fit is refused in one line before anything loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from krea_sweeps.errors import ConfigError
from krea_sweeps.memory import GB, Activations, JobMemory, PartSize

# Full-size Krea 2, counted on the meta device from diffusers' default `Krea2Transformer2DModel` config, the
# Qwen3-VL-4B text tower and `AutoencoderKLQwenImage` (params, largest block, largest tensor).
KREA2 = {
    "text_encoder": PartSize(4_022_468_096, 388_956_160, 388_956_160),
    "transformer": PartSize(12_820_073_036, 434_159_872, 226_492_416),
    "vae": PartSize(126_892_531, 25_441_728, 3_981_312),
}
AT_1024 = Activations(height=1024, width=1024, text_tokens=512, dit_hidden=6144, dit_mlp_ratio=16384 / 6144,
                      vae_base_dim=96)


def krea2_job(offload: str, gb: float, device: str = "cuda") -> JobMemory:
    return JobMemory(KREA2, 2, offload, AT_1024, gb * GB, device)


@pytest.mark.parametrize("offload, gb, suggested", [
    ("none", 24, "model.offload=group"),    # 34 GB of bf16 weights on a 24 GB card
    ("model", 24, "model.offload=group"),   # the 25.6 GB DiT alone exceeds it
    ("none", 32, "model.offload=model"),
    ("group", 1, "no offload mode fits"),
])
def test_a_full_size_job_that_cannot_fit_is_refused_in_one_line(offload, gb, suggested):
    with pytest.raises(ConfigError) as info:
        krea2_job(offload, gb).check()
    message = str(info.value)
    assert info.value.key == "model.offload" and "\n" not in message and suggested in message, message


def test_the_offload_modes_that_fit_pass_and_their_peaks_shrink():
    for offload, gb in (("none", 80), ("model", 32), ("group", 24), ("sequential", 24)):
        krea2_job(offload, gb).check()
    peaks = [krea2_job(m, 80).peak() / GB for m in ("none", "model", "group", "sequential")]
    assert peaks == sorted(peaks, reverse=True) and 33.9 < peaks[0] < 40 and 25.6 < peaks[1] < 30 and peaks[2] < 6


def test_the_cpu_suggests_no_offload():
    with pytest.raises(ConfigError) as info:
        krea2_job("none", 16, device="cpu").check()
    assert "no offload mode fits" in str(info.value)


def test_offload_is_a_mode_and_needs_an_accelerator():
    from conftest import compose

    from krea_sweeps.plan import plan

    for value, key in (("group", "model.offload"), ("true", "model.offload"), ("sometimes", "model.offload"),
                       ("-1", "model.memory_budget_gb")):
        which = "model.offload" if key == "model.offload" else key
        with pytest.raises(ConfigError) as info:
            plan(compose(["model.device=cpu", f"{which}={value}"]))
        assert info.value.key == key, str(info.value)
    assert "no accelerator" not in str(info.value)
    assert plan(compose(["model.offload=false"])).variant.offload == "none"  # the earlier boolean still reads


def test_an_impossible_job_stops_before_loading_anything(cli):
    """The synthetic model on a fake 1 MB device: one line, exit 2, nothing loaded or written."""
    from krea_sweeps.synthetic import ensure_synthetic_checkpoints

    ensure_synthetic_checkpoints()  # the estimate reads its headers (it skips a model not on disk yet)
    out = cli("model.memory_budget_gb=0.001", "wandb.mode=disabled")
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "config key `model.offload`" in lines[0] and "0.001 GB are available" in lines[0]
    assert "loading" not in out.stderr + out.stdout
    assert not [p for p in (cli.cwd / "outputs").rglob("*") if p.is_file()]  # no job dir, no .hydra, no result


def test_a_two_variant_sweep_holds_one_dit_at_a_time_under_a_small_budget(tmp_path):
    """`-m model=raw,turbo` with images, budget = one variant's job: Turbo's DiT evicts Raw's (least recently used)
    before loading, and the text encoder and VAE both variants share stay loaded."""
    from conftest import compose
    from test_spine import _multirun_hydra_cfg

    from krea_sweeps.models import job_memory
    from krea_sweeps.plan import plan
    from krea_sweeps.runner import run_job
    from krea_sweeps.session import Session

    common = ["metrics=[image_stats]", "wandb.mode=disabled", "prompts.prompts=[a red fox]", "model.steps=1",
              "sampler.height=64", "sampler.width=64"]
    one = job_memory(*(lambda j: (j.variant, j.sampler, j.needs, 1))(plan(compose(["model=raw", *common]))))
    half_a_dit = one.parts["transformer"].params * 4 / 2
    budget = f"model.memory_budget_gb={(one.peak() + half_a_dit) / GB!r}"
    session = Session()
    for i, variant in enumerate(("raw", "turbo", "raw")):
        run_job(compose([f"model={variant}", budget, *common]), _multirun_hydra_cfg(tmp_path / "sweep", f"j{i}"),
                session)
    cache = session.models
    dits = [[k[1] for k in resident if k[0] == "transformer"] for resident in cache.history]
    assert all(len(d) <= 1 for d in dits), dits
    assert cache.load_counts["transformer"] == 3 and cache.load_counts["text_encoder"] == 1
    assert [k[1].split("/")[-1] for k in cache.evicted] == ["krea2_raw.safetensors", "krea2_turbo.safetensors"]
    for i in range(3):
        assert json.loads((tmp_path / "sweep" / f"j{i}" / "result.json").read_text())["status"] == "done"


def test_the_cache_evicts_the_least_recently_used_part_the_job_does_not_use():
    from krea_sweeps.memory import ModelCache

    cache = ModelCache()
    cache.get(("a", "x"), lambda: torch.nn.Linear(100, 100))
    cache.get(("b", "y"), lambda: torch.nn.Linear(100, 100))
    assert list(cache.parts) == [("a", "x"), ("b", "y")] and cache.resident_bytes() == 2 * (100 * 100 + 100) * 4
    cache.begin_job(budget_bytes=(100 * 100 + 100) * 4 * 1.5)  # room for one
    cache.peek(("a", "x"))  # this job uses `a`: `b` is the least recently used and not in use
    cache.get(("c", "z"), lambda: torch.nn.Linear(10, 10))
    assert list(cache.parts) == [("a", "x"), ("c", "z")] and cache.evicted == [("b", "y")]


@pytest.mark.parametrize("mode, atol", [("group", 0.0), ("model", 1e-5)])
def test_offload_modes_are_wired_to_diffusers_and_keep_the_image(mode, atol):
    """On the CPU (onload device = CPU) diffusers' offload hooks run and the image stays: group offload bit-identical,
    model offload within 1e-6 (observed: 9.5e-7). That proves the wiring; the memory saving itself needs a GPU.
    `sequential` is not run here: accelerate's sequential offload fails with a CPU onload device (TypeError in
    `set_module_tensor_to_device`), so it is only exercised on a GPU."""
    from krea_sweeps.models import LoadedModel, ModelVariant, enable_offload
    from krea_sweeps.prompts import EncodeCache
    from krea_sweeps.sampler import Denoising, Sampler, generate

    model = LoadedModel(ModelVariant(name="turbo", base="turbo", is_distilled=True, steps=2, guidance=0.0))  # own parts: hooks stay
    sampler = Sampler(height=64, width=64, max_sequence_length=32).resolved(model.variant)
    cache = EncodeCache(None)
    enc, neg = cache.get(model, ["a red fox"], 32), cache.get(model, [""], 32)
    pipe = model.pipeline()
    stock = generate(pipe, sampler, enc, neg, seed=0, denoising=Denoising())
    enable_offload(pipe, mode, torch.device("cpu"))
    offloaded = generate(pipe, sampler, enc, neg, seed=0, denoising=Denoising())
    hooked = [m for m in pipe.transformer.modules() if hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook")]
    assert hooked and np.abs(offloaded - stock).max() <= atol


def test_a_sweep_runs_one_variants_jobs_together_and_loads_each_dit_once(cli):
    """The model axis is given last on the command line, yet varies slowest: under a budget that holds one DiT,
    Raw's jobs then Turbo's, two DiT loads (alternating would load four)."""
    from conftest import compose

    from krea_sweeps.models import job_memory
    from krea_sweeps.plan import plan
    from krea_sweeps.synthetic import ensure_synthetic_checkpoints

    ensure_synthetic_checkpoints()
    common = ["metrics=[image_stats]", "wandb.mode=disabled", "prompts.prompts=[a red fox]", "model.steps=1"]
    job = plan(compose(["model=raw", *common]))
    one = job_memory(job.variant, job.sampler, job.needs, 1)
    budget = f"model.memory_budget_gb={(one.peak() + one.parts['transformer'].params * 2) / GB!r}"
    out = cli("-m", "seeds=0,1", "model=raw,turbo", budget, *common, "name=order")
    assert out.returncode == 0, out.stderr[-2000:]
    order = [line.split(" : ")[1].split()[0] for line in out.stdout.splitlines() + out.stderr.splitlines()
             if "] \t#" in line]
    assert order == ["model=raw", "model=raw", "model=turbo", "model=turbo"], order
    log = out.stdout + out.stderr
    assert log.count("loading transformer") == 2 and log.count("evicting transformer") == 1
