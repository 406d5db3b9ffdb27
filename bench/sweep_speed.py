"""The speed targets of issue 14, each against what a user would write instead, measured in one run (CPU, synthetic).

    python bench/sweep_speed.py                  # all of it (~2–4 min on a quiet 2-core machine)
    python bench/sweep_speed.py --jobs 6 --strengths 20   # smaller

Every command runs as a fresh subprocess (interpreter start, imports, loads count), W&B offline, torch at 1 thread
for us and for the baselines alike (`torch_threads=auto` on the synthetic model; the baselines set it the same).

1. Generation sweep `run.py -m seeds=0..N-1` (prompts × 1 seed per job) against
   (a) a plain script: loads `Krea2Pipeline` once, calls `pipe(prompt=…)` per image, saves PNGs — what a user writes;
   (b) the same script fed pre-encoded embeddings (`pipe(prompt_embeds=…)`), encoding each prompt once.
   Target: run.py -m ≤ 1.10 × (a); images compared (max abs diff).
2. Conditioning-only sweep, one job per config (`intervention=solo`, 12 slots × 2 strengths, projector + fusion
   attention + cond-shift metrics): configs/s over the wall, steady-state (first to last result), and configs per
   CPU second beyond start-up (the sweep at two sizes: start-up cancels; robust to load). Target ≥ 5/s.
3. The same metrics batched (`sweep.batch_axes`), 12 slots × S strengths (default S = 500: 6,000 configs, the
   issue's "thousands of configs"; the half grid runs too): configs/s through the CLI, start-up included (a fresh
   output folder: the prompts are encoded, so tokenizer and text encoder load), inside the job, and per CPU second.
   Target ≥ 200/s through the CLI. The batch's own phase timings (batch.json) are printed.
4. `python run.py` (one job) for `model/synthetic_weights=random` and `=toy`: cold (a fresh KREA_SWEEPS_CACHE and
   output folder: checkpoints, tokenizer and encodings built first) and warm (again, same folder), against (a) drawing
   the same images; each `--repeat` times (median, min–max). Targets: warm ≤ 5.5 s, cold ≤ 9 s (quiet machine).

P1–P3 are GPU targets (full-size Krea 2): `bench/pipeline_speed.py --full` (P2, P3) and `bench/sweep_overhead.py
--full` (P1); this script says "pending" for them.

Every figure is printed with its baseline and as a ratio; the load average is printed at start, during and end (on a
loaded machine wall seconds stretch with the load: CPU seconds of each command's process tree are printed beside).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_PY = REPO / "run.py"
COND_METRICS = "metrics=[projector,fusion_attention,cond_shift]"
ISSUE_ONE_JOB = 0.81  # configs/s of this one-job-per-config sweep when issue 14 was filed (quiet 2-core machine)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def env(extra: dict | None = None) -> dict:
    out = {**os.environ, "KREA_SWEEPS_PROGRESS": "0", "PYTHONPATH": str(RUN_PY.parent), **(extra or {})}
    out.pop("WANDB_API_KEY", None)
    return out


CPU: dict[str, float] = {}  # CPU seconds (user + sys) of each timed command's process tree, by wall-clock label


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], cwd: Path, label: str | None = None, extra_env: dict | None = None) -> float:
    """Wall seconds of `cmd`; its CPU seconds go to CPU[label]. On a loaded machine wall time stretches with the
    load while CPU time barely moves: at 1 thread, CPU seconds approximate a quiet machine's wall."""
    c, t = cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(extra_env), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if label:
        CPU[label] = cpu_seconds() - c
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def run_py(args: list[str], cwd: Path, label: str | None = None, extra_env: dict | None = None) -> float:
    return run([sys.executable, str(RUN_PY), *args], cwd, label, extra_env)


