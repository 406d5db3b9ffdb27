"""Sweep-level guards: check a whole sweep before its first job, report every failed job after its last.

Hydra does neither. A typo in a sweep axis, an Optuna objective no metric provides or a SLURM launcher on a machine
without SLURM would otherwise surface as a multi-line traceback — or only after hours of finished jobs. And launchers
that run jobs in other processes (submitit) never hand their exceptions back, so failures are found afterwards, on
disk, as `failed.json` files written during this sweep.

`SweepGuard` is registered as a Hydra callback in `conf/config.yaml`; `preflight` runs in `run.py` before Hydra
composes anything (an unknown `+experiment=NAME` fails inside composition, before any callback exists).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from .configs import composition_error
from .errors import ConfigError, require, require_choice
from .plan import SWEPT_KEYS_ENV, register_resolvers

log = logging.getLogger("krea_sweeps")
CONF = Path(__file__).resolve().parents[1] / "conf"

# Submitit unpickles this callback in each job process before Hydra resolves `hydra.sweep.subdir` (= `${job_slug:…}`):
# importing this module there is what registers the resolver in the child.
register_resolvers()


# --------------------------------------------------------------------------------------------- before composition
def preflight(argv: list[str], conf_dir: Path = CONF) -> None:
    """One line (exit 2) for an unknown option of one of our config groups (`+experiment=typo`) or a key that does
    not exist (`intervention.slott=1`), instead of Hydra's multi-line composition error."""
    try:
        check_names(argv)
        check_group_options(argv, conf_dir)
        check_keys_compose(argv, conf_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check_names(argv: list[str]) -> None:
    """`name=` becomes a folder under outputs/ before any callback runs (Hydra makes the job dir first)."""
    from .plan import _split_overrides, check_name

    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "name" and value:
            for one in _split_overrides(value):
                check_name(one.strip())


def check_keys_compose(argv: list[str], conf_dir: Path = CONF) -> None:
    """Compose once with the plain overrides; sweep axes (several values, `range(…)`) are SweepGuard's to check."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    if any(a in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--shell-completion") for a in argv):
        return
    overrides = [a for a in argv if not a.startswith("-") and "=" in a and not _is_sweep_axis(a)
                 and not a.lstrip("+~").startswith("hydra")]
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except HydraException as e:
        key = _failing_key(str(e), overrides)
        typed = composition_error(e, lambda: config_keys(conf_dir, [o for o in overrides if not _sets(o, key)]))
        if typed is not None:  # a typed group's type, choice or key (configs.py), or a key no group has
            raise typed from None
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ConfigError(key, lines[-1] if lines else type(e).__name__, "check the spelling (`python run.py --cfg "
                          "job` lists every key; `++key=value` adds a new one)") from None
    if not any(a.lstrip("+~").startswith(("hydra.run.dir", "hydra.sweep.dir")) for a in argv):
        check_writable(Path("outputs") / str(cfg.get("name", "default")))


def _sets(override: str, key: str) -> bool:
    return override.split("=", 1)[0].lstrip("+~") == key


def config_keys(conf_dir: Path, overrides: list[str]) -> list[str]:
    """Every dotted key of the config these overrides compose (what a misspelt key is compared with)."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except Exception:
        return []
    return dotted_keys(OmegaConf.to_container(cfg, resolve=False))


def dotted_keys(node, prefix: str = "") -> list[str]:
    out = []
    for k, v in (node.items() if isinstance(node, dict) else []):
        key = f"{prefix}.{k}" if prefix else str(k)
        out.append(key)
        out += dotted_keys(v, key)
    return out


def check_writable(folder: Path) -> None:
    """The sweep folder (or the nearest folder above it that exists) must be writable: Hydra creates job folders in
    it before any of our code runs, and would fail there with a traceback."""
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    require(existing.is_dir() and os.access(existing, os.W_OK | os.X_OK), "name",
            f"{existing} is not a writable folder", "make it writable (chmod u+w) or choose another name=")


def _is_sweep_axis(arg: str) -> bool:
    from .plan import _split_overrides

    value = arg.split("=", 1)[1]
    return len(_split_overrides(value)) > 1 or value.startswith(("range(", "choice(", "interval(", "glob(", "tag("))


def _failing_key(message: str, overrides: list[str]) -> str:
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+~")
        if f"'{key}'" in message:
            return key
    return "overrides"


def check_group_options(argv: list[str], conf_dir: Path = CONF) -> None:
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if group not in groups or "(" in value or "$" in value:
            continue
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml") if not p.stem.startswith("_"))
        for name in _option_names(value):
            require_choice(name, options, group, "option")
        if group in ("experiment", "hparams_search") and not key.startswith(("+", "~")):
            raise ConfigError(group, f"`{arg}` needs a leading +", f"write +{arg} (it is not in the defaults list)")


def _option_names(value: str) -> list[str]:
    value = value.strip().strip("[]")
    return [v.strip() for v in value.replace("[", ",").replace("]", ",").split(",") if v.strip()]


# ------------------------------------------------------------------------------------------- before the first job
def check_launcher(config: DictConfig) -> None:
    """The commands the chosen launcher preset declares it needs (`sweep.launcher_needs` in conf/config.yaml) must be
    on PATH here, before any job is submitted."""
    choice = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
    launcher = choice.get("hydra/launcher")
    needs = OmegaConf.select(config, "sweep.launcher_needs", default=None) or {}
    for command in needs.get(launcher) or []:
        require(shutil.which(str(command)) is not None, "hydra/launcher",
                f"hydra/launcher={launcher} needs `{command}`, which is not on PATH (not a login node of that "
                "cluster?)",
                "run on the cluster's login node, or use hydra/launcher=local (processes here) or no launcher "
                "override (one process, shared model cache)")


def optimises(config: DictConfig) -> bool:
    """Whether the sweeper optimises the value each job returns: its config declares a `direction` (Optuna's
    maximize / minimize), so each job needs an objective and a trial's values are placeholders until it runs."""
    return OmegaConf.select(config, "hydra.sweeper.direction", default=None) is not None


def is_basic_sweeper(config: DictConfig) -> bool:
    """Whether `hydra.sweeper._target_` is Hydra's own BasicSweeper class (imported, not called; the same class even
    when Hydra's plugin scan has re-imported its module, so compared by where it is defined)."""
    from hydra.utils import get_class

    try:
        cls = get_class(str(OmegaConf.select(config, "hydra.sweeper._target_", default="")))
    except Exception:
        return False
    return (cls.__module__, cls.__qualname__) == (BasicSweeper.__module__, BasicSweeper.__qualname__)


def check_study_storage(config: DictConfig) -> None:
    """An Optuna study database lives under outputs/ (git-ignored), never loose in the working tree; its folder is
    made here because Optuna's SQLite storage does not create it."""
    storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
    if not isinstance(storage, str) or not storage.startswith("sqlite:///"):
        return
    path = Path(storage[len("sqlite:///"):])
    require(path.is_absolute() or (path.parts and path.parts[0] == "outputs"), "hydra.sweeper.storage",
            f"{storage!r} would put the study database in the working tree",
            "keep it under outputs/, e.g. hydra.sweeper.storage=sqlite:///outputs/optuna.db")
    path.parent.mkdir(parents=True, exist_ok=True)


def check_sweep(config: DictConfig) -> None:
    """Compose and plan each value of each sweep axis (others at their first value): bad keys, bad values, a bad
    objective all fail here, in one line, before any job starts. Model-free: `plan` loads nothing."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parser = OverridesParser.create()
    try:
        overrides = parser.parse_overrides(arguments)
    except Exception as e:  # hydra's grammar errors are already one line
        raise ConfigError("overrides", str(e).splitlines()[0], "check the override syntax") from None
    by_key = {}
    for o in overrides:  # a command-line axis replaces the preset's axis of the same key (as the sweeper does)
        by_key[o.get_key_element()] = o
    batched = set(batch_axes_of(config))  # the batched job plans each of their values itself, before any load
    axes = {k: _values(o) for k, o in by_key.items() if o.is_sweep_override()}
    os.environ[SWEPT_KEYS_ENV] = ",".join(sorted(k.lstrip("+~") for k in axes))  # job names keep these in full
    axes = {k: (v[:1] if k in batched else v) for k, v in axes.items()}
    fixed = [o.input_line for k, o in by_key.items() if not o.is_sweep_override()]
    first = {k: v[0] for k, v in axes.items()}
    optimising = optimises(config)
    jobs = [first]
    for k, values in axes.items():
        jobs += [{**first, k: v} for v in values[1:]]
    loader = ComposeOnce(GlobalHydra.instance().config_loader())
    for job in jobs:
        job_overrides = fixed + [f"{k}={v}" for k, v in job.items()]
        where = " ".join(f"{k}={v}" for k, v in job.items())
        try:
            job_cfg = loader.load_sweep_config(config, job_overrides)
        except Exception as e:
            typed = composition_error(e, lambda: dotted_keys(OmegaConf.to_container(config, resolve=False)))
            if typed is not None:
                raise ConfigError(typed.key, f"{typed.problem} (sweep job: {where})", typed.fix) from None
            raise ConfigError(_bad_key(str(e), list(job)), f"this sweep cannot be composed "
                              f"({str(e).splitlines()[0].strip()})", "check the key and value (`python run.py --cfg "
                              "job` lists the keys); prefix + to add a new key") from None
        try:
            check_job(job_cfg, optimising=optimising)
        except ConfigError as e:
            if len(jobs) == 1 or optimising:  # the job's values add nothing (an optimiser's are placeholders)
                raise
            raise ConfigError(e.key, f"{e.problem} (sweep job: {where})", e.fix) from None


def check_job(cfg: DictConfig, optimising: bool = False) -> None:
    from .plan import plan

    job = plan(cfg)
    if optimising:
        require(bool(job.objective), "objective", "the sweeper (Optuna) optimises a metric and none is named",
                "set objective=<metric>/<stat>, e.g. objective=image_stats/sharpness")
    check_objective(job)


def check_objective(job) -> None:
    """The objective (`<metric>/<stat>`) must be a summary key the job will report: its metric selected, its stat one
    the metric declares (`Metric.summary_keys`), so a typo stops the run before the first job instead of after it."""
    if not job.objective:
        return
    from difflib import get_close_matches

    from .metrics.base import key_matches

    objective = str(job.objective)
    names = {m.name: m for m in job.metrics}
    metric = objective.split("/", 1)[0]
    require(metric in names, "objective", f"{objective!r}: no selected metric provides it "
            f"(metrics: {', '.join(sorted(names))})",
            f"add the metric (metrics=[{','.join(sorted(set(names) | {metric}))}]) or name a key of a selected metric")
    declared = names[metric].summary_keys(job)
    if declared is None or any(key_matches(k, objective) for k in declared):
        return  # an undeclared metric's keys are checked after its first job (runner.objective_of)
    close = get_close_matches(objective, declared, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError("objective", f"{objective!r} is not a key of `{metric}`"
                      + ("" if declared else " (it reports none with this config)"),
                      f"{hint}keys: {', '.join(declared) or '(none)'}")


def _values(override) -> list[str]:
    """The sweep values as override strings (interval sweeps → their low end: a representative)."""
    from hydra.core.override_parser.types import IntervalSweep

    value = override.value()
    if isinstance(value, IntervalSweep):
        return [repr(float(value.start))]
    return list(override.sweep_string_iterator())


def _bad_key(message: str, keys: list[str]) -> str:
    for k in keys:
        if f"'{k}'" in message or f"'{k.lstrip('+~')}'" in message:
            return k.lstrip("+~")
    import re

    m = re.search(r"'([^']+)'", message)
    return m.group(1) if m else "overrides"


# ------------------------------------------------------------------------------------------------ job order
def is_model_axis(key: str) -> bool:
    return key == "model" or key.startswith("model.")


def order_variants_first(config: DictConfig) -> None:
    """Make Hydra's basic sweeper vary the `model` axes slowest, so one variant's jobs run back to back and the
    session's model cache (least recently used evicted under a budget) loads each variant once instead of swapping
    DiTs job by job. The basic sweeper crosses its `params` (a preset's axes) before the command line's and keeps
    each key where it first appeared, so putting the model axes at the front of `params` is enough; the values stay
    the command line's. Runs before the sweeper is made from the config (Hydra calls this callback first)."""
    from omegaconf import open_dict, read_write

    if not is_basic_sweeper(config):
        return  # Optuna and others choose their own order
    params = dict(OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})
    model_axes = {k: v for k, v in params.items() if is_model_axis(k)}
    for arg in config.hydra.overrides.task:
        key, _, value = arg.partition("=")
        if is_model_axis(key) and _is_sweep_axis(arg):
            model_axes[key] = value
    if not model_axes:
        return
    ordered = {**model_axes, **{k: v for k, v in params.items() if k not in model_axes}}
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweeper.params = ordered


# --------------------------------------------------------------------------------------------- after the last job
def failures_since(sweep_dir: Path, since: float) -> list[str]:
    """`name: error` for each job of `sweep_dir` whose failed.json was written at or after `since`."""
    out = []
    for file in sorted(Path(sweep_dir).glob("*/failed.json")):
        if file.stat().st_mtime + 1.0 < since:
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        out.append(f"{file.parent.name}: {data.get('error', 'unknown error')}")
    return out


class SweepGuard(Callback):
    """Validate the sweep before it starts; afterwards collect failures from disk (works for every launcher)."""

    def __init__(self) -> None:
        self.started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()
        try:
            check_launcher(config)
            check_study_storage(config)
            check_sweep(config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        order_variants_first(config)
        use_planned_sweeper(config)  # after order_variants_first: it recognises the basic sweeper

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .session import current_session

        if self.started is None:
            return
        failed = current_session().failed_jobs
        for line in failures_since(Path(config.hydra.sweep.dir), self.started):
            if line not in failed:
                failed.append(line)


# ---------------------------------------------------------------------------------------------------- the sweeper
PLANNED_SWEEPER = "hydra_plugins.krea_sweeps_sweeper.planned_sweeper.PlannedSweeper"


def use_planned_sweeper(config: DictConfig) -> None:
    """Swap Hydra's basic sweeper for `PlannedSweeper` (its subclass) in the config Hydra instantiates the sweeper
    from next. Done here rather than as a `hydra/sweeper` default because a default chosen in the primary config
    would win over an experiment's `override /hydra/sweeper: optuna`; any other sweeper is left as chosen."""
    from omegaconf import read_write

    if is_basic_sweeper(config):
        with read_write(config.hydra.sweeper):
            config.hydra.sweeper._target_ = PLANNED_SWEEPER
    elif batch_axes_of(config):
        log.warning("sweep.batch_axes is ignored by %s (only Hydra's basic sweeper batches)",
                    OmegaConf.select(config, "hydra.sweeper._target_", default="this sweeper"))


def batch_axes_of(config: DictConfig) -> list[str]:
    return [str(a) for a in (OmegaConf.select(config, "sweep.batch_axes", default=None) or [])]


class ComposeOnce:
    """Hydra's config loader for a sweep's jobs, composing the defaults list once instead of once per job.

    Hydra composes each job from scratch (defaults list, every YAML file, merges: ~0.1 s on a 2-core CPU, a third of
    a conditioning-only job). Jobs that differ from an already composed one only in plain value overrides
    (`intervention.slot=3`: no `+`/`~`, no config group, no dict value, no `hydra.*` key) get a copy of that job's
    config with the differing overrides applied as Hydra applies a plain value override after composition
    (`OmegaConf.update(cfg, key, value, merge=True)` on the value Hydra's public `OverridesParser` parsed; a rejected
    value raises Hydra's `ConfigCompositionException`), and `hydra.overrides.task` / `hydra.job.override_dirname` set
    as Hydra sets them. No private function of Hydra's is called (its basic sweeper and launcher classes, which we
    subclass, live under `hydra._internal.core_plugins`: that is where Hydra ships them). Anything else (another
    group choice, another set of keys) is composed by Hydra as before. Equality with Hydra's composition (lists, quoted strings, null,
    nested keys, interpolations, a rejected value): `tests/test_speed.py::test_compose_once_equals_hydra`. Other
    attributes are the loader's."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.template = None  # (parsed overrides, composed config) of the last job Hydra composed

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        import copy

        from hydra.core.override_parser.overrides_parser import OverridesParser

        lines = [str(o) for o in OmegaConf.to_container(master_config.hydra.overrides.hydra)] + list(sweep_overrides)
        parsed = OverridesParser.create().parse_overrides(lines)
        changed = self._value_changes(parsed) if self.template is not None else None
        if changed is None:
            cfg = self.loader.load_sweep_config(master_config, list(sweep_overrides))
            self.template = (parsed, copy.deepcopy(cfg))
            return cfg
        cfg = copy.deepcopy(self.template[1])
        apply_value_overrides(changed, cfg)
        task = [o for o in parsed if not o.is_hydra_override()]
        dirname = cfg.hydra.job.config.override_dirname
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [o.input_line for o in task]
            cfg.hydra.job.override_dirname = overrides_dirname(task, dirname.exclude_keys, dirname.item_sep,
                                                               dirname.kv_sep)
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
        return cfg

    def _value_changes(self, parsed: list) -> list | None:
        """The overrides in which `parsed` differs from the template's, when all are plain value changes; else None."""
        from hydra.core.override_parser.types import OverrideType

        before = self.template[0]
        if len(before) != len(parsed):
            return None
        changed = []
        for old, new in zip(before, parsed):
            if old.input_line == new.input_line:
                continue
            if (old.key_or_group != new.key_or_group or old.package is not None or new.package is not None
                    or old.type != OverrideType.CHANGE or new.type != OverrideType.CHANGE
                    or new.is_sweep_override() or new.is_hydra_override()
                    or isinstance(new.value(), dict) or isinstance(old.value(), dict)
                    or self.loader.repository.group_exists(new.key_or_group)):
                return None
            changed.append(new)
        return changed


def apply_value_overrides(overrides: list, cfg: DictConfig) -> None:
    """Apply plain value overrides (`key=value`: no `+`/`~`, no package) to a composed config as Hydra does after
    composition: `OmegaConf.update(..., merge=True)`, an OmegaConf error re-raised as `ConfigCompositionException`
    naming the override line."""
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    for override in overrides:
        try:
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
        except (ConfigAttributeError, ConfigKeyError) as ex:
            raise ConfigCompositionException(f"Could not override '{override.key_or_group}'."
                                             f"\nTo append to your config use +{override.input_line}") from ex
        except OmegaConfBaseException as ex:
            raise ConfigCompositionException(f"Error merging override {override.input_line}") from ex


def overrides_dirname(overrides: list, exclude_keys, item_sep: str, kv_sep: str) -> str:
    """`hydra.job.override_dirname` as Hydra builds it: the override lines not excluded, sorted, joined by
    `item_sep`, each `=` replaced by `kv_sep`."""
    lines = sorted(o.input_line for o in overrides if o.key_or_group not in exclude_keys)
    return item_sep.join(lines).replace("=", kv_sep)


class PlannedSweeper(BasicSweeper):
    """Hydra's basic sweeper (same grid, same job order, same overrides per job) with two differences:

    - it does not compose every job's config to validate it: `SweepGuard` already composed and planned each value of
      each axis before the sweep started, and the launcher composes each job to run it — a third composition per job
      was 0.08 s of a 1.24 s conditioning job;
    - `sweep.batch_axes=[intervention.slot,…]`: those axes are taken out of the grid and handed to one job per
      combination of the other axes (`sweep.batch_grid`), which evaluates them in-process (`krea_sweeps.batch`). Only
      for conditioning-only jobs (no images) and `intervention.<field>` axes; otherwise one job per config, as usual.
    """

    def __init__(self, max_batch_size: int | None = None, params: dict | None = None) -> None:
        # BasicSweeper.__init__ calls `super(BasicSweeper, self)`, and Hydra's plugin scan re-imports its module, so
        # that name can be a different class object than our base: set its state here instead.
        from hydra.plugins.sweeper import Sweeper

        Sweeper.__init__(self)
        self.overrides = None
        self.batch_index = 0
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.hydra_context = None
        self.config = None
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        """Hydra's setup, then the basic launcher (jobs in this process) composes through `ComposeOnce`."""
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher
        from hydra.types import HydraContext

        BasicSweeper.setup(self, hydra_context=hydra_context, task_function=task_function, config=config)
        if type(self.launcher).__name__ == BasicLauncher.__name__:  # (a plugin scan can re-import the class)
            self.launcher.hydra_context = HydraContext(config_loader=ComposeOnce(hydra_context.config_loader),
                                                       callbacks=hydra_context.callbacks)

    def validate_batch_is_legal(self, batch) -> None:
        """Already done by SweepGuard (see the class docstring)."""

    def split_arguments(self, overrides, max_batch_size):
        axes = batch_axes_of(self.config)
        if axes:
            try:
                overrides = self.batched(overrides, axes)
            except ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
        return BasicSweeper.split_arguments(overrides, max_batch_size)

    def batched(self, overrides: list, axes: list[str]) -> list:
        """`overrides` with the batch axes replaced by one `sweep.batch_grid` override, when batching applies."""
        by_key = {o.get_key_element().lstrip("+~"): o for o in overrides}
        for axis in axes:
            require(axis in by_key and by_key[axis].is_sweep_override(), "sweep.batch_axes",
                    f"{axis!r} is not a swept key of this sweep", "list keys given several values, e.g. "
                    "intervention.slot='range(0,12)' sweep.batch_axes=[intervention.slot]")
            require(axis.startswith("intervention.") and axis.count(".") == 1, "sweep.batch_axes",
                    f"{axis!r} cannot be batched: only fields of the `intervention` group (intervention.slot, "
                    "intervention.strength, …) change nothing but the text path", "remove it from sweep.batch_axes "
                    "(it then runs one job per value)")
        reason = self.why_not_batched(overrides, axes)
        if reason:
            log.info("sweep.batch_axes: one job per config (%s)", reason)
            return overrides
        grid = [[axis, list(by_key[axis].sweep_string_iterator())] for axis in axes]
        text = json.dumps(grid, separators=(",", ":"))
        require("'" not in text and "\\" not in text, "sweep.batch_axes", "a batched axis value contains a quote or "
                "a backslash", "run that axis unbatched")
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        grid_override = parser.parse_override(f"sweep.batch_grid='{text}'")
        # The batch job itself is planned at the axes' first values (each config is planned again inside it).
        kept = [o if o.get_key_element().lstrip("+~") not in axes
                else parser.parse_override(f"{o.get_key_element()}={_values(o)[0]}") for o in overrides]
        n = 1
        for _, values in grid:
            n *= len(values)
        log.info("sweep.batch_axes: %s evaluated inside each job (%d configs a job)", ", ".join(axes), n)
        return kept + [grid_override]

    def why_not_batched(self, overrides: list, axes: list[str]) -> str | None:
        """Why this sweep's jobs cannot be batched (they generate images), or None. Plans the first job, model-free."""
        from .plan import plan

        first = [o.input_line if not o.is_sweep_override() else f"{o.get_key_element()}={_values(o)[0]}"
                 for o in overrides]
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, first)
        job = plan(cfg)
        if job.generates:
            return f"its metrics need generated images: {', '.join(m.name for m in job.metrics)}"
        return None
