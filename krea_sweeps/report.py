"""A W&B Report per sweep, generated (`krea-collect outputs/<sweep> --report`): the comparison nobody should have to
click together by hand for every sweep.

Each preset declares its panels in its YAML, next to `headline` (the `report` key, a list of the panel classes
below, by `_target_`); a preset that declares none — a user's own, say — gets one `MetricVsAxis` per headline key
and the image grid. The report holds one panel grid over the runs of the sweep's W&B group (its runs table comes with
it), after a heading and a paragraph that say what was swept.

Reports are built with `wandb_workspaces.reports.v2` (objects build offline; `.save()` needs the W&B API). Offline,
the report's spec is written as JSON next to `results.parquet`, and `krea-collect <sweep> --report --push` saves it
once the runs are synced. Nothing here imports wandb_workspaces at module level: configs are checked without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, require

REPORT_FILE = "report.json"
PANEL_MODULE = __name__ + "."
# Sweep axes that are config-group choices: the W&B config key that carries the choice in every job's run. A list
# of interventions has no one key that tells its values apart: its bars are one per run (named by what ran).
GROUP_KEYS = {"model": "variant", "intervention": "intervention.kind", "prompts": "prompts.name", "interventions": None}


# --------------------------------------------------------------------------------------------- what a sweep is
@dataclass
class SweepInfo:
    """What a report needs to know about a sweep — from the sweep's jobs (collect) or from a composed preset."""

    group: str                                  # W&B group = the sweep folder's name
    project: str = "krea_sweeps"
    entity: str | None = None
    axes: list[str] = field(default_factory=list)   # swept keys as on the command line (`intervention.slot`, `model`)
    headline: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    images: bool = True                         # whether the jobs generate images (a contact sheet each)
    optuna: bool = False
    objective: str | None = None
    panels: list[Any] = field(default_factory=list)  # the preset's `report` entries (configs with `_target_`)
    synthetic: bool = False

    @property
    def first_axis(self) -> str | None:
        return next((a for a in self.axes if not a.startswith("search.")), None)


def wandb_key(axis: str | None) -> str | None:
    """The W&B config key a swept override ends up under (`model` → `variant`, `intervention.slot` as is); None: one
    bar per run."""
    if axis is None:
        return None
    return GROUP_KEYS.get(axis.lstrip("+~"), axis.lstrip("+~"))


def per_prompt_key(metric: str, prompt: int) -> str:
    """The W&B summary key of `metric` for one prompt (mean over seeds); jobs log these (runner.per_prompt_summary)."""
    return f"by_prompt/p{prompt:02d}/{metric}"


# ------------------------------------------------------------------------------------------------------ panels
@dataclass
class MetricVsAxis:
    """A headline metric against the swept axis: bars grouped by prompt (`plot: bar`, the all-prompt mean first,
    then one bar per prompt; runs with the same axis value — seeds — averaged, stderr shown), or one point per run
    (`plot: scatter`, for a numeric axis). `axis: null` = the sweep's first swept key."""

    metric: str
    axis: str | None = None
    plot: str = "bar"
    title: str | None = None

    def __post_init__(self):
        require(self.plot in ("bar", "scatter"), "report.plot", f"unknown plot {self.plot!r}", "use bar or scatter")
        require(isinstance(self.metric, str) and "/" in self.metric, "report.metric",
                f"{self.metric!r} is not a summary key", "name one as <metric>/<stat>, e.g. image_stats/sharpness")

    def build(self, sweep: SweepInfo) -> list:
        import wandb_workspaces.reports.v2 as wr

        axis = self.axis or sweep.first_axis
        key = wandb_key(axis)
        title = self.title or (f"{self.metric} vs {axis}" if axis else self.metric)
        if self.plot == "scatter" and key:
            return [wr.ScatterPlot(title=title, x=wr.Config(key), y=wr.SummaryMetric(self.metric))]
        series = [self.metric] + [per_prompt_key(self.metric, p) for p in range(len(sweep.prompts))]
        names = {self.metric: "all prompts"}
        names.update({per_prompt_key(self.metric, p): f"p{p:02d} {text[:40]}" for p, text in enumerate(sweep.prompts)})
        return [wr.BarPlot(title=title, metrics=[wr.SummaryMetric(s) for s in series], orientation="v",
                           groupby=wr.Config(key) if key else None,
                           groupby_aggfunc="mean" if key else None, groupby_rangefunc="stderr" if key else None,
                           line_titles=names, title_x=axis, title_y=self.metric)]


