"""Plan: turn a composed Hydra config into validated objects, before any model is loaded.

Everything a job will do is decided here — which variant and parts, which prompts and seeds, which interventions and
metrics, where results go — so bad input fails in one line naming the config key, and nothing is half-written.
This module imports no torch-heavy code at top level: `--help` and config errors stay instant.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .build import instantiate  # noqa: F401 - planning builds every part through it (named here for callers)
from .errors import ConfigError, did_you_mean, require

# Overrides that do not change a job's result: they never enter its directory name.
NON_RESULT_KEYS = ("name", "force", "fail_fast", "experiment", "hparams_search", "objective", "headline", "report",
                   "figures", "torch_threads")
NON_RESULT_PREFIXES = ("wandb.", "hydra.", "hydra/", "model.device", "model.offload", "model.memory_budget_gb", "sweep.")
BATCH_GRID_KEY = "sweep.batch_grid"
FIGURES = ("auto", "true", "false")  # the values of `figures`


MAX_READABLE = 160  # characters of a job folder's readable part (a file name holds 255 bytes)
SWEPT_KEYS_ENV = "KREA_SWEEPS_SWEPT_KEYS"  # set by sweeps.SweepGuard (the parent), read where jobs name themselves


def job_slug(override_dirname: str) -> str:
    """A job's directory (and W&B run) name from its result-changing overrides: readable, filesystem-safe, unique.

    Every swept value stays in full; when the name would be too long, the overrides that are the same across the
    sweep are left out of it, longest first (they are still in the hash, `.hydra/overrides.yaml` and the W&B
    config). The hash of all of them keeps names unique."""
    overrides = _split_overrides(override_dirname)
    parts = sorted(p for p in overrides if not _ignored(p))
    batch = [p for p in overrides if p.lstrip("+~").startswith(BATCH_GRID_KEY + "=")]
    if not parts and not batch:
        return "stock"
    digest = hashlib.sha1(",".join(sorted(parts + batch)).encode()).hexdigest()[:8]
    swept = {k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k}
    fixed = sorted((p for p in parts if _key_of(p) not in swept), key=len, reverse=True)
    kept = list(parts)
    while len(_readable(kept)) > MAX_READABLE and fixed:
        kept.remove(fixed.pop(0))
    readable = _readable(kept)[:MAX_READABLE].strip("_")
    # A batched job's own folder starts with `_` (collect skips it): its configs each get the folder a job of their
    # own would have had (`krea_sweeps.batch`).
    return f"_batch-{readable}-{digest}" if batch else f"{readable}-{digest}"


def _readable(parts: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", ",".join(parts)).strip("_")


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _split_overrides(s: str) -> list[str]:
    """Split Hydra's `k=v,k2=[a,b]` override_dirname on the commas between overrides, not inside brackets."""
    out, depth, cur = [], 0, ""
    for ch in s or "":
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


def _ignored(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key in NON_RESULT_KEYS or key.startswith(NON_RESULT_PREFIXES)


def study_slug(search: str, preset: str, direction, objective) -> str:
    """An Optuna study's name and sweep folder: the search, the preset it runs on, the direction and the objective
    (`gains_optuna-rebalance_dial-max-image_stats.sharpness`). Two studies never share a folder, so neither
    overwrites the other's trials or `optimization_results.yaml`."""
    direction = direction[0] if isinstance(direction, (list, tuple)) or OmegaConf.is_list(direction) else direction
    short = {"maximize": "max", "minimize": "min"}.get(str(direction).lower(), str(direction))
    parts = [search, preset, short, str(objective).replace("/", ".")]
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "-".join(parts))


