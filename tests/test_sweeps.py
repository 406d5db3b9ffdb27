"""Sweeps at scale: experiment presets, launchers, Optuna, resume and failure handling — through run.py's own entry
point (preflight, Hydra's launchers and sweepers, the runner, the exit code) run in this process, which saves each run
a new interpreter's imports; SIGTERM is sent to a real process. Each preset runs with reduced axes (1 prompt,
1 seed, 2 steps, short text) and W&B disabled unless W&B is the point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_in_process
from conftest import run_cli as run_process

from krea_sweeps.errors import ConfigError

PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
FAST = ["wandb.mode=disabled", "sampler.steps=2", "sampler.max_sequence_length=32"]
ONE_PROMPT = ["prompts.prompts=[A red fox sitting in fresh snow.]", "seeds=[0]"]
TESTS = str(REPO / "tests")

# Reduced axes per preset: (extra overrides, expected number of jobs).
REDUCED = {
    "projector_readout": ([], 2),
    "l20_hub": (["model=turbo", *ONE_PROMPT], 1),
    "solo_sweep": (["intervention.slot=6,11", *ONE_PROMPT], 2),
    "leave_one_out": (["intervention.slot=6,11", *ONE_PROMPT], 2),
    "rebalance_dial": (["intervention.strength=0,2", *ONE_PROMPT], 2),
    "tap_vs_projector": ([*ONE_PROMPT], 4),
    "hub_knockout": ([*ONE_PROMPT], 2),
    "concept_steer": (["concept=smile", "intervention.strength=0,4", *ONE_PROMPT], 2),
    "turbo_lora_dial": (["model.lora_strength=0,1", "prompts.prompts=[A red fox sitting in fresh snow.]"], 2),
    "think_vs_plain": ([], 2),
    "word_maps": (["interventions=[],[{_target_:krea_sweeps.interventions.Solo,layer:20}]", *ONE_PROMPT], 2),
    "diffusion_lens": (["intervention.layer=0,20", *ONE_PROMPT], 2),
    "causal_tracing": (["intervention.slots=6,11", "prompts.prompts=[a photo of a serious woman in a garden]"], 2),
    "attribution": (["prompts.prompts=[a photo of a serious woman in a garden]"], 2),
    "concept_maps": ([*ONE_PROMPT], 2),
    "toy_causal_tracing": (["intervention.slots=7,10",
                            "prompts.prompts=[a large blue circle in the centre on a white background]"], 2),
}

# The figure `collect` draws for a preset's headline (methods beyond the card).
HEADLINE_FIGURES = {"word_maps": "word_map_grid.png", "concept_maps": "concept_map_grid.png",
                    "diffusion_lens": "lens_strip.png", "causal_tracing": "restoration_heatmap.png",
                    "attribution": "attribution_heatmap.png"}


def env(**extra) -> dict:
    # the checkout under test first: job processes a launcher starts (submitit) import krea_sweeps from here, not
    # from wherever the package happens to be installed
    return {"PYTHONPATH": os.pathsep.join([TESTS, str(REPO)]), "OMP_NUM_THREADS": "1", **extra}


def run_cli(args: list[str], cwd: Path, env: dict | None = None, session=None) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in `cwd`, in this process (conftest.run_in_process)."""
    return run_in_process(args, cwd, env=env, session=session)


def run_many(commands: list[list[str]], cwd: Path, session=None) -> list[subprocess.CompletedProcess]:
    """Several runs, one after another (each with a fresh session unless `session` is given)."""
    return [run_cli(args, cwd, env=env(), session=session) for args in commands]


def job_dir(sweep: Path, override: str) -> Path:
    """The job folder whose overrides include `override` (folder names are truncated + hashed)."""
    (found,) = [d for d in sweep.iterdir() if (d / ".hydra" / "overrides.yaml").exists()
                and override in (d / ".hydra" / "overrides.yaml").read_text().splitlines()]
    return found


def results(sweep: Path) -> dict[str, dict]:
    return {f.parent.name: json.loads(f.read_text()) for f in sorted(sweep.glob("*/result.json"))}


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------- compose, validate
def test_every_preset_runs_end_to_end_below():
    assert set(REDUCED) == set(PRESETS)  # (the README's table of presets: test_readme.py)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_every_axis_value_validates(name):
    """Compose + plan (model-free) each value of each sweep axis, as `SweepGuard` does before a sweep starts."""
    from hydra import compose, initialize_config_dir

    from krea_sweeps.sweeps import check_sweep

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", [f"+experiment={name}"], return_hydra_config=True)
        assert cfg.name == name, "each preset names its sweep folder"
        assert cfg.hydra.sweeper.params, "each preset has its own sweep axes"
        check_sweep(cfg)