# ------------------------------------------------------------------------------------------------- baselines
PLAIN_SCRIPT = textwrap.dedent('''
    """What a user writes instead of a sweep: load Krea2Pipeline once, one call per image, save the PNGs."""
    import json, sys, time
    from pathlib import Path
    spec = json.loads(sys.argv[1])
    import torch
    torch.set_num_threads(1)
    from krea_sweeps.models import LoadedModel, ModelVariant
    from PIL import Image
    import numpy as np

    from krea_sweeps.synthetic import RandomWeights
    from krea_sweeps.toy.checkpoints import ToyWeights
    weights = {"random": RandomWeights, "toy": ToyWeights}[spec.get("synthetic_weights", "random")]()
    model = LoadedModel(ModelVariant(**spec["variant"], synthetic_weights=weights))
    pipe = model.pipeline()                      # Krea2Pipeline over the synthetic checkpoints, loaded once
    out = Path(spec["out"]); out.mkdir(parents=True, exist_ok=True)
    common = dict(height=spec["height"], width=spec["width"], num_inference_steps=spec["steps"],
                  guidance_scale=spec["guidance"], max_sequence_length=spec["max_sequence_length"], output_type="np")
    embeds = {}
    if spec["embeds"]:                            # (b): each prompt encoded once, then fed as prompt_embeds
        for p in spec["prompts"]:
            embeds[p] = pipe.get_text_hidden_states([p], spec["max_sequence_length"])
    for seed in spec["seeds"]:
        for i, p in enumerate(spec["prompts"]):
            g = torch.Generator().manual_seed(seed)
            if spec["embeds"]:
                e, m = embeds[p]
                image = pipe(prompt_embeds=e, prompt_embeds_mask=m, generator=g, **common).images[0]
            else:
                image = pipe(prompt=p, generator=g, **common).images[0]
            Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(out / f"p{i:02d}_s{seed}.png")
''')


def job_spec(overrides: list[str]) -> dict:
    """The sampler settings and prompts a default job runs with, so the baselines draw the same images."""
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir

    from krea_sweeps.plan import plan, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        job = plan(compose(config_name="config", overrides=overrides))
    v = job.variant
    return {"variant": {"name": v.name, "base": v.base, "lora": v.lora, "is_distilled": v.is_distilled,
                        "steps": v.steps, "guidance": v.guidance},
            "synthetic_weights": v.synthetic_weights.kind,
            "prompts": job.prompts, "height": job.sampler.height, "width": job.sampler.width,
            "steps": job.sampler.steps, "guidance": job.sampler.guidance,
            "max_sequence_length": job.sampler.max_sequence_length}