def register_resolvers() -> None:
    """Our resolvers and the typed groups' schemas (`configs`): everything composition needs, registered once."""
    from .configs import register_schemas

    register_schemas()
    if not OmegaConf.has_resolver("job_slug"):
        OmegaConf.register_new_resolver("job_slug", job_slug)
    if not OmegaConf.has_resolver("study_slug"):
        OmegaConf.register_new_resolver("study_slug", study_slug)
    if not OmegaConf.has_resolver("krea_help"):  # `python run.py --help`, read from conf/ when asked for
        OmegaConf.register_new_resolver("krea_help", lambda: __import__("krea_sweeps.cli_help").cli_help.render())


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


def check_name(name) -> str:
    """`name` is one folder under outputs/: no path separators, no `..`, nothing that can leave outputs/."""
    name = str(name)
    require(bool(_SAFE_NAME.fullmatch(name)) and ".." not in name, "name", f"{name!r} is not a plain folder name",
            "use letters, digits and _ . + = - (it becomes outputs/<name>/), e.g. name=solo_sweep")
    return name


def normalise_seeds(seeds) -> list[int]:
    if isinstance(seeds, (int, str)) and not isinstance(seeds, bool):
        seeds = [seeds]
    require(seeds is not None and len(seeds) > 0, "seeds", "no seeds given", "give e.g. seeds=[0] or -m seeds=0,1")
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ConfigError("seeds", f"{seeds} are not integers", "give integer seeds, e.g. seeds=[0,1]") from None
    # Images, rows and files are keyed by (prompt, seed): a repeated seed would overwrite its twin.
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    require(not repeated, "seeds", f"seed(s) {repeated} repeated in {seeds}", "give each seed once")
    return seeds


@dataclass
class Job:
    """Everything one job will do, validated."""

    cfg: DictConfig
    variant: Any
    sampler: Any  # resolved against the variant
    prompt_set: Any
    prompts: list[str]
    seeds: list[int]
    interventions: list[Any]
    metrics: list[Any]
    wandb: Any
    needs: frozenset
    job_dir: Path
    sweep_dir: Path | None
    name: str
    group: str
    experiment: str
    multirun: bool
    force: bool = False
    fail_fast: bool = False
    objective: str | None = None
    figures: bool = True  # render per-job figures (PNGs + W&B images); the arrays behind them are saved regardless
    torch_threads: int | str | None = "auto"  # `process.torch_threads_for`
    extra: dict = field(default_factory=dict)

    @property
    def generates(self) -> bool:
        return "images" in self.needs

    @property
    def is_stock(self) -> bool:
        return all(i.is_identity for i in self.interventions)


def intervention_label(job: Job) -> str:
    """The interventions as applied, in one line (`solo site=projector slot=6; knockout …`): run names, captions."""
    parts = []
    for i in job.interventions:
        d = i.describe()
        bits = [d["kind"]] + [f"{k}={d[k]}" for k in ("site", "slot", "layer", "strength") if d.get(k) is not None]
        parts.append(" ".join(str(b) for b in bits))
    return "; ".join(parts)


def effective_interventions(cfg: DictConfig) -> list:
    """`intervention` (one, from the group) is sugar for a list of one; `interventions` lists several, in order
    after it, e.g. `'interventions=[{_target_: krea_sweeps.interventions.Knockout, keys: [L20]}]'`."""
    items = []
    if cfg.get("intervention") is not None:
        items.append(("intervention", cfg.get("intervention")))
    for i, node in enumerate(cfg.get("interventions") or []):
        items.append((f"interventions[{i}]", node))
    from .interventions import keyed

    objects = []
    for key, node in items:
        with keyed(key):  # errors name the real key: `interventions[1].slot`, not `intervention.slot`
            obj = instantiate(node, key)
        obj.config_key = key
        objects.append(obj)
    non_identity = [o for o in objects if not o.is_identity]
    return non_identity or objects[:1]