@dataclass
class GainsParallel:
    """Parallel coordinates over the searched gains (`search.g0` … `search.g11`) and the objective: which gain
    profiles an Optuna study found good."""

    prefix: str = "search.g"
    count: int = 12
    objective: str = "objective"
    title: str = "gains → objective"

    def build(self, sweep: SweepInfo) -> list:
        import wandb_workspaces.reports.v2 as wr

        from .synthetic import SELECT_LAYERS

        columns = [wr.ParallelCoordinatesPlotColumn(wr.Config(f"{self.prefix}{i}"),
                                                    display_name=f"g{i} L{SELECT_LAYERS[i]}"
                                                    if i < len(SELECT_LAYERS) else None)
                   for i in range(self.count)]
        columns.append(wr.ParallelCoordinatesPlotColumn(wr.SummaryMetric(self.objective),
                                                        display_name=sweep.objective or self.objective))
        return [wr.ParallelCoordinatesPlot(columns=columns, title=self.title)]


@dataclass
class Media:
    """Images every job logs under the same key, one per run side by side: the contact sheet (rows = prompts,
    columns = seeds) or a metric's heatmaps (`fusion_attention/block0/mean_map`)."""

    keys: list[str] = field(default_factory=lambda: ["contact_sheet"])
    title: str | None = None
    columns: int = 4

    def build(self, sweep: SweepInfo) -> list:
        import wandb_workspaces.reports.v2 as wr

        return [wr.MediaBrowser(title=self.title or ", ".join(self.keys), media_keys=list(self.keys),
                                num_columns=self.columns)]


# ------------------------------------------------------------------------------------------- panels of a sweep
def panel_objects(entries, key: str = "report") -> list:
    """The preset's `report` entries as panel objects. Only this module's classes are instantiated: a config (or a
    result.json read back by collect) never gets to call anything else."""
    from .build import instantiate

    objects = []
    for i, entry in enumerate(entries or []):
        target = str((entry or {}).get("_target_", "")) if hasattr(entry, "get") else ""
        require(target.startswith(PANEL_MODULE) and target[len(PANEL_MODULE):] in PANEL_CLASSES, f"{key}[{i}]",
                f"{target or entry!r} is not a report panel",
                f"use _target_: one of {', '.join(PANEL_MODULE + c for c in PANEL_CLASSES)}")
        objects.append(instantiate(entry, f"{key}[{i}]"))
    return objects


PANEL_CLASSES = ("MetricVsAxis", "GainsParallel", "Media")


def default_panels(sweep: SweepInfo) -> list:
    """What a preset without a `report` list gets: the gains panel for Optuna, one panel per headline key (or the
    objective), and the image grid when its jobs make images."""
    panels: list = [GainsParallel()] if sweep.optuna else []
    metrics = list(sweep.headline) or ([sweep.objective] if sweep.objective else [])
    panels += [MetricVsAxis(metric=m, plot="scatter" if sweep.optuna else "bar") for m in metrics]
    if sweep.images:
        panels.append(Media())
    return panels


def sweep_panels(sweep: SweepInfo) -> list:
    return panel_objects(sweep.panels) if sweep.panels else default_panels(sweep)


