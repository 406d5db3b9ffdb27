"""`collect` on a hand-made sweep folder with known numbers: rows, columns, values, statuses, figures, CLI, W&B."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from krea_sweeps.collect import collect

PROMPTS = ["a fox", "a lighthouse"]
SEEDS = [0, 1]


def write_job(sweep: Path, slot: int, status: str) -> Path:
    """A job folder as runner.py leaves it: .hydra/{config,overrides}.yaml, then result.json or failed.json."""
    from PIL import Image

    d = sweep / f"intervention.slot={slot}-{slot:08x}"
    (d / ".hydra").mkdir(parents=True)
    config = {"name": "known", "seeds": SEEDS, "objective": None, "model": {"name": "turbo", "path": None},
              "prompts": {"name": "two", "prompts": PROMPTS},
              "intervention": {"_target_": "krea_sweeps.interventions.Solo", "slot": slot, "site": "projector"},
              "wandb": {"mode": "disabled", "project": "krea_sweeps", "entity": None}}
    (d / ".hydra" / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (d / ".hydra" / "overrides.yaml").write_text(f"- +experiment=known\n- intervention.slot={slot}\n")
    job = {"name": d.name, "prompts": PROMPTS,
           "interventions": [{"kind": "solo", "slot": slot, "layer": 2 + 3 * slot, "site": "projector"}]}
    if status == "done":
        rows = [{"metric": "image_stats", "prompt_idx": p, "seed": s, "sharpness": 10 * slot + 2 * p + s}
                for p in range(2) for s in SEEDS]
        rows += [{"metric": "cond_shift", "prompt_idx": p, "cos": 1 - 0.1 * slot - 0.01 * p} for p in range(2)]
        rows += [{"metric": "slot_contribution", "slot": k, "drop": 0.1} for k in range(12)]  # not per item
        summary = {"image_stats/sharpness": 10 * slot + 1.5, "cond_shift/cos": 0.5, "projector/cosine": 1.0 - slot}
        record = {"status": "done", "job": job, "config": {**config, "job": job}, "summary": summary, "rows": rows}
        (d / "result.json").write_text(json.dumps(record))
        (d / "images").mkdir()
        for p in range(2):
            for s in SEEDS:
                Image.fromarray(np.full((8, 8, 3), 40 * slot + p, np.uint8)).save(d / "images" / f"p{p:02d}_s{s}.png")
        (d / "arrays").mkdir()
        for b in range(2):
            np.save(d / "arrays" / f"fusion_attention.block{b}.mean_map.npy", np.full((12, 12), 1 / 12))
    elif status == "failed":
        (d / "failed.json").write_text(json.dumps({"status": "failed", "job": job, "config": {**config, "job": job},
                                                   "error": "RuntimeError: boom"}))
    return d


@pytest.fixture
def sweep(tmp_path):
    sweep = tmp_path / "outputs" / "known"
    write_job(sweep, 0, "done")
    write_job(sweep, 1, "done")
    write_job(sweep, 2, "failed")
    write_job(sweep, 3, "incomplete")  # still running, or killed
    for extra in ("_baselines", "_encoded", ".submitit"):
        (sweep / extra).mkdir()
    return sweep


def test_rows_columns_and_values(sweep):
    df = collect(sweep, quiet=True)
    assert len(df) == 4 * len(PROMPTS) * len(SEEDS), "one row per job × prompt × seed, unfinished jobs included"
    assert df.groupby("status")["job"].nunique().to_dict() == {"done": 2, "failed": 1, "incomplete": 1}
    for col in ["sweep", "job", "status", "label", "prompt_idx", "prompt", "seed", "image", "error",
                "intervention.slot", "model.name", "prompts.prompts", "iv.kind", "iv.layer",
                "image_stats/sharpness", "cond_shift/cos", "projector/cosine"]:
        assert col in df.columns, col
    assert "slot_contribution/drop" not in df.columns, "rows that are not per prompt × seed stay in result.json"

    row = df[(df["intervention.slot"] == 1) & (df["prompt_idx"] == 1) & (df["seed"] == 0)].iloc[0]
    assert row["status"] == "done" and row["prompt"] == "a lighthouse" and row["label"] == "slot=1"
    assert row["image_stats/sharpness"] == 12          # the per-item value, not the job's mean
    assert row["cond_shift/cos"] == pytest.approx(0.89)  # per prompt, the same for every seed
    assert row["projector/cosine"] == 0.0               # job-level summary only
    assert row["iv.kind"] == "solo" and row["iv.layer"] == 5 and row["model.name"] == "turbo"
    assert row["image"].endswith("images/p01_s0.png")
    assert json.loads(row["prompts.prompts"]) == PROMPTS

    failed = df[df["status"] == "failed"]
    assert set(failed["error"]) == {"RuntimeError: boom"} and failed["image_stats/sharpness"].isna().all()
    incomplete = df[df["status"] == "incomplete"]
    assert set(incomplete["intervention.slot"]) == {3} and list(incomplete["prompt"][:2]) == PROMPTS[:1] * 2
    assert list(df.drop_duplicates("job")["intervention.slot"]) == [0, 1, 2, 3], "jobs in axis order"


def test_files_round_trip_and_figures(sweep):
    import pandas as pd

    df = collect(sweep, quiet=True)
    back = pd.read_parquet(sweep / "results.parquet")
    assert back.shape == df.shape and list(back.columns) == list(df.columns)
    assert pd.read_csv(sweep / "results.csv").shape == df.shape
    figures = {p.name for p in (sweep / "figures").glob("*.png")}
    assert figures == {"metric_vs_intervention.slot.png", "per_slot.png", "attention_grid.png", "contact_sheet.png"}


def test_cli_prints_a_summary_and_rejects_a_job_folder(sweep, monkeypatch):
    import contextlib
    import io

    from krea_sweeps.collect import main

    def run(*args):  # krea-collect's entry point, in this process
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())

    monkeypatch.chdir(REPO)
    ok = run(sweep, "--no-figures")
    assert ok.returncode == 0, ok.stderr
    assert "4 jobs — 2 done, 1 failed, 1 incomplete; 16 rows" in ok.stdout
    assert "swept: intervention.slot (4 values)" in ok.stdout and "failed: " in ok.stdout
    bad = run(next(sweep.glob("intervention.slot=0*")))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_wandb_summary_run_in_the_sweeps_group(sweep, monkeypatch):
    from wandb_offline import offline_runs, read_run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    collect(sweep, quiet=True, wandb_mode="offline")
    wandb.teardown()  # in-process, the offline .wandb file is flushed when the service stops (a CLI run: at exit)
    (run_dir,) = offline_runs(sweep)
    run = read_run(run_dir)
    assert run["run"]["group"] == "known" and run["run"]["job_type"] == "collect"
    # the sweep's config (keys all jobs agree on) and tags, so the collect run filters like its jobs
    assert run["config"]["name"] == "known" and run["config"]["model"]["name"] == "turbo"
    assert run["config"]["swept"] == ["intervention.slot"] and "slot" not in run["config"]["intervention"]
    assert {"collect", "known", "variant:turbo"} <= set(run["run"]["tags"])
    assert run["summary"]["jobs/done"] == 2 and run["summary"]["jobs/failed"] == 1
    assert any(k.startswith("results") for k in run["history_keys"]) and run["exit_code"] == 0


def test_slot_labels_come_from_the_model_definition(sweep, monkeypatch):
    """collect labels each slot's bar with the encoder layer the model variant reads into that slot (the package's
    own layer list, not a private copy that could drift from it)."""
    from krea_sweeps import collect as collect_module
    from krea_sweeps.models import ModelVariant

    ticks, real_save = {}, collect_module.save_figure

    def spy(fig, path, *args, **kw):  # the real save, after reading what the figure says
        ticks[Path(path).name] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        return real_save(fig, path, *args, **kw)

    monkeypatch.setattr(collect_module, "save_figure", spy)
    collect(sweep, quiet=True)
    layers = ModelVariant(name="turbo", base="turbo").select_layers
    assert ticks["per_slot.png"] == [f"L{layers[s]}" for s in (0, 1, 2)] == ["L2", "L5", "L8"]  # slots 0, 1, 2


def test_headline_metrics_are_plotted_first_whatever_their_name():
    """`rebalance_dial` is about sharpness and cond shift: those lead its figure even past the metric limit."""
    import pandas as pd

    from krea_sweeps.collect import interesting_metrics

    per_job = pd.DataFrame({"job": ["a", "b"], "a/x": [1, 2], "a/y": [1, 3], "b/x": [0, 1],
                            "z/deep/key": [5, 6], "flat/k": [1, 1]})
    assert interesting_metrics(per_job, limit=2) == ["a/x", "a/y"]
    assert interesting_metrics(per_job, limit=2, first=["z/deep/key", "missing/k"]) == ["z/deep/key", "a/x"]
    assert "flat/k" not in interesting_metrics(per_job, limit=10)
