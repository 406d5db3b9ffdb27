"""P1/P4: what a sweep costs on top of its images — `run.py -m` against a naive loop that builds a fresh pipeline per job.

The naive loop is a strawman (it reloads every model part per job); the baselines a user would write instead — load
`Krea2Pipeline` once, call it per image — are in `bench/sweep_speed.py`. This script stays for the GPU (P1) and for
its breakdown of where a sweep's time goes.

    python bench/sweep_overhead.py                 # synthetic Krea 2 on CPU: P4 (`python run.py`, 12-job multirun)
    python bench/sweep_overhead.py --full          # full-size random-weight Krea 2 on the GPU, 20 jobs at 1024²: P1

(a) the sweep runs through `run.py -m` — on CPU as a real subprocess, so interpreter start, imports and Hydra count;
    with `--full` in this process, the full-size random parts served to the sweep through the model cache (the real
    weights are not reachable), so the wall excludes interpreter start-up;
(b) the naive loop: per job, a fresh pipeline (parts loaded from disk; with `--full`, re-made on the GPU), prompts
    encoded afresh, diffusers' eager pipeline, no W&B, no files.
The sweep's time is split from instrumentation of our own functions (timers wrapped around them, nothing replaced):
start-up (interpreter, imports, Hydra's first composition), load, encode, compute (Σ per-image generation + metrics,
from each job's result.json), W&B, file I/O, and Hydra's per-job remainder. P1: wall ≤ 1.05 × compute (a GPU target);
P4: `python run.py` ≤ 30 s, 12-job synthetic multirun ≤ 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, environment, median, write_json

CHILD_FLAG = "--child-instrumented"
PHASE_COMPUTE = ("baseline", "generate", "metrics")


# ------------------------------------------------------------------------------------------ instrumentation
class Clock:
    """Wall seconds spent inside our own functions, by category; wrappers only time, then call the original."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self.jobs: list[tuple[float, float]] = []
        self.t0 = time.perf_counter()

    def wrap(self, owner, name: str, category: str, job_span: bool = False):
        original = getattr(owner, name, None)
        if original is None:
            return

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.spent[category] = self.spent.get(category, 0.0) + end - t
                if job_span:
                    self.jobs.append((t - self.t0, end - self.t0))

        setattr(owner, name, timed)

    def install(self) -> None:
        import krea_sweeps.runner as runner
        import krea_sweeps.task as task
        import krea_sweeps.tracking as tracking

        self.wrap(runner, "run_job", "job", job_span=True)
        self.wrap(runner, "plan", "plan")
        self.wrap(runner, "execute", "execute")
        self.wrap(runner, "write_json_atomic", "io")
        self.wrap(task, "save_png", "io")
        self.wrap(task, "store_baseline", "io")
        for method in ("start", "log_summary", "log_table", "log_images", "finish"):
            self.wrap(tracking.Tracker, method, "wandb")

    def report(self) -> dict:
        return {"spent": self.spent, "jobs": self.jobs, "end": time.perf_counter() - self.t0}


def run_sweep_in_process(argv: list[str], cwd: Path) -> dict:
    """`python run.py ARGV` in this process (Hydra's basic launcher: jobs one after another), instrumented."""
    clock = Clock()
    clock.install()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [str(REPO / "run.py"), *argv]
    os.chdir(cwd)
    try:
        import krea_sweeps.process

        def exit_by_exception(code):  # run.py's fast exit (os._exit) would end this process before the report
            raise SystemExit(code)

        krea_sweeps.process.exit_now = exit_by_exception
        runpy.run_path(str(REPO / "run.py"), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return clock.report()


def import_heavy_modules() -> float:
    """Import what the first job would import lazily (torch, diffusers' pipeline, Qwen3-VL, W&B), so that cost is
    booked as start-up rather than inside the first job. The total is unchanged; only the attribution moves."""
    t = time.perf_counter()
    import torch  # noqa: F401
    import wandb  # noqa: F401
    from diffusers import Krea2Pipeline  # noqa: F401
    from transformers import Qwen3VLModel  # noqa: F401

    import krea_sweeps.task  # noqa: F401

    return time.perf_counter() - t


def child_main(out: str, argv: list[str]) -> None:
    imports = import_heavy_modules()
    report = run_sweep_in_process(argv, Path.cwd())
    report["imports"] = imports
    Path(out).write_text(json.dumps(report))


def run_subprocess(argv: list[str], cwd: Path, instrument: bool) -> dict:
    env = {**os.environ, "KREA_SWEEPS_PROGRESS": "0"}
    env.pop("WANDB_API_KEY", None)
    report = cwd / "clock.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, str(report), "--", *argv] if instrument \
        else [sys.executable, str(REPO / "run.py"), *argv]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(report.read_text()) if instrument else {}
    out["wall"] = wall
    return out


# ------------------------------------------------------------------------------------------------- analysis
def job_results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("outputs/*/*/result.json"))]


