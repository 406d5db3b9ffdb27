"""A CLI that explains itself: `--help` lists groups, presets and examples; a misspelt key, option, field or value
gets one line with "did you mean …"."""

from __future__ import annotations

import pytest
from conftest import REPO, compose, run_cli, run_in_process


def test_help_lists_groups_without_internal_options_presets_and_examples(tmp_path):
    result = run_in_process(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "powered by Hydra" not in text and "_variant" not in text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ") and ln.split()}
    assert lines["model"].split()[1:] == ["raw,", "turbo,", "turbo_lora"]
    for group in ("intervention", "prompts", "sampler", "wandb", "hydra/launcher"):
        assert group in lines
    for preset in sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")):
        assert preset in lines and len(lines[preset].split()) > 2, f"{preset} has a one-line description"
    assert "gains_optuna" in lines
    examples = text.split("Examples:")[1].splitlines()
    assert sum(ln.strip().startswith("python run.py") for ln in examples) == 3
    assert not (tmp_path / "outputs").exists(), "--help runs nothing"


def test_one_line_prefers_the_help_marker_then_the_first_sentence(tmp_path):
    from krea_sweeps.cli_help import one_line

    marked = tmp_path / "a.yaml"
    marked.write_text("# @package _global_\n# help: short and sweet\n# Long story. More.\nname: a\n")
    assert one_line(marked) == "short and sweet"
    plain = tmp_path / "b.yaml"
    plain.write_text("# @package _global_\n# Card: the first sentence — then more.\n#   python run.py -m x\nname: b\n")
    assert one_line(plain) == "the first sentence"


@pytest.mark.parametrize("argv,key,suggestion", [
    (["intervention=sollo"], "intervention", "'solo'"),
    (["+experiment=solo_swep"], "experiment", "'solo_sweep'"),
    (["intervention=solo", "intervention.slott=3"], "intervention.slott", "'intervention.slot'"),
    (["sampler.stepz=3"], "sampler.stepz", "'sampler.steps'"),
    (["wandb.mode=ofline"], "wandb.mode", "'offline'"),  # a typed group's choice: caught by composition
    (["model.dtype=float3"], "model.dtype", "'float32'"),
    (["model=turbo_lora", "model.base=turb"], "model.base", "'turbo'"),
    (["intervention=solo", "intervention.site=projectr"], "intervention.site", "'projector'"),  # typed: composition
])
def test_misspelt_options_and_keys_get_did_you_mean_before_hydra_composes(argv, key, suggestion):
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.sweeps import check_group_options, check_keys_compose

    with pytest.raises(ConfigError) as e:
        check_group_options(argv)
        check_keys_compose(argv)
    assert e.value.key == key and f"did you mean {suggestion}?" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,key,suggestion", [
    (["intervention=solo", "intervention.slot=3", "+intervention.slott=3"], "intervention.slott", "'slot'"),
])
def test_misspelt_fields_and_values_get_did_you_mean_at_planning(overrides, key, suggestion):
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.plan import plan

    with pytest.raises(ConfigError) as e:
        plan(compose(overrides))
    assert e.value.key == key and f"did you mean {suggestion}?" in str(e.value)


def test_a_misspelt_sweep_axis_gets_did_you_mean(tmp_path):
    """A real process: exit code 2 and one line on stderr, with whatever the interpreter and libraries print."""
    result = run_cli(["-m", "intervention=solo", "intervention.slott=3,4", "wandb.mode=disabled"], tmp_path)
    assert result.returncode == 2
    assert "did you mean 'intervention.slot'?" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_allow_network_without_a_path_says_it_would_run_the_synthetic_model():
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.plan import plan

    with pytest.raises(ConfigError, match="model.allow_network.*synthetic.*krea/Krea-2-Raw"):
        plan(compose(["model=raw", "model.allow_network=true", "model.path=null"]))
