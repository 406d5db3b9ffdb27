"""Configs as data: typed groups whose type and choice errors come from composition (one line naming the key, with
"did you mean"), variants that declare what they are, and errors after planning that fail one job, not the sweep."""

from __future__ import annotations

import json

import pytest
from conftest import compose, run_in_process

FAST = ["wandb.mode=disabled", "sampler.steps=2", "sampler.max_sequence_length=32",
        "prompts.prompts=[A red fox sitting in fresh snow.]"]
CONFIG_FAULT = ["+metrics.config_fault._target_=faults.ConfigErrorOnSeed", "+metrics.config_fault.seed=1"]


# ------------------------------------------------------------------------------------------- errors after planning
def test_a_config_error_while_a_job_runs_fails_that_job_only(tmp_path):
    result = run_in_process(["-m", "seeds=0,1,2", *CONFIG_FAULT, *FAST], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]  # failed jobs (1), not a rejected config (2)
    sweep = tmp_path / "outputs" / "default"
    failed = sorted(sweep.glob("*/failed.json"))
    assert len(failed) == 1 and "seeds=1" in (failed[0].parent / ".hydra" / "overrides.yaml").read_text()
    error = json.loads(failed[0].read_text())["error"]
    assert error.startswith("ConfigError: config key `metrics.config_fault.seed`")
    done = {json.loads(f.read_text())["job"]["name"] for f in sweep.glob("*/result.json")}
    assert len(done) == 2, "the jobs before and after the failing one ran"
    assert "1 job(s) failed" in result.stderr and failed[0].parent.name in result.stderr


def test_fail_fast_still_stops_at_a_config_error_while_a_job_runs(tmp_path):
    result = run_in_process(["-m", "seeds=1,2", "fail_fast=true", *CONFIG_FAULT, *FAST], tmp_path)
    assert result.returncode == 1 and "fail_fast: stopped" in result.stderr, result.stderr[-3000:]
    sweep = tmp_path / "outputs" / "default"
    assert len(list(sweep.glob("*/failed.json"))) == 1 and not list(sweep.glob("*/result.json"))


# ------------------------------------------------------------------------------------------------ typed groups
@pytest.mark.parametrize("overrides,group,schema", [
    ([], "model", "VariantSchema"), (["model=raw"], "model", "VariantSchema"),
    (["model=turbo_lora"], "model", "VariantSchema"), ([], "sampler", "SamplerSchema"),
    ([], "wandb", "WandbSchema"), ([], "prompts", "PromptSetSchema"),
    (["prompts=styles"], "prompts", "PromptSetSchema"),
    (["prompts=file"], "prompts", "PromptFileSchema"),
])
def test_typed_groups_compose_onto_their_schema(overrides, group, schema):
    from omegaconf import OmegaConf

    node = compose(overrides)[group]
    assert OmegaConf.get_type(node).__name__ == schema
    assert OmegaConf.is_missing(node, "_target_") is False and "krea_sweeps." in node._target_


def test_variants_declare_what_they_are():
    declared = {name: (compose([f"model={name}"]).model.base, compose([f"model={name}"]).model.lora)
                for name in ("raw", "turbo", "turbo_lora")}
    assert declared == {"raw": ("raw", None), "turbo": ("turbo", None), "turbo_lora": ("raw", "turbo")}


@pytest.mark.parametrize("override,key,problem", [
    ("sampler.steps=abc", "sampler.steps", "'abc' is not a whole number"),
    ("sampler.guidance=much", "sampler.guidance", "'much' is not a number"),
    ("sampler.fast=maybe", "sampler.fast", "'maybe' is not true or false"),
    ("model.steps=2.5", "model.steps", "'2.5' is not a whole number"),
    ("model.lora=turbo_lora", "model.lora", "unknown value 'turbo_lora'"),
])
def test_type_and_choice_errors_come_from_composition_in_one_line(override, key, problem):
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.sweeps import check_keys_compose

    with pytest.raises(ConfigError) as e:
        check_keys_compose([override])
    assert e.value.key == key and problem in e.value.problem and "\n" not in str(e.value)


def test_a_typed_error_in_a_sweep_axis_is_one_line_naming_the_job(tmp_path):
    result = run_in_process(["-m", "sampler.steps=2,abc", "wandb.mode=disabled"], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "config key `sampler.steps`: 'abc' is not a whole number (sweep job: sampler.steps=abc)" in lines[0]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.json"))


def test_an_unknown_field_of_an_untyped_group_is_named_from_the_class_signature():
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.plan import plan

    with pytest.raises(ConfigError) as e:
        plan(compose(["+metrics.fault._target_=faults.FailOnSeed", "+metrics.fault.sede=1"]))
    assert e.value.key == "metrics.fault.sede" and "did you mean 'seed'?" in str(e.value)