def breakdown(clock: dict, results: list[dict], wall: float) -> dict:
    """Split a sweep's wall time: start-up, load, encode, compute, W&B, I/O, Hydra/runner remainder."""
    phases = {}
    for r in results:
        for k, v in r.get("timings", {}).items():
            phases[k] = phases.get(k, 0.0) + v
    spent = clock.get("spent", {})
    jobs = clock.get("jobs", [])
    startup = (wall - clock["end"]) + (jobs[0][0] if jobs else 0.0)  # interpreter + imports + first composition
    compute = sum(phases.get(k, 0.0) for k in PHASE_COMPUTE)
    parts = {
        "startup": startup, "load": phases.get("load", 0.0), "encode": phases.get("encode", 0.0), "compute": compute,
        "wandb": spent.get("wandb", 0.0), "io": spent.get("io", 0.0), "plan": spent.get("plan", 0.0),
    }
    parts["hydra_and_runner"] = wall - sum(parts.values())
    n = max(len(results), 1)
    per_job = {k: parts[k] / n for k in ("hydra_and_runner", "plan", "wandb", "io")}
    per_job["total"] = sum(per_job.values())
    steady = wall - parts["startup"] - parts["load"] - parts["encode"]
    return {"wall": wall, "jobs": len(results), "parts": parts, "imports_in_startup": clock.get("imports"),
            "per_job_overhead": per_job,
            "p1_ratio_wall_over_compute": wall / compute if compute else None,
            "p1_ratio_steady_over_compute": steady / compute if compute else None,
            "images": sum(len(r.get("images", [])) for r in results)}


def print_breakdown(title: str, b: dict) -> None:
    p = b["parts"]
    print(f"{title}: wall {b['wall']:.1f}s for {b['jobs']} jobs ({b['images']} images written)")
    print("  " + "  ".join(f"{k} {v:.2f}s" for k, v in p.items()))
    pj = b["per_job_overhead"]
    if b.get("imports_in_startup") is not None:
        print(f"  (start-up = interpreter + {b['imports_in_startup']:.2f}s imports + Hydra's first composition)")
    print(f"  per-job overhead: Hydra+runner {pj['hydra_and_runner']:.3f}s + plan {pj['plan']:.3f}s + W&B "
          f"{pj['wandb']:.3f}s + I/O {pj['io']:.3f}s = {pj['total']:.3f}s; compute {p['compute'] / max(b['jobs'], 1):.3f}s/job")
    print(f"  P1 wall/compute = {b['p1_ratio_wall_over_compute']:.2f} (with start-up and loads); "
          f"steady-state (wall − start-up − load − encode)/compute = {b['p1_ratio_steady_over_compute']:.2f}")


