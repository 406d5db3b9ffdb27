"""What makes jobs cheap must not change what they compute: batched conditioning sweeps against one job per config,
the pipeline without text encoder against the full one, the thread setting, and exit codes after the fast exit.
(Timings live in bench/, never here.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
import pytest

GRID = ["-m", "intervention=solo", "intervention.slot=0,1,2", "intervention.strength=0.5,1",
        "metrics=[projector,cond_shift,fusion_attention]", "prompts.prompts=[a red fox,a lighthouse at dusk]",
        "sampler.max_sequence_length=32", "name=grid"]
BATCH = "sweep.batch_axes=[intervention.slot,intervention.strength]"


def results(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))}


def arrays(job_dir: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted((job_dir / "arrays").glob("*.npy"))}


def test_batched_sweep_equals_one_job_per_config(tmp_path):
    from conftest import run_in_process as run_cli
    from wandb_offline import offline_runs, read_run

    (tmp_path / "one").mkdir()
    (tmp_path / "batched").mkdir()
    one = run_cli(GRID, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    batched = run_cli([*GRID, BATCH], tmp_path / "batched")
    assert batched.returncode == 0, batched.stderr[-2000:]
    assert "6 configs a job" in batched.stdout + batched.stderr

    a, b = results(tmp_path / "one" / "outputs" / "grid"), results(tmp_path / "batched" / "outputs" / "grid")
    assert len(a) == 6 and sorted(a) == sorted(b)  # the same folder per config
    for name in a:
        assert b[name]["summary"] == a[name]["summary"], name
        assert b[name]["rows"] == a[name]["rows"], name
        assert b[name]["fingerprint"] == a[name]["fingerprint"], name
        assert b[name]["interventions"] == a[name]["interventions"], name
        assert b[name]["config"]["intervention"] == a[name]["config"]["intervention"], name
        one_arrays = arrays(tmp_path / "one" / "outputs" / "grid" / name)
        batch_arrays = arrays(tmp_path / "batched" / "outputs" / "grid" / name)
        assert sorted(one_arrays) == sorted(batch_arrays) and one_arrays
        assert all(np.array_equal(one_arrays[k], batch_arrays[k]) for k in one_arrays)
        # figures are off by default in a conditioning-only sweep; the arrays behind them are saved
        assert not (tmp_path / "one" / "outputs" / "grid" / name / "figures").exists()
    assert len({json.dumps(r["summary"], sort_keys=True) for r in a.values()}) == 6  # the configs differ

    # one W&B run for the batch, one table row per config
    (batch_dir,) = [d for d in (tmp_path / "batched" / "outputs" / "grid").iterdir() if d.name.startswith("_batch")]
    # the solo configs (projector site) shared the batch's stock upstream: their traces ran projector + refiners only
    assert json.loads((batch_dir / "batch.json").read_text())["shared_upstream"] == 6
    (run_dir,) = offline_runs(batch_dir)
    run = read_run(run_dir)
    assert run["summary"]["batch/configs"] == 6 and run["exit_code"] == 0
    (table,) = (run_dir / "files" / "media" / "table").glob("configs_*.table.json")
    data = json.loads(table.read_text())
    assert len(data["data"]) == 6
    job_col, key = data["columns"].index("job"), "cond_shift/fused/cos"
    for row in data["data"]:
        assert row[data["columns"].index(key)] == pytest.approx(a[row[job_col]]["summary"][key])
    # a summary every config shares (projector edits leave the layerwise attention alone) is logged once, not as a
    # column of equal values; every summary is in the table or there
    shared = {k[len("shared/"):]: v for k, v in run["summary"].items() if k.startswith("shared/")}
    assert "fusion_attention/content_tokens" in shared and "fusion_attention/content_tokens" not in data["columns"]
    for name, result in a.items():
        row = next(r for r in data["data"] if r[job_col] == name)
        for k, v in result["summary"].items():
            got = shared[k] if k in shared else row[data["columns"].index(k)]
            assert got == pytest.approx(v), (name, k)

    # collect reads the batched sweep like the unbatched one (the batch folder is not a job)
    from krea_sweeps.collect import build_table

    df_a, _, axes_a = build_table(tmp_path / "one" / "outputs" / "grid")
    df_b, _, axes_b = build_table(tmp_path / "batched" / "outputs" / "grid")
    assert axes_a == axes_b and len(df_a) == len(df_b) == 12  # 6 configs × 2 prompts
    assert df_a["cond_shift/fused/cos"].tolist() == df_b["cond_shift/fused/cos"].tolist()

    # resume across modes: the batched rerun of the unbatched sweep finds every config done
    again = run_cli([*GRID, BATCH], tmp_path / "one")
    assert again.returncode == 0, again.stderr[-2000:]
    assert results(tmp_path / "one" / "outputs" / "grid") == a
    (batch_json,) = (tmp_path / "one" / "outputs" / "grid").glob("_batch*/batch.json")
    assert {c["status"] for c in json.loads(batch_json.read_text())["configs"]} == {"skipped"}


def test_batch_axes_fall_back_for_generation_and_reject_other_keys(tmp_path):
    from conftest import run_in_process as run_cli

    bad = run_cli(["-m", "seeds=0,1", "metrics=[projector]", "sweep.batch_axes=[seeds]"], tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: config key `sweep.batch_axes`")
    assert not (tmp_path / "outputs" / "default").exists() or not list((tmp_path / "outputs").rglob("result.json"))

    images = run_cli(["-m", "intervention=solo", "intervention.slot=0,1", "metrics=[image_stats]",
                      "prompts.prompts=[a red fox]", "sampler.max_sequence_length=32", "sampler.steps=2",
                      "sweep.batch_axes=[intervention.slot]"], tmp_path)
    assert images.returncode == 0, images.stderr[-2000:]
    assert "one job per config (its metrics need generated images" in images.stdout + images.stderr
    assert len(list((tmp_path / "outputs" / "default").glob("*/result.json"))) == 2


def test_pipeline_without_text_encoder_gives_identical_images(raw):
    """Krea2Pipeline fed embeddings never touches tokenizer or text encoder: a job whose prompts all hit the encode
    cache builds it without them (and so never loads them)."""
    import torch

    from krea_sweeps.prompts import encode
    from krea_sweeps.sampler import Denoising, Sampler, generate

    layers = tuple(raw.variant.select_layers)
    cond = encode(raw.tokenizer, raw.text_encoder, ["a red fox"], 32, layers)
    neg = encode(raw.tokenizer, raw.text_encoder, [""], 32, layers)
    sampler = Sampler(steps=2, max_sequence_length=32, fast=False).resolved(raw.variant)
    full = raw.pipeline()
    bare = raw.pipeline(text_encoder=False)
    assert bare.text_encoder is None and bare.tokenizer is None
    with torch.no_grad():
        assert np.array_equal(generate(full, sampler, cond, neg, seed=3, denoising=Denoising()),
                              generate(bare, sampler, cond, neg, seed=3, denoising=Denoising()))


def test_cached_prompts_load_no_text_encoder_and_exit_codes_hold(cli):
    first = cli("prompts.prompts=[a red fox]", "sampler.max_sequence_length=32")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "loading text_encoder" in first.stdout + first.stderr
    second = cli("prompts.prompts=[a red fox]", "sampler.max_sequence_length=32")
    assert second.returncode == 0, second.stderr[-2000:]
    log = second.stdout + second.stderr
    assert "loading text_encoder" not in log and "loading tokenizer" not in log
    assert re.search(r"done \S*prompts\.prompts=", log) and "wandb sync" in log  # the job, named by its overrides
    bad = cli("torch_threads=0")
    assert bad.returncode == 2 and "torch_threads" in bad.stderr.strip().splitlines()[-1]


def test_torch_threads_default_and_overrides(monkeypatch):
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.process import THREADS_ENV, torch_threads_for

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert torch_threads_for("auto", synthetic=True, device="cpu") == 1
    assert torch_threads_for("auto", synthetic=False, device="cuda") == 1
    assert torch_threads_for("auto", synthetic=False, device="cpu") is None  # torch's default: real CPU work
    assert torch_threads_for(4, synthetic=True, device="cpu") == 4
    monkeypatch.setenv(THREADS_ENV, "2")
    assert torch_threads_for("auto", synthetic=True, device="cpu") == 2
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(ConfigError, match="torch_threads"):
        torch_threads_for("auto", synthetic=True, device="cpu")


def test_unused_scipy_is_deferred_not_broken():
    import subprocess
    import sys

    code = ("import sys; from krea_sweeps.process import defer_unused_imports; defer_unused_imports(); "
            "import diffusers.schedulers.scheduling_flow_match_euler_discrete as s; "
            "import transformers.loss.loss_for_object_detection as d; "
            "import diffusers.schedulers.scheduling_lms_discrete as lms; "
            "assert 'scipy.integrate._quadrature' not in sys.modules, 'integrate'; "
            "assert 'scipy.stats._stats_py' not in sys.modules, 'stats'; "
            "assert 'scipy.optimize._optimize' not in sys.modules, 'optimize'; "
            "assert abs(lms.integrate.quad(lambda x: x, 0, 1)[0] - 0.5) < 1e-12; "
            "assert d.linear_sum_assignment([[1, 0], [0, 1]])[1].tolist() == [1, 0]; "
            "import scipy.optimize; assert scipy.optimize.linear_sum_assignment.__module__.startswith('scipy'); "
            "assert abs(s.scipy.stats.beta.ppf(0.5, 2, 2) - 0.5) < 1e-12; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_compose_once_equals_hydra():
    """A sweep's jobs composed once (ComposeOnce: a copy of a composed job + the value overrides that differ) equal
    Hydra composing each from scratch; group changes, added keys and dict values are composed by Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from krea_sweeps.plan import register_resolvers
    from krea_sweeps.sweeps import ComposeOnce

    register_resolvers()
    base = ["intervention=solo", "metrics=[projector,cond_shift]", "name=grid"]
    jobs = [[*base, "intervention.slot=0", "intervention.strength=0.5"],
            [*base, "intervention.slot=3", "intervention.strength=0.5"],
            [*base, "intervention.slot=11", "intervention.strength=1"],
            [*base, "intervention.slot=3", "intervention.strength=${intervention.slot}"],  # interpolation, as Hydra
            ["intervention=leave_one_out", *base[1:], "intervention.slot=3", "intervention.strength=0.5"],  # group: Hydra
            [*base, "intervention.slot=2", "intervention.strength=0.5"],
            [*base, "intervention.slot=2", "intervention.strength=0.5", "+extra.key=1"]]  # other keys: Hydra
    # value kinds ComposeOnce applies itself (each job differs from the one before only in values): a list, a quoted
    # string with a comma, null, a nested key, an interpolation into another group, a list with an interpolation
    values = [[*base, "intervention.slot=2", "intervention.strength=0.5", "seeds=[0,1]",
               "sampler.negative_prompt='blurry, dark'", "sampler.height=null", "intervention.layer=null"],
              [*base, "intervention.slot=4", "intervention.strength=2", "seeds=[3,'4',5]",
               "sampler.negative_prompt=\"it's, \\\"quoted\\\"\"", "sampler.height=128", "intervention.layer=20"],
              [*base, "intervention.slot=5", "intervention.strength=${sampler.max_sequence_length}",
               "seeds=[${intervention.slot}]",
               "sampler.negative_prompt=plain", "sampler.height=null", "intervention.layer=null"]]
    jobs += values
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        master = compose("config", base, return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        once = ComposeOnce(loader)
        reused = 0
        for overrides in jobs:
            template = once.template
            fast = once.load_sweep_config(master, overrides)
            reused += once.template is template
            slow = loader.load_sweep_config(master, overrides)
            assert OmegaConf.to_container(fast) == OmegaConf.to_container(slow), overrides
            assert all(OmegaConf.to_container(fast[k], resolve=True) == OmegaConf.to_container(slow[k], resolve=True)
                       for k in slow if k != "hydra" and OmegaConf.is_config(slow[k]))
            assert OmegaConf.is_struct(fast) == OmegaConf.is_struct(slow)
        assert reused == 3 + 2  # jobs 2, 3, 4 and 6 … minus the one after the group change (composed by Hydra); the
        # first value-kinds job adds keys' overrides (composed by Hydra), the next two reuse it
        # a value the config rejects (typed configs) fails the same way on both paths
        bad = [*base, "intervention.slot=0", "intervention.strength=oops"]
        outcomes = []
        for load in (once.load_sweep_config, loader.load_sweep_config):
            try:
                outcomes.append(OmegaConf.to_container(load(master, bad)))
            except Exception as e:
                outcomes.append((type(e), str(e)))
        assert outcomes[0] == outcomes[1]


def test_config_yaml_is_omegaconf_to_yaml():
    """The job records (.hydra/*.yaml) are written through libyaml: byte for byte what OmegaConf writes."""
    from krea_sweeps.files import config_yaml

    node = OmegaConf.create({"a": "yes", "b": "1e5", "c": "0.5", "d": [1, "2", None, True], "e": "${a}",
                             "f": {"g": "ünïcode: text, with [brackets]", "h": 1.5e-7, "i": "null", "j": ""},
                             "k": "multi\nline", "l": "'quoted'", "m": "on"})
    assert config_yaml(node) == OmegaConf.to_yaml(node)
    assert config_yaml(OmegaConf.create(["x=1", "y=[1,2]"])) == OmegaConf.to_yaml(OmegaConf.create(["x=1", "y=[1,2]"]))
