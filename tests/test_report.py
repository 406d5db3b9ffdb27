"""The W&B report each sweep gets (`krea-collect <sweep> --report`), built offline: for every preset, the spec holds
the panels the preset declares (or the defaults), over the right keys, filtered to the sweep's W&B group."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO

PRESETS = sorted([("experiment", p.stem) for p in (REPO / "conf" / "experiment").glob("*.yaml")]
                 + [("hparams_search", p.stem) for p in (REPO / "conf" / "hparams_search").glob("*.yaml")])


def composed(group: str, name: str, first_job: bool = False):
    """The preset as composed for its sweep; `first_job`: with each sweep axis at its first value (a job's config)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from krea_sweeps.plan import register_resolvers
    from krea_sweeps.sweeps import _values

    register_resolvers()
    overrides = [f"+{group}={name}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides, return_hydra_config=True)
        if first_job:
            params = cfg.hydra.sweeper.get("params") or {}
            parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
            cfg = compose("config", overrides + [f"{o.get_key_element()}={_values(o)[0]}" for o in parsed],
                          return_hydra_config=True)
        return cfg


def panels_in(spec: dict) -> list[dict]:
    grids = [b for b in spec["spec"]["blocks"] if b["type"] == "panel-grid"]
    assert len(grids) == 1
    return grids[0]["metadata"]["panelBankSectionConfig"]["panels"]


def keys_of(panel: dict) -> set[str]:
    """Every metric / config / media key a panel reads, in W&B's own spelling."""
    config = panel["config"]
    keys = set(config.get("metrics", [])) | set(config.get("mediaKeys", []))
    keys |= {config[k] for k in ("xAxis", "yAxis", "groupBy") if config.get(k)}
    keys |= {c["accessor"] for c in config.get("columns", [])}
    return keys


@pytest.mark.parametrize("group,name", PRESETS, ids=[f"{g}={n}" for g, n in PRESETS])
def test_every_preset_gets_a_report_with_its_panels_keys_and_group_filter(group, name):
    from krea_sweeps.plan import plan
    from krea_sweeps.report import build_report, report_spec, sweep_from_config

    cfg = composed(group, name)
    sweep = sweep_from_config(cfg)
    spec = json.loads(json.dumps(report_spec(build_report(sweep))))  # JSON-able as written to report.json
    panels = panels_in(spec)
    grid = next(b for b in spec["spec"]["blocks"] if b["type"] == "panel-grid")
    (runset,) = grid["metadata"]["runSets"]
    filters = runset["filters"]["filters"]
    assert {"key": {"section": "run", "name": "group"}, "op": "=", "value": sweep.group} in [
        {k: f[k] for k in ("key", "op", "value")} for f in filters], "the runs table shows only this sweep"
    assert any(f["key"]["name"] == "jobType" and f["op"] == "!=" and f["value"] == "collect" for f in filters)
    assert sweep.group == Path(str(cfg.hydra.sweep.dir)).name
    keys = set().union(*(keys_of(p) for p in panels))
    # every headline metric has a panel, plotted per prompt against the swept axis
    for metric in sweep.headline:
        assert f"summary_metrics.{metric}" in keys or f"summary:{metric}" in keys, metric
        if sweep.prompts and not sweep.optuna:
            assert f"summary_metrics.by_prompt/p00/{metric}" in keys, metric
    declared = [e["_target_"].rsplit(".", 1)[1] for e in (sweep.panels or [])]
    kinds = [p["viewType"] for p in panels]
    if declared:
        assert len(panels) == len(declared)
        assert [{"MetricVsAxis": {"Bar Chart", "Scatter Plot"}, "GainsParallel": {"Parallel Coordinates Plot"},
                 "Media": {"Media Browser"}}[d] >= {k} for d, k in zip(declared, kinds)] == [True] * len(declared)
    if sweep.optuna:
        (pc,) = [p for p in panels if p["viewType"] == "Parallel Coordinates Plot"]
        accessors = [c["accessor"] for c in pc["config"]["columns"]]
        assert accessors == [f"config:search.value.g{i}" for i in range(12)] + ["summary:objective"]
    if sweep.images:
        assert "contact_sheet" in keys, "a sweep that makes images shows them"
    from krea_sweeps.report import wandb_key

    axis = sweep.first_axis
    if wandb_key(axis) and not sweep.optuna:
        bars = [p for p in panels if p["viewType"] == "Bar Chart"]
        assert all(b["config"].get("groupBy") for b in bars), "bars grouped by the swept value"
        assert bars or not sweep.headline, "a headline metric is plotted against the swept value"
    # the metrics the panels plot are keys the preset's metrics report
    job = plan(composed(group, name, first_job=True))
    from krea_sweeps.metrics.base import key_matches

    declared_keys = [k for m in job.metrics for k in (m.summary_keys(job) or [])]
    for key in keys:
        if key.startswith("summary_metrics.") and "by_prompt/" not in key:
            metric = key.removeprefix("summary_metrics.")
            assert any(key_matches(d, metric) for d in declared_keys), f"{name}: {metric} is reported by no metric"


def test_default_report_for_a_preset_without_panels():
    """A user's own preset with only `headline` still gets a report: one panel per headline key, and the images."""
    from krea_sweeps.report import SweepInfo, build_report, report_spec

    sweep = SweepInfo(group="mine", axes=["intervention.strength"], headline=["image_stats/sharpness"],
                      prompts=["a", "b"])
    panels = panels_in(report_spec(build_report(sweep)))
    assert [p["viewType"] for p in panels] == ["Bar Chart", "Media Browser"]
    bar = panels[0]["config"]
    assert bar["metrics"] == ["summary_metrics.image_stats/sharpness", "summary_metrics.by_prompt/p00/image_stats/"
                              "sharpness", "summary_metrics.by_prompt/p01/image_stats/sharpness"]
    assert bar["groupBy"] == "intervention.value.strength" and bar["groupAgg"] == "mean"


def test_a_swept_list_of_interventions_gets_one_bar_per_run():
    from krea_sweeps.report import SweepInfo, build_report, report_spec

    sweep = SweepInfo(group="lists", axes=["interventions"], headline=["image_stats/sharpness"], prompts=["a"])
    (bar, _) = panels_in(report_spec(build_report(sweep)))
    assert bar["viewType"] == "Bar Chart" and "groupBy" not in bar["config"]


def test_a_report_panel_from_a_config_must_be_ours():
    """Nothing read from a config (or a result.json) is called unless it is one of our panel classes."""
    from krea_sweeps.errors import ConfigError
    from krea_sweeps.report import panel_objects

    assert len(panel_objects([{"_target_": "krea_sweeps.report.Media"}])) == 1
    for bad in ({"_target_": "os.system", "command": "true"}, {"_target_": "krea_sweeps.report.build_report"},
                {"metric": "a/b"}):
        with pytest.raises(ConfigError, match=r"report\[0\]"):
            panel_objects([bad])


def test_collect_report_writes_the_spec_offline_and_push_needs_it(tmp_path, monkeypatch, capsys):
    """Offline `--report` writes report.json beside results.parquet; the spec reads back as the same report."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_collect import write_job

    from krea_sweeps.collect import main
    from krea_sweeps.report import report_from_spec

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: auto mode is offline
    sweep = tmp_path / "outputs" / "known"
    for slot in (0, 1):
        write_job(sweep, slot, "done")
    assert main([str(sweep), "--report", "--push"]) == 2  # nothing to push yet
    assert "no " in capsys.readouterr().err
    assert main([str(sweep), "--report", "--no-figures"]) == 0
    out = capsys.readouterr().out
    spec = json.loads((sweep / "report.json").read_text())
    assert (sweep / "results.parquet").exists() and "--report --push" in out
    report = report_from_spec(spec)
    assert report.title == "krea_sweeps: known" and report.project == "krea_sweeps"
    (grid,) = [b for b in report.blocks if type(b).__name__ == "PanelGrid"]
    assert grid.runsets[0].filters.startswith('Metric("Group") == \'known\'')
    assert [type(p).__name__ for p in grid.panels] == ["MediaBrowser"]  # no headline declared: just the images


def test_per_prompt_summaries_average_seeds_of_summarised_keys_only():
    from krea_sweeps.runner import per_prompt_summary

    rows = [{"metric": "image_stats", "prompt_idx": 0, "seed": 0, "sharpness": 1.0, "extra": 5.0},
            {"metric": "image_stats", "prompt_idx": 0, "seed": 1, "sharpness": 3.0},
            {"metric": "image_stats", "prompt_idx": 1, "seed": 0, "sharpness": 7.0},
            {"metric": "slot_contribution", "slot": 3, "drop": 0.1}]
    out = per_prompt_summary(rows, {"image_stats/sharpness": 3.67})
    assert out == {"by_prompt/p00/image_stats/sharpness": 2.0, "by_prompt/p01/image_stats/sharpness": 7.0}