def _widths(variant) -> dict:
    """`text_dim`, the encoder width D of the taps [.., 12, D], and `dit_dim`, the DiT's hidden size (its text
    tokens after txt_in), from the variant's transformer config json alone (no weights), so interventions can check
    shapes before any load. None when it cannot be read: the attach-time checks still apply."""
    if variant.synthetic:  # not via LoadedModel: that would write the synthetic checkpoints
        weights = variant.synthetic_weights
        return {"text_dim": int(weights.text_hidden_dim), "dit_dim": int(weights.dit_hidden_dim)}
    try:
        from .models import LoadedModel

        config = LoadedModel(variant)._transformer_config()
        return {"text_dim": int(config.get("text_hidden_dim", 2560)),
                "dit_dim": int(config.get("num_attention_heads", 48)) * int(config.get("attention_head_dim", 128))}
    except Exception:  # an unreadable config is the model loader's error to report, with its own key
        return {"text_dim": None, "dit_dim": None}


def plan(cfg: DictConfig, hydra_cfg: DictConfig | None = None) -> Job:
    from .interventions import InterventionContext, validate_all
    from .metrics import needs_of

    variant = instantiate(cfg.model, "model")
    sampler = instantiate(cfg.sampler, "sampler").resolved(variant)
    prompt_set = instantiate(cfg.prompts, "prompts")
    prompts = prompt_set.load()
    seeds = normalise_seeds(cfg.get("seeds"))
    interventions = effective_interventions(cfg)
    ictx = InterventionContext(num_steps=sampler.steps, guidance=sampler.guidance, **_widths(variant),
                               prompts=prompts)
    validate_all(interventions, ictx)
    metric_nodes = cfg.get("metrics") or {}
    require(len(metric_nodes) > 0, "metrics", "no metrics selected", "select some, e.g. metrics=[image_stats]")
    metrics = [instantiate(node, f"metrics.{name}") for name, node in metric_nodes.items()]
    wandb_cfg = instantiate(cfg.wandb, "wandb")
    from .report import panel_objects

    panel_objects(cfg.get("report"))  # the preset's report panels: checked now, built by `krea-collect --report`

    job_dir, sweep_dir, name, multirun = _locations(hydra_cfg)
    experiment = check_name(cfg.get("name", "default"))
    job = Job(
        cfg=cfg, variant=variant, sampler=sampler, prompt_set=prompt_set, prompts=prompts, seeds=seeds,
        interventions=interventions, metrics=metrics, wandb=wandb_cfg, needs=needs_of(metrics), job_dir=job_dir,
        sweep_dir=sweep_dir, name=name, group=sweep_dir.name if sweep_dir else experiment, experiment=experiment,
        multirun=multirun, force=bool(cfg.get("force", False)), fail_fast=bool(cfg.get("fail_fast", False)),
        objective=cfg.get("objective"),
    )
    job.figures = figures_wanted(cfg.get("figures", "auto"), job)
    job.torch_threads = cfg.get("torch_threads", "auto")
    from .process import torch_threads_for

    torch_threads_for(job.torch_threads, variant.synthetic, "cpu")  # a bad value fails here, before any load
    for metric in metrics:
        metric.validate(job)
    return job


def figures_wanted(setting, job: Job) -> bool:
    """`figures=auto`: off in a conditioning-only sweep — matplotlib cost more than the job's own work there, and
    `collect` draws the same maps from the saved arrays across the whole sweep — on everywhere else."""
    if setting is None or str(setting) == "auto":
        return not (job.multirun and not job.generates)
    # Typed `bool | str` (configs.RunFields: OmegaConf has no bool-or-choice type), so the word is checked here.
    require(isinstance(setting, bool), "figures", f"unknown value {setting!r}",
            f"{did_you_mean(setting, FIGURES)}use one of: {', '.join(FIGURES)}")
    return setting


def _locations(hydra_cfg: DictConfig | None) -> tuple[Path, Path | None, str, bool]:
    if hydra_cfg is None:  # called outside Hydra (tests, notebooks)
        return Path("outputs/adhoc"), None, "adhoc", False
    from hydra.types import RunMode

    job_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep_dir = Path(hydra_cfg.sweep.dir) if multirun else None
    return job_dir, sweep_dir, job_dir.name, multirun