def build_report(sweep: SweepInfo):
    """The sweep's report (not saved): heading, what was swept, one panel grid over the group's job runs."""
    import wandb_workspaces.reports.v2 as wr

    runs = wr.Runset(entity=sweep.entity or "", project=sweep.project, name=sweep.group,
                     filters=f"Metric('Group') == '{sweep.group}' and Metric('JobType') != 'collect'")
    panels = [p for panel in sweep_panels(sweep) for p in panel.build(sweep)]
    about = (f"Runs of the sweep `{sweep.group}` (W&B group), swept over "
             f"{', '.join(sweep.axes) or 'nothing'}; headline metrics: {', '.join(sweep.headline) or '—'}. "
             f"Bars are grouped by the swept value and show the mean over prompts, then each prompt.")
    if sweep.synthetic:
        about += " Made on the synthetic Krea 2: its numbers test the tool, they are not Krea 2 findings."
    return wr.Report(project=sweep.project, entity=sweep.entity or "", title=f"krea_sweeps: {sweep.group}"[:128],
                     description=f"generated by krea-collect for outputs/{sweep.group}",
                     blocks=[wr.H1(sweep.group), wr.P(about), wr.PanelGrid(runsets=[runs], panels=panels)])


def report_spec(report) -> dict:
    """The report as JSON-able data (W&B's own view spec), to save later with `--push`."""
    return report._to_model().model_dump(by_alias=True, mode="json", exclude_none=True)


def report_from_spec(spec: dict):
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.reports.v2 import internal

    return wr.Report._from_model(internal.ReportViewspec.model_validate(spec))


def write_spec(report, sweep_dir: Path) -> Path:
    from .files import atomic_write

    path = Path(sweep_dir) / REPORT_FILE
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(report_spec(report), indent=1))
    return path


def push(sweep_dir: Path) -> str:
    """Save the report spec written offline (after `wandb sync`); returns its URL."""
    path = Path(sweep_dir) / REPORT_FILE
    if not path.exists():
        raise ConfigError("--push", f"no {path}", f"write it first: krea-collect {sweep_dir} --report")
    report = report_from_spec(json.loads(path.read_text()))
    return save(report)


def save(report) -> str:
    if not report.entity:
        import wandb

        report.entity = wandb.Api().default_entity
    report.save()
    return report.url


# --------------------------------------------------------------------------------------------- from a sweep
def sweep_from_jobs(jobs, sweep_dir: Path, axes: list[str]) -> SweepInfo:
    """What collect knows about a sweep: its folder (group), its jobs' shared config, its swept keys."""
    done = [j for j in jobs if j.config] or jobs
    config = done[0].config if done else {}
    wcfg = config.get("wandb") or {}
    headline = list(dict.fromkeys(k for j in done for k in (j.config.get("headline") or [])))
    objective = next((j.config.get("objective") for j in done if j.config.get("objective")), None)
    return SweepInfo(
        group=Path(sweep_dir).name, project=wcfg.get("project") or "krea_sweeps", entity=wcfg.get("entity"),
        axes=list(axes), headline=headline, prompts=done[0].prompts if done else [],
        images=any((j.dir / "images").is_dir() for j in done) or not config.get("conditioning_only", False),
        optuna=any(a.startswith("search.") for a in axes) or any(k.startswith("search") for k in config),
        objective=objective, panels=list(config.get("report") or []),
        synthetic=any((j.record.get("job") or {}).get("synthetic") for j in done))


def sweep_from_config(cfg) -> SweepInfo:
    """What a composed preset says about its sweep (with `return_hydra_config=True`): used to check a preset's
    report before anything runs, and by the tests."""
    from omegaconf import OmegaConf

    from .build import instantiate

    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    sweep_dir = OmegaConf.select(cfg, "hydra.sweep.dir", default=None) or f"outputs/{cfg.get('name', 'default')}"
    prompts = instantiate(cfg.prompts, "prompts").load()
    return SweepInfo(
        group=Path(str(sweep_dir)).name, project=cfg.wandb.get("project") or "krea_sweeps",
        entity=cfg.wandb.get("entity"), axes=[str(k) for k in params], headline=list(cfg.get("headline") or []),
        prompts=prompts, images=not cfg.get("conditioning_only", False),
        optuna=OmegaConf.select(cfg, "hydra.sweeper.direction", default=None) is not None,  # an optimising sweeper
        objective=cfg.get("objective"),
        panels=OmegaConf.to_container(cfg.get("report"), resolve=True) if cfg.get("report") else [],
        synthetic=cfg.model.get("path") is None)
