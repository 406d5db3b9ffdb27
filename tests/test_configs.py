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


# ------------------------------------------------------------------- typed interventions, metrics, top-level keys
CONF = __import__("conftest").REPO / "conf"


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "intervention").glob("*.yaml")))
def test_every_intervention_composes_onto_its_schema(option):
    from omegaconf import OmegaConf

    from krea_sweeps.configs import fields_class
    from krea_sweeps.plan import instantiate

    node = compose([f"intervention={option}"]).intervention
    schema = OmegaConf.get_type(node)
    assert schema.__module__ == "krea_sweeps.configs" and schema.__name__.endswith("Schema")
    # the runtime class takes its fields from the same dataclass the schema extends: declared once
    from hydra.utils import get_class

    assert issubclass(schema, fields_class(get_class(node._target_).__new__(get_class(node._target_))))
    if option not in ("lora_file", "solo", "leave_one_out"):  # those need a file or a slot to build
        instantiate(node, "intervention")


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "metrics").glob("*.yaml")))
def test_every_metric_composes_onto_its_schema(option):
    from omegaconf import OmegaConf

    node = compose([f"metrics=[{option}]"]).metrics[option]
    assert OmegaConf.get_type(node).__name__ == node._target_.rsplit(".", 1)[1] + "Schema"


def test_top_level_keys_are_typed_and_presets_may_add_their_own():
    from omegaconf import OmegaConf

    cfg = compose(["+experiment=concept_steer"])
    assert type(cfg._get_node("force")).__name__ == "BooleanNode"
    assert OmegaConf.get_type(cfg.sweep).__name__ == "SweepFields"
    assert cfg.concept == "smile"  # a key the preset adds: the root stays open, its listed keys typed


@pytest.mark.parametrize("override,key,problem,fix", [
    (["intervention=solo", "intervention.site=projektor"], "intervention.site", "unknown value 'projektor'",
     "did you mean 'projector'? use one of: projector, slots, taps, fusion_attention"),
    (["intervention=solo", "intervention.strength=abc"], "intervention.strength", "'abc' is not a number", "give a number"),
    (["intervention=steer", "intervention.mode=invert"], "intervention.mode", "unknown value 'invert'", "use one of"),
    (["intervention=patch", "intervention.site=projector"], "intervention.site", "unknown value 'projector'",
     "use one of: taps, slots, block, fused"),
    (["intervention=ablate", "intervention.targets=3"], "intervention.targets", "where a list is expected",
     "intervention.targets=[…]"),
    (["intervention=solo", "intervention.slott=3"], "intervention.slott", "no such key",
     "did you mean 'intervention.slot'?"),
    (["metrics=[word_maps]", "metrics.word_maps.chunk=x"], "metrics.word_maps.chunk", "'x' is not a whole number",
     "give a whole number"),
    (["metrics=[image_stats]", "metrics.image_stats.size=3"], "metrics.image_stats.size", "no such key", "spelling"),
    (["force=maybe"], "force", "'maybe' is not true or false", "give true or false"),
    (["torch_threads=1.5"], "torch_threads", "'1.5' is not a whole number or text", "give"),
    (["sweep.batch_axez=[intervention.slot]"], "sweep.batch_axez", "no such key", "did you mean 'sweep.batch_axes'?"),
])
def test_intervention_metric_and_top_level_errors_come_from_composition(override, key, problem, fix):
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.sweeps import check_keys_compose

    with pytest.raises(ConfigError) as e:
        check_keys_compose(override)
    assert e.value.key == key and problem in e.value.problem and fix in e.value.fix, str(e.value)
    assert "\n" not in str(e.value)


def test_figures_is_one_of_three_words_checked_at_planning():
    """`figures` is true, false or auto: OmegaConf has no bool-or-choice type, so planning names the key."""
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.plan import plan

    with pytest.raises(ConfigError) as e:
        plan(compose(["figures=maybe"]))
    assert e.value.key == "figures" and "use one of: auto, true, false" in e.value.fix
    with pytest.raises(ConfigError) as e:
        plan(compose(["figures=atuo"]))
    assert "did you mean 'auto'?" in e.value.fix
    assert plan(compose(["figures=false"])).figures is False


def test_list_entries_and_python_objects_get_the_same_typed_errors():
    """Composition does not type `interventions: [...]` (entries of several classes): each entry is typed when its
    class is built, with the same one line, named by its list key; an object built in Python likewise."""
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.interventions import Solo
    from krea_sweeps.metrics.word_maps import WordMaps
    from krea_sweeps.plan import plan

    solo = "{_target_: krea_sweeps.interventions.Solo, slot: 3"
    for entry, key, words in [(f"{solo}, site: projektor}}", "interventions[0].site", "did you mean 'projector'?"),
                              (f"{solo}, strength: abc}}", "interventions[0].strength", "'abc' is not a number"),
                              (f"{solo}, apply_to: negative}}", "interventions[0].apply_to", "use one of: cond")]:
        with pytest.raises(ConfigError) as e:
            plan(compose([f"interventions=[{entry}]"]))
        assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError) as e:
        Solo(slot=1, site="projektor")
    assert e.value.key == "intervention.site" and "did you mean 'projector'?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        WordMaps(chunk="x")
    assert e.value.key == "metrics.word_maps.chunk"
    made = Solo(slot="L20", strength="0.5")  # converted as composition converts
    assert made.strength == 0.5 and made.slot == 6 and type(made.site) is str


