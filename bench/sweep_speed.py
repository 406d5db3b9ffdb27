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
   attention + cond-shift metrics): configs/s over the wall, and steady-state (first to last result). Target ≥ 5/s.
3. The same metrics batched (`sweep.batch_axes`), 12 slots × S strengths: configs/s through the CLI. Target ≥ 200/s.
4. `python run.py` cold (fresh output folder: nothing cached but the synthetic checkpoints) and warm (again, same
   folder). Targets: warm ≤ 5.5 s, cold ≤ 9 s (quiet machine).
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


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def env() -> dict:
    out = {**os.environ, "KREA_SWEEPS_PROGRESS": "0", "PYTHONPATH": str(RUN_PY.parent)}
    out.pop("WANDB_API_KEY", None)
    return out


CPU: dict[str, float] = {}  # CPU seconds (user + sys) of each timed command's process tree, by wall-clock label


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], cwd: Path, label: str | None = None) -> float:
    """Wall seconds of `cmd`; its CPU seconds go to CPU[label]. On a loaded machine wall time stretches with the
    load while CPU time barely moves: at 1 thread, CPU seconds approximate a quiet machine's wall."""
    c, t = cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if label:
        CPU[label] = cpu_seconds() - c
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def run_py(args: list[str], cwd: Path, label: str | None = None) -> float:
    return run([sys.executable, str(RUN_PY), *args], cwd, label)


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

    model = LoadedModel(ModelVariant(**spec["variant"]))
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
    return {"variant": {"name": v.name, "is_distilled": v.is_distilled, "steps": v.steps, "guidance": v.guidance},
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


def conditioning(tmp: Path, strengths: int, batched_strengths: int) -> dict:
    values = ",".join(f"{s / max(strengths - 1, 1):.3f}" for s in range(strengths))
    grid = ["-m", "intervention=solo", "intervention.slot=range(0,12)", f"intervention.strength={values}",
            COND_METRICS, "wandb.mode=offline", "name=cond"]
    one = tmp / "one"
    one.mkdir()
    wall = run_py(grid, one, "one")
    n = 12 * strengths
    out = {"one_job_per_config": {"configs": n, "wall": wall, "configs_per_s": n / wall, "cpu": CPU["one"],
                                  "configs_per_cpu_s": n / CPU["one"],
                                  "steady_configs_per_s": steady_rate(one / "outputs" / "cond")}}
    if batched_strengths <= 0:  # e.g. an older checkout without sweep.batch_axes
        return out
    values = ",".join(f"{s / max(batched_strengths - 1, 1):.4f}" for s in range(batched_strengths))
    grid = ["-m", "intervention=solo", "intervention.slot=range(0,12)", f"intervention.strength={values}",
            COND_METRICS, "wandb.mode=offline", "name=cond", "sweep.batch_axes=[intervention.slot,intervention.strength]"]
    batched = tmp / "batched"
    batched.mkdir()
    wall = run_py(grid, batched, "batched")
    n = 12 * batched_strengths
    (batch_json,) = (batched / "outputs" / "cond").glob("_batch*/batch.json")
    inside = json.loads(batch_json.read_text())["timings"]["total"]
    done = len(list((batched / "outputs" / "cond").glob("*/result.json")))
    out["batched"] = {"configs": n, "results": done, "wall": wall, "configs_per_s": n / wall,
                      "in_job_configs_per_s": n / inside, "cpu": CPU["batched"], "configs_per_cpu_s": n / CPU["batched"]}
    return out


def single_runs(tmp: Path) -> dict:
    folder = tmp / "single"
    folder.mkdir()
    cold = run_py(["wandb.mode=offline"], folder, "cold")
    warm = run_py(["wandb.mode=offline"], folder, "warm")
    return {"cold": cold, "warm": warm, "cpu_cold": CPU["cold"], "cpu_warm": CPU["warm"]}


def verdict(ok: bool) -> str:
    return "holds" if ok else "MISSES"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=12, help="generation sweep: jobs (one seed each)")
    parser.add_argument("--strengths", type=int, default=2, help="conditioning sweep, one job per config: strengths")
    parser.add_argument("--batched-strengths", type=int, default=100, help="batched sweep: strengths (× 12 slots)")
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
        report["generation"] = g = generation(tmp / "gen", args.jobs)
        report["conditioning"] = c = conditioning(tmp / "cond", args.strengths, args.batched_strengths)
        report["single"] = s = single_runs(tmp / "single")
    report["load_average_end"] = load_average()

    print(f"\n1. generation sweep, {args.jobs} jobs, {g['images']} images, W&B offline:")
    print(f"   (a) plain script, Krea2Pipeline loaded once, pipe(prompt=…) per image: {g['plain_prompt']:.2f} s")
    print(f"   (b) plain script fed pre-encoded embeddings:                          {g['plain_embeds']:.2f} s")
    print(f"   run.py -m:                                                            {g['run_py_m']:.2f} s")
    print(f"   run.py -m / (a) = {g['ratio_vs_plain_prompt']:.2f} (target ≤ 1.10: "
          f"{verdict(g['ratio_vs_plain_prompt'] <= 1.10)}); run.py -m / (b) = {g['ratio_vs_plain_embeds']:.2f}; "
          f"images: max pixel difference vs (a) {g['max_pixel_diff_vs_plain_prompt']} of 255")
    print(f"   CPU seconds: (a) {g['cpu']['plain_prompt']:.1f}, (b) {g['cpu']['plain_embeds']:.1f}, run.py -m "
          f"{g['cpu']['run_py_m']:.1f} → {g['cpu_ratio_vs_plain_prompt']:.2f}× (a)")
    one, b = c["one_job_per_config"], c.get("batched")
    steady = one["steady_configs_per_s"]
    print(f"\n2. conditioning-only sweep, one job per config ({one['configs']} configs): {one['wall']:.2f} s = "
          f"{one['configs_per_s']:.2f} configs/s with start-up; steady {steady or float('nan'):.2f} configs/s "
          f"(target ≥ 5: {verdict((steady or 0) >= 5)}; baseline: 0.81 before this change); "
          f"{one['configs_per_cpu_s']:.2f} configs per CPU second")
    if b:
        print(f"3. batched ({b['configs']} configs, {b['results']} result.json): {b['wall']:.2f} s = "
          f"{b['configs_per_s']:.0f} configs/s through the CLI with start-up (target ≥ 200: "
          f"{verdict(b['configs_per_s'] >= 200)}); {b['in_job_configs_per_s']:.0f} configs/s inside the job; "
          f"{b['configs_per_s'] / one['configs_per_s']:.0f}× one job per config; "
          f"{b['configs_per_cpu_s']:.0f} configs per CPU second")
    print(f"\n4. python run.py: cold {s['cold']:.2f} s (target ≤ 9: {verdict(s['cold'] <= 9)}), "
          f"warm {s['warm']:.2f} s (target ≤ 5.5: {verdict(s['warm'] <= 5.5)}); CPU seconds cold "
          f"{s['cpu_cold']:.2f}, warm {s['cpu_warm']:.2f}")
    print(f"\nload average at end {report['load_average_end']} (targets are for a quiet machine: load < 1)")
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