# ---------------------------------------------------------------------------------------------- naive loop
def compose_job(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from krea_sweeps.plan import plan, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return plan(compose(config_name="config", overrides=overrides))


def naive_loop(job_overrides: list[list[str]], fresh_parts) -> dict:
    """Per job: fresh parts → pipeline → encode → diffusers' eager pipeline per image (+ the job's interventions)."""
    from dataclasses import replace

    import torch

    from krea_sweeps.interventions import InterventionContext, applied
    from krea_sweeps.models import TextPath
    from krea_sweeps.prompts import encode
    from krea_sweeps.sampler import generate

    spans = {"load": [], "encode": [], "compute": [], "wall": []}
    for overrides in job_overrides:
        job = compose_job(overrides)
        t0 = time.perf_counter()
        pipe, device = fresh_parts(job)
        t1 = time.perf_counter()
        layers = tuple(job.variant.select_layers)
        cond = encode(pipe.tokenizer, pipe.text_encoder, job.prompts, job.sampler.max_sequence_length, layers)
        neg = encode(pipe.tokenizer, pipe.text_encoder, [job.sampler.negative_prompt], job.sampler.max_sequence_length,
                     layers)
        t2 = time.perf_counter()
        eager = replace(job.sampler, fast=False)
        ctx = InterventionContext(text_path=TextPath.of(pipe.transformer), num_steps=eager.steps)
        with applied(job.interventions, ctx):
            for p in range(len(job.prompts)):
                for seed in job.seeds:
                    generate(pipe, eager, cond.index(p), neg, seed, denoising=ctx.denoising)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        for k, v in (("load", t1 - t0), ("encode", t2 - t1), ("compute", t3 - t2), ("wall", t3 - t0)):
            spans[k].append(v)
        del pipe
    out = {k: sum(v) for k, v in spans.items()}
    out["jobs"] = len(job_overrides)
    out["per_job_wall_median"] = median(spans["wall"])
    out["ratio_wall_over_compute"] = out["wall"] / out["compute"]
    return out


def synthetic_fresh_parts(job):
    from krea_sweeps.models import LoadedModel

    model = LoadedModel(job.variant)  # its own, empty model cache: every part loads afresh
    return model.pipeline(), model.device


# ------------------------------------------------------------------------------------------------------ main
def sweep_args(key: str, values: list[str], fixed: list[str]) -> list[str]:
    return ["-m", f"{key}={','.join(values)}", *fixed]


def main_cpu(args) -> dict:
    values = args.values or [str(i) for i in range(args.jobs)]
    fixed = ["wandb.mode=offline", *args.override]
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "single"
        single.mkdir()
        r = run_subprocess(fixed, single, instrument=True)
        b = breakdown(r, job_results(single), r["wall"])
        print_breakdown("`python run.py` (one job, W&B offline)", b)
        print(f"  P4: {b['wall']:.1f}s wall (target ≤ 30 s) → {'holds' if b['wall'] <= 30 else 'MISSES'}")
        report["single_run"] = b

        multi = Path(tmp) / "multi"
        multi.mkdir()
        r = run_subprocess(sweep_args(args.sweep_key, values, fixed), multi, instrument=True)
        b = breakdown(r, job_results(multi), r["wall"])
        print_breakdown(f"`python run.py -m {args.sweep_key}=…` ({len(values)} jobs)", b)
        print(f"  P4: {b['wall']:.1f}s wall (target ≤ 60 s for 12 jobs) → {'holds' if b['wall'] <= 60 else 'MISSES'}")
        report["multirun"] = b

    jobs = [[f"{args.sweep_key}={v}", *fixed] for v in values[: args.naive_jobs or len(values)]]
    t = time.perf_counter()
    naive = naive_loop(jobs, synthetic_fresh_parts)
    naive["wall_incl_planning"] = time.perf_counter() - t
    report["naive"] = naive
    print_naive(naive, len(values), report["multirun"]["wall"])
    return report


def print_naive(naive: dict, total_jobs: int, sweep_wall: float) -> None:
    scale = total_jobs / naive["jobs"]
    print(f"naive loop (fresh pipeline per job, eager, no W&B/files): {naive['wall']:.1f}s for {naive['jobs']} jobs — "
          f"load {naive['load']:.1f}s, encode {naive['encode']:.1f}s, compute {naive['compute']:.1f}s; "
          f"wall/compute {naive['ratio_wall_over_compute']:.2f}")
    est = naive["wall"] * scale
    note = "" if scale == 1 else f" (extrapolated from {naive['jobs']} jobs)"
    print(f"  naive for {total_jobs} jobs ≈ {est:.1f}s{note}; the sweep through run.py -m: {sweep_wall:.1f}s "
          f"→ {est / sweep_wall:.2f}× faster")
    naive["estimated_wall_all_jobs"] = est


def main_full(args) -> dict:
    """Full-size on the GPU, in this process: naive first (each job re-makes the parts), then the sweep."""
    import gc

    import torch

    from common import full_parts, pipeline_from
    from krea_sweeps import models

    values = args.values or [str(i) for i in range(args.jobs)]
    fixed = ["wandb.mode=offline", "sampler.height=1024", "sampler.width=1024",
             "prompts.prompts=[A red fox sitting in fresh snow.]", *args.override]
    device, dtype = torch.device("cuda"), torch.bfloat16

    def fresh(job):
        gc.collect()
        torch.cuda.empty_cache()
        return pipeline_from(full_parts(device, dtype), distilled=job.variant.is_distilled), device

    jobs = [[f"{args.sweep_key}={v}", *fixed] for v in values[: args.naive_jobs or 3]]
    naive = naive_loop(jobs, fresh)
    gc.collect()
    torch.cuda.empty_cache()

    # Serve the full-size random parts under the keys the sweep's variant will ask the model cache for.
    job = compose_job([f"{args.sweep_key}={values[0]}", *fixed])
    from krea_sweeps.session import current_session

    cache = current_session().models  # the session run.py's jobs will use in this process
    model = models.LoadedModel(job.variant, cache)
    parts = full_parts(device, dtype)
    src = model.sources
    cache.parts[model._key("tokenizer", src.tokenizer)] = parts["tokenizer"]
    cache.parts[model._key("text_encoder", src.text_encoder)] = parts["text_encoder"]
    cache.parts[model._key("transformer", src.transformer, src.lora)] = parts["transformer"]
    cache.parts[model._key("vae", src.vae)] = parts["vae"]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KREA_SWEEPS_PROGRESS"] = "0"
        t = time.perf_counter()
        clock = run_sweep_in_process(sweep_args(args.sweep_key, values, fixed), Path(tmp))
        wall = time.perf_counter() - t
        b = breakdown(clock, job_results(Path(tmp)), wall)
    b["parts_build_s"] = parts["build_s"]
    print_breakdown(f"run.py -m, in process, full-size parts pre-built ({parts['build_s']:.1f}s, not counted)", b)
    print(f"  P1: wall/compute {b['p1_ratio_wall_over_compute']:.3f} (target ≤ 1.05)")
    print_naive(naive, len(values), wall)
    return {"multirun": b, "naive": naive, "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}


def main():
    if len(sys.argv) > 2 and sys.argv[1] == CHILD_FLAG:
        return child_main(sys.argv[2], sys.argv[sys.argv.index("--") + 1 :])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size random-weight Krea 2 on the GPU (P1)")
    parser.add_argument("--jobs", type=int, default=None, help="sweep size (default 12 CPU, 20 full)")
    parser.add_argument("--sweep-key", default="seeds", help="the swept config key (default seeds: one seed per job)")
    parser.add_argument("--values", default=None, help="comma-separated values of --sweep-key (default 0..jobs-1)")
    parser.add_argument("--override", action="append", default=[], help="a fixed override for every job (repeat)")
    parser.add_argument("--naive-jobs", type=int, default=None, help="jobs the naive loop runs (default all CPU, 3 full)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/sweep_overhead[_full].json)")
    args = parser.parse_args()
    args.jobs = args.jobs or (20 if args.full else 12)
    args.values = args.values.split(",") if args.values else None

    import torch

    device = torch.device("cuda" if args.full else "cpu")
    if args.full and not torch.cuda.is_available():
        parser.error("--full builds a 17B-parameter model: it needs a CUDA device")
    env = environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | diffusers {env['diffusers']} | load avg {env['load_average']:.2f}")
    t = time.perf_counter()
    report = {"benchmark": "sweep_overhead", "full": args.full, "environment": env,
              "sweep": {"key": args.sweep_key, "values": args.values or list(range(args.jobs)), "override": args.override}}
    report.update(main_full(args) if args.full else main_cpu(args))
    report["wall_s"] = time.perf_counter() - t
    path = write_json(report, args.out, "sweep_overhead_full.json" if args.full else "sweep_overhead.json")
    print(f"\nwall {report['wall_s']:.1f}s; wrote {path}")


if __name__ == "__main__":
    main()