def max_image_diff(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    diffs = []
    for f in sorted(a.glob("*.png")):
        x = np.asarray(Image.open(f), dtype=np.int16)
        y = np.asarray(Image.open(b / f.name), dtype=np.int16)
        diffs.append(int(np.abs(x - y).max()))
    return max(diffs) if diffs else float("nan")


# ------------------------------------------------------------------------------------------------------ parts
def generation(tmp: Path, jobs: int) -> dict:
    seeds = list(range(jobs))
    spec = job_spec([])
    script = tmp / "plain.py"
    script.write_text(PLAIN_SCRIPT)
    out = {}
    for name, embeds in (("plain_prompt", False), ("plain_embeds", True)):
        folder = tmp / name
        folder.mkdir()
        args = json.dumps({**spec, "seeds": seeds, "embeds": embeds, "out": str(folder / "images")})
        out[name] = run([sys.executable, str(script), args], folder, name)
    sweep = tmp / "sweep"
    sweep.mkdir()
    out["run_py_m"] = run_py(["-m", f"seeds={','.join(map(str, seeds))}", "wandb.mode=offline"], sweep, "run_py_m")
    images = sweep / "images"
    images.mkdir()
    for d in (sweep / "outputs" / "default").iterdir():
        for f in (d / "images").glob("*.png") if (d / "images").is_dir() else []:
            (images / f.name).write_bytes(f.read_bytes())
    out["images"] = len(list(images.glob("*.png")))
    out["max_pixel_diff_vs_plain_prompt"] = max_image_diff(tmp / "plain_prompt" / "images", images)
    out["ratio_vs_plain_prompt"] = out["run_py_m"] / out["plain_prompt"]
    out["ratio_vs_plain_embeds"] = out["run_py_m"] / out["plain_embeds"]
    out["cpu"] = {k: CPU[k] for k in ("plain_prompt", "plain_embeds", "run_py_m")}
    out["cpu_ratio_vs_plain_prompt"] = CPU["run_py_m"] / CPU["plain_prompt"]
    return out


def steady_rate(sweep: Path) -> float | None:
    """Configs per second from the first result.json to the last (start-up and loads excluded)."""
    times = sorted(p.stat().st_mtime for p in sweep.glob("*/result.json"))
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None


def solo_grid(strengths: int, batched: bool) -> list[str]:
    values = ",".join(f"{s / max(strengths - 1, 1):.4f}" for s in range(strengths))
    grid = ["-m", "intervention=solo", "intervention.slot=range(0,12)", f"intervention.strength={values}",
            COND_METRICS, "wandb.mode=offline", "name=cond"]
    return grid + (["sweep.batch_axes=[intervention.slot,intervention.strength]"] if batched else [])


def marginal(cpu_small: float, cpu_large: float, n_small: int, n_large: int) -> float | None:
    """Configs per CPU second beyond start-up: the same sweep at two sizes, start-up cancelling out. CPU seconds at 1
    thread barely move with the machine's load, so this approximates a quiet machine's steady rate."""
    extra = cpu_large - cpu_small
    return (n_large - n_small) / extra if extra > 0 else None


def conditioning(tmp: Path, strengths: int, batched_strengths: int) -> dict:
    """The solo grid (12 slots × strengths) one job per config, and batched; each also at half size (marginal cost)."""
    out = {}
    for name, n_strengths, batched in (("one_job_per_config", strengths, False), ("batched", batched_strengths, True)):
        if n_strengths <= 0:  # e.g. an older checkout without sweep.batch_axes
            continue
        half = max(n_strengths // 2, 1)
        small, large = tmp / f"{name}_half", tmp / name
        small.mkdir()
        large.mkdir()
        CPU[f"{name}_half_wall"] = run_py(solo_grid(half, batched), small, f"{name}_half")
        wall = run_py(solo_grid(n_strengths, batched), large, name)
        n, n_half = 12 * n_strengths, 12 * half
        sweep = large / "outputs" / "cond"
        r = {"configs": n, "wall": wall, "configs_per_s": n / wall, "cpu": CPU[name], "configs_per_cpu_s": n / CPU[name],
             "results": len(list(sweep.glob("*/result.json"))),
             "marginal_configs_per_cpu_s": marginal(CPU[f"{name}_half"], CPU[name], n_half, n)}
        if batched:
            (batch_json,) = sweep.glob("_batch*/batch.json")
            r["phases"] = json.loads(batch_json.read_text())["timings"]
            r["in_job_configs_per_s"] = n / r["phases"]["total"]
            r["half_configs_per_s"] = n_half / CPU.get(f"{name}_half_wall", float("nan"))
        else:
            r["steady_configs_per_s"] = steady_rate(sweep)
        out[name] = r
    return out


WEIGHTS = ("random", "toy")  # model/synthetic_weights: both must start fast (the toy is written into the cache too)


def single_runs(tmp: Path, repeat: int) -> dict:
    """`python run.py` (one job, W&B offline) against (a) drawing the same images in a plain script: warm (caches
    built, the same output folder again) and cold (a fresh KREA_SWEEPS_CACHE: synthetic checkpoints and tokenizer
    written first, as on a new machine), for each synthetic model."""
    out = {}
    for weights in WEIGHTS:
        folder = tmp / weights
        folder.mkdir()
        args = ["wandb.mode=offline", f"model/synthetic_weights={weights}"]
        spec = job_spec(args[1:])
        script = folder / "plain.py"
        script.write_text(PLAIN_SCRIPT)
        plain = json.dumps({**spec, "seeds": [0], "embeds": False, "out": str(folder / "plain_images")})
        r = {"cold_runs": [], "warm_runs": [], "cpu_cold_runs": [], "cpu_warm_runs": []}
        for i in range(repeat):
            cold = folder / f"cold{i}"  # a fresh cache and output folder each time
            cold.mkdir()
            r["cold_runs"].append(run_py(args, cold, f"cold_{weights}", {"KREA_SWEEPS_CACHE": str(cold / "cache")}))
            r["cpu_cold_runs"].append(CPU[f"cold_{weights}"])
        run_py(args, folder)  # the output folder's encode cache and the OS file cache, not timed
        for _ in range(repeat):
            r["warm_runs"].append(run_py(args, folder, f"warm_{weights}"))
            r["cpu_warm_runs"].append(CPU[f"warm_{weights}"])
        r["plain_warm"] = run([sys.executable, str(script), plain], folder, f"plain_{weights}")
        for key in ("cold", "warm", "cpu_cold", "cpu_warm"):
            r[key] = sorted(r[f"{key}_runs"])[len(r[f"{key}_runs"]) // 2]  # the median
        r["cpu_plain"] = CPU[f"plain_{weights}"]
        out[weights] = r
    return out


def verdict(ok: bool) -> str:
    return "holds" if ok else "MISSES"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=12, help="generation sweep: jobs (one seed each)")
    parser.add_argument("--strengths", type=int, default=2, help="conditioning sweep, one job per config: strengths")
    parser.add_argument("--batched-strengths", type=int, default=500, help="batched sweep: strengths (× 12 slots)")
    parser.add_argument("--repeat", type=int, default=3, help="python run.py: cold and warm runs each (median)")
    parser.add_argument("--parts", default="gen,cond,single", help="which parts to run (comma-separated)")
    parser.add_argument("--out", default=str(REPO / "bench" / "sweep_speed.json"))
    parser.add_argument("--run-py", default=str(REPO / "run.py"), help="the run.py under test (e.g. an older "
                        "checkout's, for a before/after in the same conditions; its folder goes first on PYTHONPATH)")
    args = parser.parse_args()
    global RUN_PY
    RUN_PY = Path(args.run_py).resolve()

    report = {"machine": machine(), "load_average_start": load_average()}
    print(f"machine: {report['machine']} | load average (1/5/15 min) at start {report['load_average_start']}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "warmup").mkdir()
        run_py(["wandb.mode=offline"], tmp / "warmup")  # synthetic checkpoints and OS file cache, not timed
        for part in ("gen", "cond", "single"):
            (tmp / part).mkdir()
        parts = set(args.parts.split(","))
        g = report["generation"] = generation(tmp / "gen", args.jobs) if "gen" in parts else None
        c = report["conditioning"] = (conditioning(tmp / "cond", args.strengths, args.batched_strengths)
                                      if "cond" in parts else None)
        report["load_average_during"] = load_average()
        s = report["single"] = single_runs(tmp / "single", args.repeat) if "single" in parts else {}
    report["load_average_end"] = load_average()
    print_report(report, args)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")


def print_report(report: dict, args) -> None:
    g, c, s = report["generation"], report["conditioning"], report["single"]
    if g:
        print(f"\n1. generation sweep, {args.jobs} jobs, {g['images']} images, W&B offline. Baselines: (a) a plain script "
              "loading Krea2Pipeline once and calling pipe(prompt=…) per image; (b) the same fed pre-encoded embeddings")
        print(f"   wall: (a) {g['plain_prompt']:.2f} s, (b) {g['plain_embeds']:.2f} s, run.py -m {g['run_py_m']:.2f} s → "
              f"run.py -m = {g['ratio_vs_plain_prompt']:.2f}× (a) (target ≤ 1.10: {verdict(g['ratio_vs_plain_prompt'] <= 1.10)}),"
              f" {g['ratio_vs_plain_embeds']:.2f}× (b); images: max pixel difference vs (a) "
              f"{g['max_pixel_diff_vs_plain_prompt']} of 255")
        print(f"   CPU seconds: (a) {g['cpu']['plain_prompt']:.1f}, (b) {g['cpu']['plain_embeds']:.1f}, run.py -m "
              f"{g['cpu']['run_py_m']:.1f} → {g['cpu_ratio_vs_plain_prompt']:.2f}× (a)")
    if c:
        one, b = c["one_job_per_config"], c.get("batched")
        steady, marg = one["steady_configs_per_s"] or float("nan"), one["marginal_configs_per_cpu_s"] or float("nan")
        print(f"\n2. conditioning-only sweep through run.py -m, one job per config ({one['configs']} configs, W&B offline). "
              f"Baseline: the issue's {ISSUE_ONE_JOB} configs/s (the same sweep before issue 14, quiet machine)")
        print(f"   {one['wall']:.2f} s wall = {one['configs_per_s']:.2f} configs/s with start-up; steady (first to last "
              f"result) {steady:.2f} configs/s = {steady / ISSUE_ONE_JOB:.1f}× the baseline; beyond start-up "
              f"{marg:.2f} configs per CPU second = {marg / ISSUE_ONE_JOB:.1f}× the baseline (target ≥ 5 a second: "
              f"{verdict(steady >= 5)} on this wall, {verdict(marg >= 5)} per CPU second); "
              f"{one['configs_per_cpu_s']:.2f} configs per CPU second with start-up")
        if b:
            bm = b["marginal_configs_per_cpu_s"] or float("nan")
            print(f"3. batched (sweep.batch_axes, {b['configs']} configs, {b['results']} result.json, one W&B run). "
                  "Baseline: one job per config (2.)")
            print(f"   {b['wall']:.2f} s wall = {b['configs_per_s']:.0f} configs/s through the CLI with start-up (target "
                  f"≥ 200: {verdict(b['configs_per_s'] >= 200)}) = {b['configs_per_s'] / one['configs_per_s']:.0f}× (2.); "
                  f"the half grid ({b['configs'] // 2} configs) {b['half_configs_per_s']:.0f} configs/s; "
                  f"{b['in_job_configs_per_s']:.0f} configs/s inside the job; {b['configs_per_cpu_s']:.0f} configs per "
                  f"CPU second with start-up ({b['cpu']:.1f} CPU s), {bm:.0f} beyond it = {bm / marg:.0f}× (2.)")
            print("   inside the batch job (s, summed over configs): " + ", ".join(
                f"{k} {v:.2f}" for k, v in b["phases"].items()))
    for weights, r in s.items():
        print(f"\n4. python run.py, model/synthetic_weights={weights}, W&B offline. Baseline (a): the plain script "
              "drawing the same images (warm caches)")
        span = {k: f"{min(r[k + '_runs']):.2f}–{max(r[k + '_runs']):.2f}" for k in ("warm", "cold")}
        print(f"   warm {r['warm']:.2f} s median ({span['warm']}; target ≤ 5.5: {verdict(r['warm'] <= 5.5)}) = "
              f"{r['warm'] / r['plain_warm']:.2f}× (a) ({r['plain_warm']:.2f} s); cold, fresh KREA_SWEEPS_CACHE "
              f"{r['cold']:.2f} s median ({span['cold']}; target ≤ 9: {verdict(r['cold'] <= 9)}) = "
              f"{r['cold'] / r['plain_warm']:.2f}× (a)")
        print(f"   CPU seconds (median): warm {r['cpu_warm']:.2f}, cold {r['cpu_cold']:.2f} (the cold run's tokenizer "
              f"conversion runs in a child process, counted here), (a) {r['cpu_plain']:.2f}")
    print("\nP1–P3 (GPU, full-size Krea 2): pending here — run bench/sweep_overhead.py --full (P1) and "
          "bench/pipeline_speed.py --full (P2, P3) on a GPU")
    print(f"\nload average (1/5/15 min): start {report['load_average_start']}, after the sweeps "
          f"{report['load_average_during']}, end {report['load_average_end']} (targets are for a quiet machine: "
          f"load < 1 on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