def test_a_bad_value_in_a_later_job_of_a_sweep_fails_naming_the_key(tmp_path):
    """ComposeOnce copies the first job's typed config and applies the 2nd job's values: the types still hold."""
    result = run_in_process(["-m", "intervention=solo", "intervention.slot=3", "intervention.site=projector,projektor",
                             "metrics=[projector]", "wandb.mode=disabled"], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert ("config key `intervention.site`: unknown value 'projektor' (sweep job: intervention.site=projektor) — "
            "did you mean 'projector'?") in lines[0]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.json"))


def test_compose_once_keeps_the_types_of_a_copied_job():
    """The jobs after the first are copies with values applied (Hydra composes only the first): a bad value there
    still fails, naming the key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from krea_sweeps.configs import composition_error
    from krea_sweeps.plan import register_resolvers
    from krea_sweeps.sweeps import ComposeOnce

    class Counted:  # Hydra's loader, counting the jobs it composes itself
        def __init__(self, loader):
            self.loader, self.composed = loader, 0

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def load_sweep_config(self, *args):
            self.composed += 1
            return self.loader.load_sweep_config(*args)

    register_resolvers()
    base = ["intervention=solo", "metrics=[word_maps]", "intervention.slot=3"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        master = hydra_compose("config", base, return_hydra_config=True)
        hydra = Counted(GlobalHydra.instance().config_loader())
        once = ComposeOnce(hydra)
        first = once.load_sweep_config(master, [*base, "metrics.word_maps.chunk=64", "intervention.site=projector"])
        second = once.load_sweep_config(master, [*base, "metrics.word_maps.chunk=128", "intervention.site=taps"])
        assert hydra.composed == 1 and (first.metrics.word_maps.chunk, second.metrics.word_maps.chunk) == (64, 128)
        assert OmegaConf.get_type(second.intervention).__name__ == "SoloSchema" and second.intervention.site == "taps"
        for bad, key in [(["metrics.word_maps.chunk=x", "intervention.site=taps"], "metrics.word_maps.chunk"),
                         (["metrics.word_maps.chunk=128", "intervention.site=projektor"], "intervention.site")]:
            with pytest.raises(Exception) as e:
                once.load_sweep_config(master, [*base, *bad])
            error = composition_error(e.value)
            assert error is not None and error.key == key, str(e.value)
        assert hydra.composed == 1, "the bad jobs were copies, not composed by Hydra"


# ------------------------------------------------------------------------------------- the plain-value fast path
def _merged(fields, values):
    from omegaconf import OmegaConf

    from krea_sweeps.configs import _empty

    try:
        return OmegaConf.to_container(OmegaConf.merge(_empty(fields), values), enum_to_str=True)
    except Exception:
        return "error"


def test_plain_values_are_typed_as_omegaconf_types_them():
    """`check_instance` skips OmegaConf's merge for plain values (thousands of configs in a batch): for every field of
    every intervention and metric schema, and values of every plain kind, what it keeps must be what the merge gives —
    and a value the merge refuses must never be kept (it goes through the merge and fails there)."""
    from dataclasses import fields as dataclass_fields

    from krea_sweeps.configs import METRIC_SCHEMAS, SCHEMAS, _hints, _plain_values

    kinds = [None, 0, 3, -1, True, False, 0.5, 2.0, float("nan"), "3", "0.5", "cond", "uncond", "both", "projector",
             "taps", "slots", "amplify", "whole", "x", "", [1, 2], {"a": 1}]
    checked = kept = 0
    for fields in [s for _, _, s in SCHEMAS] + [s for _, s in METRIC_SCHEMAS]:
        fields = fields.__mro__[1] if fields.__name__.endswith("Schema") else fields
        for f in dataclass_fields(fields):
            if f.name == "_target_" or f.name not in _hints(fields):
                continue
            for value in kinds:
                fast = _plain_values(fields, {f.name: value})
                checked += 1
                if fast is None:
                    continue
                kept += 1
                merged = _merged(fields, {f.name: value})
                assert merged != "error", (fields.__name__, f.name, value)
                got, want = fast[f.name], merged[f.name]
                assert type(got) is type(want) and (got == want or got != got and want != want), \
                    (fields.__name__, f.name, value, got, want)
    assert checked > 500 and kept > 100