def test_gains_optuna_composes_with_the_12_gains():
    from hydra import compose, initialize_config_dir

    from krea_sweeps.plan import plan
    from krea_sweeps.sweeps import check_sweep

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", ["+hparams_search=gains_optuna", "search.g7=2.5"], return_hydra_config=True)
        check_sweep(cfg)
        assert len(cfg.hydra.sweeper.params) == 12 and "Optuna" in cfg.hydra.sweeper._target_
        gains = plan(cfg).interventions[0].gains
        assert gains == [1.0] * 7 + [2.5] + [1.0] * 4


def test_each_optuna_study_has_its_own_folder_and_its_database_stays_under_outputs(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from krea_sweeps.errors import ConfigError
    from krea_sweeps.sweeps import check_study_storage

    def sweep_dir(*overrides):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", ["+hparams_search=gains_optuna", *overrides], return_hydra_config=True)
            return cfg.hydra.sweep.dir, cfg.hydra.sweeper.study_name, cfg

    folder, study, _ = sweep_dir()
    assert folder == f"outputs/{study}" == "outputs/gains_optuna-default-max-image_stats.sharpness"
    folder, _, _ = sweep_dir("+experiment=rebalance_dial")  # the preset names the study (and keeps its prompts)
    assert folder == "outputs/gains_optuna-rebalance_dial-max-image_stats.sharpness"
    folder, _, _ = sweep_dir("objective=cond_shift/fused/rel_l2", "hydra.sweeper.direction=minimize")
    assert folder == "outputs/gains_optuna-default-min-cond_shift.fused.rel_l2"
    monkeypatch.chdir(tmp_path)
    _, _, cfg = sweep_dir("hydra.sweeper.storage=sqlite:///optuna.db")
    with pytest.raises(ConfigError, match="hydra.sweeper.storage"):
        check_study_storage(cfg)
    _, _, cfg = sweep_dir("hydra.sweeper.storage=sqlite:///outputs/studies/optuna.db")
    check_study_storage(cfg)
    assert (tmp_path / "outputs" / "studies").is_dir()
    assert "*.db" in (REPO / ".gitignore").read_text().split()


def test_launcher_presets_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        slurm = compose("config", ["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
        local = compose("config", ["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1 and slurm.tasks_per_node == 1
    assert slurm.max_num_timeout > 0 and isinstance(slurm.timeout_min, int)
    assert local._target_.endswith("LocalLauncher")


def test_local_launcher_gpu_visibility_is_as_documented(tmp_path):
    """submitit's local executor gives every job the same first `gpus_per_node` GPUs (the preset's 0: none), so the
    docs may not offer hydra/launcher=local for several GPUs; this pins the behaviour they describe."""
    import submitit
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        preset = compose("config", ["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    seen = {}
    for gpus in (preset.gpus_per_node, 1):
        executor = submitit.AutoExecutor(folder=tmp_path / str(gpus), cluster="local")
        executor.update_parameters(gpus_per_node=gpus, timeout_min=1)
        jobs = executor.map_array(lambda _: os.environ.get("CUDA_VISIBLE_DEVICES"), [0, 1])  # in the job process
        seen[gpus] = [job.result() for job in jobs]
    assert seen == {0: ["", ""], 1: ["0", "0"]}  # no GPU at all / GPU 0 for every job, whatever the parent had
    docs = (REPO / "docs" / "sweeps.md").read_text()
    local = docs[docs.index("- `hydra/launcher=local`"):docs.index("- `hydra/launcher=slurm`")]
    assert "several GPUs" not in local.split("does not spread jobs over several GPUs")[0]
    assert "hydra.launcher.gpus_per_node=1" in local and "CUDA_VISIBLE_DEVICES" in local


def test_slurm_settings_come_from_the_environment(monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("SBATCH_PARTITION", "gpu-long")
    monkeypatch.setenv("SBATCH_ACCOUNT", "interp")
    monkeypatch.setenv("KREA_SWEEPS_TIMEOUT_MIN", "90")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        launcher = compose("config", ["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
        assert (launcher.partition, launcher.account, launcher.timeout_min) == ("gpu-long", "interp", 90)


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_one_line_before_any_job(tmp_path):
    (tmp_path / "bad").mkdir()
    procs = run_many([
        ["-m", "+experiment=solo_sweeep"],
        ["-m", "+experiment=solo_sweep", "intervention.slott=0,1"],
        ["-m", "+experiment=solo_sweep", "intervention.slot=11,12"],
        ["-m", "+hparams_search=gains_optuna", "objective=tap_norms/mean"],
        ["-m", "+experiment=projector_readout", "hydra/launcher=slurm"],
        ["-m", "+hparams_search=gains_optuna", "objective=image_stats/sharpnes"],
        ["objective=image_stats/sharpnes", *FAST],  # one job, no sweep: the runner's check, same line
        ["intervention=solo", "intervention.slott=1"],  # a misspelt key in a single run: not Hydra's 5 lines
        ["-m", "intervention=solo", "intervention.slot=0,1", "intervention.foo=3"],  # … nor in a sweep
    ], tmp_path / "bad")
    assert_one_line_error(procs[0], "`experiment`", "solo_sweeep", "solo_sweep")
    assert_one_line_error(procs[1], "`intervention.slott`")
    assert_one_line_error(procs[2], "`intervention.slot`", "12")
    assert_one_line_error(procs[3], "`objective`", "tap_norms/mean")
    assert_one_line_error(procs[4], "`hydra/launcher`", "sbatch")
    assert_one_line_error(procs[7], "`intervention.slott`", "no such key")
    assert_one_line_error(procs[8], "`intervention.foo`", "no such key")
    for proc in procs[5:7]:  # a misspelt stat of a selected metric: caught from its declared keys, before any job
        assert_one_line_error(proc, "`objective`", "'image_stats/sharpnes' is not a key of `image_stats`",
                              "did you mean 'image_stats/sharpness'?")
    assert not list((tmp_path / "bad").glob("outputs/*/*/.hydra")), "no job started"
    assert not list((tmp_path / "bad").glob("outputs/**/*.json")), "no job ran"


# ------------------------------------------------------------------------------------------- presets end to end
@pytest.fixture(scope="module")
def preset_runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("presets")
    from krea_sweeps.session import Session

    commands = [["-m", f"+experiment={name}", *REDUCED[name][0], *FAST] for name in PRESETS]
    t0 = time.perf_counter()
    procs = dict(zip(PRESETS, run_many(commands, cwd, session=Session())))  # one session: models load once
    print(f"\n{len(PRESETS)} presets end to end in {time.perf_counter() - t0:.1f}s")
    return cwd, procs


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_end_to_end_and_collects(preset_runs, name):
    from krea_sweeps.collect import collect

    cwd, procs = preset_runs
    proc = procs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = cwd / "outputs" / name
    records = results(sweep)
    assert len(records) == REDUCED[name][1]
    assert all(r["status"] == "done" and r["summary"] for r in records.values())
    df = collect(sweep, quiet=True)
    assert set(df["status"]) == {"done"} and df["job"].nunique() == len(records)
    assert (sweep / "results.parquet").exists() and (sweep / "results.csv").exists()
    if name in HEADLINE_FIGURES:
        assert (sweep / "figures" / HEADLINE_FIGURES[name]).exists()
    for job, record in records.items():  # the table holds the jobs' own numbers
        per_item = {f"{r['metric']}/{k}" for r in record["rows"] if "prompt_idx" in r for k in r}
        rows = df[df["job"] == job]
        for key, value in record["summary"].items():
            if isinstance(value, float) and key not in per_item:
                assert rows[key].tolist() == pytest.approx([value] * len(rows), nan_ok=True), key


def test_preset_figures(preset_runs):
    cwd, _ = preset_runs
    figures = {name: {p.name for p in (cwd / "outputs" / name / "figures").glob("*.png")} for name in PRESETS}
    assert {"per_slot.png", "contact_sheet.png", "metric_vs_intervention.slot.png"} <= figures["solo_sweep"]
    assert "per_slot.png" in figures["leave_one_out"]
    assert "attention_grid.png" in figures["l20_hub"] and "attention_grid.png" in figures["hub_knockout"]
    assert "metric_vs_intervention.strength.png" in figures["rebalance_dial"]


# ------------------------------------------------------------------------------------------ resume and failures
def fault_args(marker: Path, seed: int = 1) -> list[str]:
    return ["+metrics.fault._target_=faults.FailOnSeed", f"+metrics.fault.seed={seed}",
            f"+metrics.fault.marker={marker}", *FAST, *ONE_PROMPT[:1]]


def test_failed_job_is_recorded_others_finish_and_rerun_runs_only_it(tmp_path):
    marker = tmp_path / "bug"
    marker.touch()
    args = ["-m", "seeds=0,1,2", *fault_args(marker)]
    first = run_cli(args, tmp_path, env=env())
    assert first.returncode == 1, first.stderr[-3000:]
    sweep = tmp_path / "outputs" / "default"
    failed = sorted(sweep.glob("*/failed.json"))
    assert [f.parent for f in failed] == [job_dir(sweep, "- seeds=1")]
    assert "injected failure" in json.loads(failed[0].read_text())["error"]
    assert len(results(sweep)) == 2, "the jobs after the failing one still ran"
    assert "1 job(s) failed" in first.stderr and failed[0].parent.name in first.stderr

    marker.unlink()  # "fix the bug" and rerun the same command
    second = run_cli(args, tmp_path, env=env())
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert log.count("skip ") == 2 and log.count("done ") == 1
    assert f"done {failed[0].parent.name}" in log
    assert len(results(sweep)) == 3 and not list(sweep.glob("*/failed.json"))

    forced = run_cli(["-m", "seeds=0,1", "force=true", *fault_args(marker)], tmp_path, env=env())
    assert forced.returncode == 0 and "skip " not in forced.stdout + forced.stderr


def test_a_damaged_result_is_rerun_and_the_others_skipped(tmp_path):
    """A result.json that is not JSON (edited by hand, a disk fault) is no result: the rerun runs that job again
    instead of stopping the sweep with a traceback, and skips the others."""
    args = ["-m", "seeds=0,1", *FAST, "prompts.prompts=[a red fox]"]
    first = run_cli(args, tmp_path, env=env())
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "outputs" / "default"
    damaged = job_dir(sweep, "- seeds=1") / "result.json"
    damaged.write_text(damaged.read_text()[:40])
    second = run_cli(args, tmp_path, env=env())
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert log.count("skip ") == 1 and f"done {damaged.parent.name}" in log and "is not valid JSON" in log
    assert json.loads(damaged.read_text())["status"] == "done"


def test_fail_fast_stops_at_the_first_failure(tmp_path):
    """A real process: a failed job's exit code (1) survives run.py's fast exit."""
    marker = tmp_path / "bug"
    marker.touch()
    proc = run_process(["-m", "seeds=0,1,2", "fail_fast=true", *fault_args(marker)], tmp_path, env=env())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "fail_fast: stopped at the first failed job" in proc.stderr
    sweep = tmp_path / "outputs" / "default"
    assert len(results(sweep)) == 1 and len(list(sweep.glob("*/failed.json"))) == 1
    assert len([d for d in sweep.iterdir() if (d / ".hydra").exists()]) == 2, "nothing ran after the failure"


def test_sigterm_stops_the_job_cleanly_and_finishes_its_wandb_run(tmp_path):
    from wandb_offline import offline_runs, read_run

    started = tmp_path / "started"
    args = ["-m", "seeds=0,1", "+metrics.sleep._target_=faults.SleepOnSeed", "+metrics.sleep.seed=1",
            f"+metrics.sleep.started={started}", "wandb.mode=offline", *FAST[1:], *ONE_PROMPT[:1]]
    full_env = {**os.environ, "KREA_SWEEPS_PROGRESS": "0", **env()}
    full_env.pop("WANDB_API_KEY", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=tmp_path, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "interrupted (SIGTERM)" in stderr
    sweep = tmp_path / "outputs" / "default"
    (done_dir,) = [p.parent for p in sweep.glob("*/result.json")]
    killed = job_dir(sweep, "- seeds=1")
    assert done_dir == job_dir(sweep, "- seeds=0") and not (killed / "result.json").exists()
    assert not (killed / "failed.json").exists(), "an interruption is not a failure"
    (run_dir,) = offline_runs(killed)
    assert read_run(run_dir)["exit_code"] is not None, "the W&B run was finished"


# ---------------------------------------------------------------------------------------------------- launchers
def test_submitit_local_gives_the_same_results_and_reports_failures(tmp_path):
    marker = tmp_path / "bug"
    marker.touch()
    common = ["-m", "seeds=0,1,2", *fault_args(marker, seed=2)]
    basic, local = run_many([[*common, "name=basic"], [*common, "name=local", "hydra/launcher=local"]], tmp_path)
    for proc in (basic, local):
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "1 job(s) failed" in proc.stderr and "injected failure for seed 2" in proc.stderr
    a, b = results(tmp_path / "outputs" / "basic"), results(tmp_path / "outputs" / "local")
    assert sorted(a) == sorted(b) and len(a) == 2, "same job folders whichever launcher ran them"
    for job in a:
        assert a[job]["summary"] == b[job]["summary"] and a[job]["rows"] == b[job]["rows"]
        assert a[job]["job"]["name"] == b[job]["job"]["name"]


# ---------------------------------------------------------------------------------------------------------- Optuna
def test_optuna_three_trials_return_and_record_the_objective(tmp_path):
    import yaml

    args = ["-m", "+hparams_search=gains_optuna", "hydra.sweeper.n_trials=3", *FAST, *ONE_PROMPT]
    proc = run_cli(args, tmp_path, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "gains_optuna-default-max-image_stats.sharpness"  # one folder per study
    records = results(sweep)
    assert len(records) == 3
    values = []
    for record in records.values():
        value = record["summary"]["image_stats/sharpness"]
        assert record["objective"] == {"key": "image_stats/sharpness", "value": value}
        assert record["summary"]["objective"] == value
        values.append(value)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(values)), "Optuna received what the jobs returned"

    again = run_cli(args, tmp_path, env=env())  # seeded sampler: the same trials, all already done
    assert again.returncode == 0 and (again.stdout + again.stderr).count("skip ") == 3


def test_every_objective_in_readme_and_conf_is_a_real_key():
    """Each `<metric>/<stat>` the docs and presets name (objective examples, `headline` keys) is a key that metric reports."""
    import re

    from hydra import compose, initialize_config_dir

    from krea_sweeps.plan import plan
    from krea_sweeps.sweeps import check_objective

    metrics = sorted(f.stem for f in (REPO / "conf" / "metrics").glob("*.yaml"))
    pattern = re.compile(rf"\b(?:{'|'.join(metrics)})/[A-Za-z0-9_/]+")
    texts = [(REPO / "README.md").read_text()] + [f.read_text() for f in sorted((REPO / "conf").rglob("*.yaml"))]
    # report panels are checked against their own preset's metric configs (test_report.py); Media keys are images
    texts = ["\n".join(ln for ln in t.splitlines() if "krea_sweeps.report." not in ln) for t in texts]
    keys = sorted({k.rstrip("/") for text in texts for k in pattern.findall(text)})
    assert "image_stats/sharpness" in keys and "cond_shift/fused/rel_l2" in keys
    # What a metric needs besides itself: a patch (tracing), a non-stock job (keys compared against stock).
    context = {"restoration": ["intervention=patch", "prompts=tracing_pairs"],
               "attribution": ["intervention=patch", "prompts=tracing_pairs"],
               "word_maps": ["intervention=solo", "intervention.slot=6"]}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for key in keys:
            metric = key.split("/")[0]
            check_objective(plan(compose("config", [f"metrics=[{metric}]", f"objective={key}", "seeds=[0,1]",
                                                    *context.get(metric, [])])))


def test_misspelt_objective_stat_is_caught_from_the_declared_keys():
    from hydra import compose, initialize_config_dir

    from krea_sweeps.plan import plan
    from krea_sweeps.sweeps import check_objective

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        job = plan(compose("config", ["metrics=[cond_shift,fusion_attention]", "objective=cond_shift/rel_l2"]))
        fine = plan(compose("config", ["metrics=[fusion_attention]", "objective=fusion_attention/block1/hub_ratio"]))
    with pytest.raises(ConfigError, match="is not a key of `cond_shift`.*did you mean 'cond_shift/"):
        check_objective(job)
    check_objective(fine)  # a block key: `block<i>` stands for any block index


def test_objective_check_names_the_metric():
    from hydra import compose, initialize_config_dir

    from krea_sweeps.plan import plan
    from krea_sweeps.sweeps import check_objective

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        job = plan(compose("config", ["objective=cond_shift/rel_l2"]))
    with pytest.raises(ConfigError, match="no selected metric provides it"):
        check_objective(job)
