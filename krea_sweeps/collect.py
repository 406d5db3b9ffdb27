"""Collect a sweep folder into one table and a few figures — finished, failed or still running.

    python -m krea_sweeps.collect outputs/<sweep> [--wandb offline] [--report]   (also: krea-collect outputs/<sweep>)

Hydra leaves one folder per job; the questions are asked across jobs ("how does sharpness move with the rebalance
strength?"). So every job's `result.json` (and `failed.json`, and folders with neither: still running or killed)
becomes rows of one table, one row per job × prompt × seed:

- `sweep`, `job`, `status` (done | failed | incomplete), `error`, `prompt_idx`, `prompt`, `seed`, `image`;
- every config key, flattened with dots (`intervention.slot`, `model.name`; lists as JSON text), and the job's
  command-line choices of config groups (`model`, `intervention`, …) as columns of their own;
- `iv.*`: the applied intervention as the job described it (`iv.kind`, `iv.slot`, `iv.layer`, …) and `label`;
- metrics as `<metric>/<stat>`: the per-item value where the metric reported one for that prompt × seed, else the
  job's summary value (the same for all its rows).

It writes `results.parquet`, `results.csv` and `figures/` into the sweep folder, prints a compact summary, and can
log all of it as one W&B "collect" run in the sweep's group (the group its job runs already share).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .interventions.sites import NUM_SLOTS
from .metrics.figures import label, plot_against
from .synthetic import SELECT_LAYERS

log = logging.getLogger("krea_sweeps.collect")

ID_COLUMNS = ["sweep", "job", "status", "label", "prompt_idx", "prompt", "seed", "image", "error"]
SLOT_KINDS = ("solo", "leave_one_out")


# ------------------------------------------------------------------------------------------------- reading jobs
@dataclass
class JobRecord:
    """One job folder as found on disk."""

    name: str
    dir: Path
    status: str  # done | failed | incomplete
    config: dict
    record: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict:
        return self.record.get("summary", {}) if self.status == "done" else {}

    @property
    def interventions(self) -> list[dict]:
        return (self.record.get("job") or {}).get("interventions") or []

    @property
    def prompts(self) -> list[str]:
        job = self.record.get("job") or {}
        if job.get("prompts"):
            return list(job["prompts"])
        prompts = (self.config.get("prompts") or {}).get("prompts")
        return [str(p) for p in prompts] if isinstance(prompts, list) else []

    @property
    def seeds(self) -> list[int]:
        seeds = self.config.get("seeds", [0])
        seeds = seeds if isinstance(seeds, list) else [seeds]
        try:
            return [int(s) for s in seeds]
        except (TypeError, ValueError):
            return [0]


def is_job_dir(path: Path) -> bool:
    """A folder a job wrote (its .hydra/ comes first, result.json or failed.json last)."""
    return (path.is_dir() and not path.name.startswith(("_", "."))
            and any((path / m).exists() for m in ("result.json", "failed.json", ".hydra/config.yaml")))


def read_jobs(sweep_dir: Path) -> list[JobRecord]:
    jobs = []
    for d in sorted(p for p in Path(sweep_dir).iterdir() if is_job_dir(p)):
        overrides = _read_overrides(d)
        if (d / "result.json").exists():
            record = _read_json(d / "result.json")
            if record is not None:
                jobs.append(JobRecord(d.name, d, "done", _job_config(record), record, overrides))
                continue
        if (d / "failed.json").exists():
            record = _read_json(d / "failed.json") or {}
            config = record.get("config") or _hydra_config(d)
            jobs.append(JobRecord(d.name, d, "failed", _strip_job(config), record, overrides))
        elif (d / ".hydra" / "config.yaml").exists():
            jobs.append(JobRecord(d.name, d, "incomplete", _hydra_config(d), {}, overrides))
    return jobs


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("unreadable %s (skipped)", path)
        return None


def _job_config(record: dict) -> dict:
    return _strip_job(record.get("config") or {})


def _strip_job(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("job", "hydra")}


def _hydra_config(d: Path) -> dict:
    from omegaconf import OmegaConf

    from .plan import register_resolvers

    file = d / ".hydra" / "config.yaml"
    if not file.exists():
        return {}
    register_resolvers()
    cfg = OmegaConf.load(file)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an env var or resolver this machine lacks: keep the raw text
        return OmegaConf.to_container(cfg, resolve=False)


def _read_overrides(d: Path) -> list[str]:
    from omegaconf import OmegaConf

    file = d / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(file)] if file.exists() else []


# ------------------------------------------------------------------------------------------------ the one table
def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config → {"a.b.c": scalar}; lists become JSON text (one cell, one parquet type)."""
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(node, (list, tuple)):
        out[prefix] = json.dumps(node, default=str)
    else:
        out[prefix] = node
    return out


def parse_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def swept_keys(jobs: list[JobRecord]) -> list[str]:
    """Override keys whose value differs between jobs, in first-seen order (the sweep's axes)."""
    values: dict[str, set] = {}
    for job in jobs:
        for key, value in (parse_override(o) for o in job.overrides):
            values.setdefault(key, set()).add(value)
    present = [k for k in values if all(any(parse_override(o)[0] == k for o in j.overrides) for j in jobs)]
    varying = [k for k in values if len(values[k]) > 1 or (k not in present and len(jobs) > 1)]
    return [k for k in varying if not k.startswith(("hydra", "wandb"))]


def intervention_columns(job: JobRecord) -> dict[str, Any]:
    described = job.interventions
    if not described:
        return {}
    first = described[0]
    out = {f"iv.{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in first.items()}
    out["iv.kind"] = "+".join(str(d.get("kind")) for d in described)
    return out


def job_label(job: JobRecord, axes: list[str]) -> str:
    parts = []
    for key, value in (parse_override(o) for o in job.overrides):
        if key in axes:
            parts.append(f"{key.split('.')[-1]}={value}")
    return " ".join(parts) or "stock"


def _scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, np.integer, np.floating))


def job_rows(job: JobRecord, sweep: str, axes: list[str]) -> list[dict]:
    base = {"sweep": sweep, "job": job.name, "status": job.status, "label": job_label(job, axes)}
    if job.status == "failed":
        base["error"] = job.record.get("error")
    base.update(flatten(job.config))
    for key, value in (parse_override(o) for o in job.overrides):
        base.setdefault(key, _number(value))  # group choices (`model=raw`) are not config keys
    base.update(intervention_columns(job))
    base.update({k: v for k, v in job.summary.items() if _scalar(v)})
    per_item: dict[tuple, dict] = {}
    for r in job.record.get("rows", []) if job.status == "done" else []:
        if "prompt_idx" not in r:
            continue
        metric = r.get("metric", "metric")
        values = {f"{metric}/{k}": v for k, v in r.items() if k not in ("metric", "prompt_idx", "seed", "prompt")
                  and _scalar(v)}
        seeds = [r["seed"]] if r.get("seed") is not None else job.seeds
        for s in seeds:
            per_item.setdefault((int(r["prompt_idx"]), int(s)), {}).update(values)
    prompts = job.prompts
    items = [(p, s) for p in range(len(prompts)) for s in job.seeds] or [(None, None)]
    rows = []
    for p, s in items:
        row = dict(base, prompt_idx=p, prompt=prompts[p] if p is not None else None, seed=s)
        image = job.dir / "images" / f"p{p:02d}_s{s}.png" if p is not None else None
        row["image"] = str(image.relative_to(job.dir.parent)) if image is not None and image.exists() else None
        row.update(per_item.get((p, s), {}))
        rows.append(row)
    return rows


def _sortable(value: str | None) -> tuple:
    """Sort jobs by their axis values, numbers numerically (slot 2 before slot 11), missing last."""
    if value is None:
        return (2, 0, "")
    number = _number(value)
    return (0, number, "") if isinstance(number, (int, float)) else (1, 0, str(value))


def _number(value: str):
    try:
        f = float(value)
        return int(f) if f.is_integer() and "." not in value else f
    except ValueError:
        return value


def build_table(sweep_dir: Path):
    """(DataFrame, jobs, swept keys) for a sweep folder."""
    import pandas as pd

    jobs = read_jobs(sweep_dir)
    axes = swept_keys(jobs)
    jobs.sort(key=lambda j: tuple(_sortable(dict(map(parse_override, j.overrides)).get(a)) for a in axes))
    rows = [row for job in jobs for row in job_rows(job, Path(sweep_dir).name, axes)]
    df = pd.DataFrame(rows)
    for col in ID_COLUMNS:
        if col not in df.columns:
            df[col] = None
    metric_cols = sorted(c for c in df.columns if "/" in c)
    other = sorted(c for c in df.columns if c not in ID_COLUMNS and c not in metric_cols)
    df = df[ID_COLUMNS + other + metric_cols] if len(df) else df
    return parquet_safe(df), jobs, axes


def parquet_safe(df):
    """Parquet needs one type per column: a column mixing types (e.g. a config key that is a number in one job and
    a string in another) is stored as text."""
    for col in df.columns:
        values = [v for v in df[col].tolist() if v is not None and not (isinstance(v, float) and math.isnan(v))]
        kinds = {type(v) for v in values}
        if kinds <= {int, float} or kinds <= {bool} or kinds <= {str} or not kinds:
            continue
        if kinds <= {int, float, np.integer, np.floating}:
            continue
        df[col] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in df[col]]
    return df


def metric_columns(df) -> list[str]:
    cols = []
    for c in df.columns:
        if "/" not in c:
            continue
        values = df[c].dropna()
        if len(values) and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                               for v in values):
            cols.append(c)
    return cols


def job_table(df, axes: list[str]):
    """One row per job: swept keys, status and the mean of every numeric metric over its prompt × seed rows."""
    metrics = metric_columns(df)
    keys = ["job", "label", "status"] + [a for a in axes if a in df.columns]
    agg = {c: "first" for c in keys if c != "job"}
    agg.update({m: "mean" for m in metrics})
    return df.groupby("job", sort=False).agg(agg).reset_index()


# ------------------------------------------------------------------------------------------------------ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def interesting_metrics(per_job, limit: int = 6, first: list[str] | None = None) -> list[str]:
    """Metrics that vary between jobs (a flat line says nothing): the headline ones (objective, the experiment's
    `headline`, `--metrics`) first and always, then the rest up to `limit`."""
    first = [m for m in (first or []) if m in per_job.columns]
    metrics = [m for m in metric_columns(per_job) if per_job[m].nunique(dropna=True) > 1 and m not in first]
    metrics.sort(key=lambda m: (m.count("/"), m))
    return first + metrics[: max(0, limit - len(first))]


def fig_metric_vs_key(df, per_job, axes: list[str], out: Path, headline: list[str]) -> list[Path]:
    plt = _plt()
    written = []
    metrics = interesting_metrics(per_job, first=headline)
    for key in [a for a in axes if a in per_job.columns]:
        if not metrics:
            break
        hue = next((a for a in axes if a != key and a in per_job.columns), None)
        fig, panels = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
        groups = list(per_job.groupby(hue, sort=False)) if hue else [(None, per_job)]
        for ax, metric in zip(panels[0], metrics):
            for i, (name, group) in enumerate(groups):
                xs, order = _axis_values(group[key])
                ys = group[metric].to_numpy()[order]
                offset = (i - (len(groups) - 1) / 2) * 0.08
                plot_against(ax, xs, ys, label_text=None if hue is None else f"{name}", offset=offset)
            label(ax, key, metric.rsplit("/", 1)[-1], metric)
            if hue:
                ax.legend(title=hue, fontsize=6, title_fontsize=6)
        written.append(save_figure(fig, out / f"metric_vs_{_safe(key)}.png"))
    return written


def _axis_values(series):
    values = series.tolist()
    if _numeric(values):
        order = np.argsort(np.asarray(values, dtype=float), kind="stable")
        return [values[i] for i in order], order
    return values, np.arange(len(values))


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)


def fig_per_slot(per_job, df, out: Path) -> Path | None:
    """Solo / leave-one-out: one bar per slot (labelled with its layer) for each metric that varies."""
    if "iv.kind" not in df.columns or "iv.slot" not in df.columns:
        return None
    slot_jobs = df[df["iv.kind"].isin(SLOT_KINDS) & df["iv.slot"].notna()].groupby("job").first()
    if slot_jobs.empty:
        return None
    plt = _plt()
    table = per_job.set_index("job").loc[slot_jobs.index]
    metrics = interesting_metrics(table.reset_index(), limit=4) or metric_columns(table.reset_index())[:1]
    if not metrics:
        return None
    kinds = sorted(slot_jobs["iv.kind"].unique())
    fig, panels = plt.subplots(len(kinds), len(metrics), figsize=(4 * len(metrics), 2.8 * len(kinds)), squeeze=False)
    for r, kind in enumerate(kinds):
        jobs = slot_jobs[slot_jobs["iv.kind"] == kind]
        slots = jobs["iv.slot"].astype(int)
        order = np.argsort(slots.to_numpy())
        names, slots = jobs.index.to_numpy()[order], slots.to_numpy()[order]
        labels = [f"L{SELECT_LAYERS[s]}" if 0 <= s < NUM_SLOTS else str(s) for s in slots]
        for c, metric in enumerate(metrics):
            ax = panels[r][c]
            ax.bar(range(len(slots)), table.loc[names, metric].to_numpy(dtype=float), color="#4477aa")
            ax.set_xticks(range(len(slots)), labels, fontsize=7)
            label(ax, "slot (its encoder layer)", metric.rsplit("/", 1)[-1], f"{kind}: {metric}")
    return save_figure(fig, out / "per_slot.png")


def attention_maps(job: JobRecord) -> np.ndarray | None:
    """The job's mean cross-layer attention maps [blocks, 12 query layers, 12 key layers], if it computed them."""
    arrays = job.dir / "arrays"
    if not arrays.is_dir():
        return None
    maps = [np.load(f) for f in sorted(arrays.glob("fusion_attention.block*.mean_map.npy"))]
    maps = [m for m in maps if m.shape == (NUM_SLOTS, NUM_SLOTS)]
    return np.stack(maps) if maps else None


def fig_attention_grid(jobs: list[JobRecord], labels: dict[str, str], out: Path) -> Path | None:
    """Rows = jobs, columns = layerwise blocks: the mean attention map (query layer × key layer)."""
    maps = [(job, m) for job in jobs if job.status == "done" for m in [attention_maps(job)] if m is not None]
    if not maps:
        return None
    plt = _plt()
    blocks = max(m.shape[0] for _, m in maps)
    fig, panels = plt.subplots(len(maps), blocks, figsize=(3 * blocks, 2.8 * len(maps)), squeeze=False)
    ticks = [f"L{l}" for l in SELECT_LAYERS]
    vmax = max(max(float(m.max()) for _, m in maps), 1e-9)  # one colour scale for all panels, so they compare
    image = None
    for r, (job, m) in enumerate(maps):
        for b in range(blocks):
            ax = panels[r][b]
            if b >= m.shape[0]:
                ax.axis("off")
                continue
            image = ax.imshow(m[b], vmin=0, vmax=vmax, cmap="viridis")
            ax.set_xticks(range(NUM_SLOTS), ticks, rotation=90, fontsize=5)
            ax.set_yticks(range(NUM_SLOTS), ticks, fontsize=5)
            label(ax, "key layer", "query layer", f"{labels.get(job.name, job.name)[:40]} · block {b}", fontsize=7)
    fig.colorbar(image, ax=panels, shrink=0.8, label="mean attention probability")
    return save_figure(fig, out / "attention_grid.png", tight=False)


def stock_images(job: JobRecord, sweep_dir: Path) -> dict[int, np.ndarray]:
    """The sweep's cached stock images (`_baselines/`) for this job's prompts at its first seed, if any were made.
    Found by the keys the job recorded: a result is read as data, nothing in it is instantiated or called."""
    from .files import load_verified

    keys = job.record.get("baseline_keys") or {}
    out = {}
    for p in range(len(job.prompts)):
        key = keys.get(f"p{p:02d}_s{job.seeds[0]}") if job.seeds else None
        if not isinstance(key, str) or not key.isalnum():  # a key is a hex digest, never a path
            continue
        tensors = load_verified(sweep_dir / "_baselines" / f"{key}.safetensors")
        if tensors is not None and "image" in tensors:
            out[p] = tensors["image"].numpy()
    return out


def fig_contact_sheet(jobs: list[JobRecord], labels: dict[str, str], sweep_dir: Path, out: Path,
                      max_cols: int = 24, max_rows: int = 12) -> Path | None:
    """Rows = prompts, columns = jobs (the stock image first when the sweep cached one), at each job's first seed."""
    from PIL import Image

    done = [j for j in jobs if j.status == "done" and (j.dir / "images").is_dir()]
    if not done:
        return None
    columns: list[tuple[str, dict[int, np.ndarray]]] = []
    if not any(labels.get(j.name) == "stock" for j in done):
        stock = stock_images(done[0], sweep_dir)
        if stock:
            columns.append(("stock", stock))
    for job in done[: max_cols - len(columns)]:
        images = {}
        for p in range(len(job.prompts)):
            file = job.dir / "images" / f"p{p:02d}_s{job.seeds[0]}.png"
            if file.exists():
                images[p] = np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255.0
        columns.append((labels.get(job.name, job.name), images))
    rows = min(max_rows, max((max(imgs, default=-1) + 1 for _, imgs in columns), default=0))
    if rows == 0:
        return None
    plt = _plt()
    prompts = done[0].prompts
    cell = 2.4  # inches at 110 dpi: ≥ 256 px per image
    fig, panels = plt.subplots(rows, len(columns), figsize=(cell * len(columns) + 1.6, cell * rows + 0.6), squeeze=False)
    for c, (title, images) in enumerate(columns):
        for r in range(rows):
            ax = panels[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r in images:
                ax.imshow(np.clip(images[r], 0, 1), interpolation="nearest")
            if r == 0:
                ax.set_title(title[:32], fontsize=7)
            if c == 0 and r < len(prompts):
                ax.set_ylabel(f"p{r:02d}: {prompts[r][:34]}", fontsize=6)
    fig.supxlabel("job (swept value)", fontsize=8)
    fig.supylabel("prompt", fontsize=8)
    return save_figure(fig, out / "contact_sheet.png")


def _first_kind(job: JobRecord, kind: str) -> dict | None:
    return next((i for i in job.interventions if i.get("kind") == kind), None)


def fig_word_map_grid(jobs: list[JobRecord], labels: dict[str, str], out: Path, max_words: int = 10,
                      metric: str = "word_maps") -> Path | None:
    """The word_maps (and concept_maps) presets' headline: rows = jobs, columns = the words (concepts) of prompt 0
    (first seed), each its map over the image ([words, H, W] arrays), one colour scale."""
    rows = []
    names = {"word_maps": "word_maps.p00.words.npy", "concept_maps": "concept_maps.concepts.npy"}[metric]
    for job in jobs:
        arrays = job.dir / "arrays"
        words_file = arrays / names
        maps_file = arrays / f"{metric}.p00_s{job.seeds[0]}.npy"
        if job.status == "done" and words_file.exists() and maps_file.exists():
            rows.append((labels.get(job.name, job.name), [str(w) for w in np.load(words_file)], np.load(maps_file)))
    if not rows:
        return None
    plt = _plt()
    words = rows[0][1][:max_words]
    vmax = max(float(m.max()) for _, _, m in rows) or 1.0
    fig, panels = plt.subplots(len(rows), len(words), figsize=(1.5 * len(words) + 1.5, 1.6 * len(rows) + 0.8),
                               squeeze=False)
    im = None
    for r, (label, row_words, maps) in enumerate(rows):
        for c, word in enumerate(words):
            ax = panels[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(maps) and c < len(row_words):
                im = ax.imshow(maps[c], vmin=0, vmax=vmax, cmap="inferno")
            if r == 0:
                ax.set_title(word[:14], fontsize=7)
            if c == 0:
                ax.set_ylabel(label[:24], fontsize=6)
    what = "words" if metric == "word_maps" else "concepts"
    fig.suptitle(f"{metric.replace('_', ' ')} · prompt 0 · {rows[0][2].shape[1]}×{rows[0][2].shape[2]} px · rows = "
                 f"jobs, columns = {what}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=panels, shrink=0.6, label="attention probability on the word" if metric == "word_maps"
                     else "concept saliency")
    return save_figure(fig, out / f"{metric.replace('_maps', '')}_map_grid.png", tight=False)


def _load_rgb(file: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255.0


def fig_lens_strip(jobs: list[JobRecord], sweep_dir: Path, out: Path, max_rows: int = 6) -> Path | None:
    """The diffusion_lens preset's headline: rows = prompts, one column per encoder layer ℓ fed to all 12 taps
    (stock first when cached), at each job's first seed."""
    lens = sorted(((int(d["layer"]), j) for j in jobs if j.status == "done" for d in [_first_kind(j, "lens")]
                   if d is not None and d.get("tap") is None), key=lambda t: t[0])
    if not lens:
        return None
    columns = []
    stock = stock_images(lens[0][1], sweep_dir)
    if stock:
        columns.append(("stock", stock))
    for layer, job in lens:
        columns.append((f"{layer}", {p: _load_rgb(f) for p in range(len(job.prompts))
                                     for f in [job.dir / "images" / f"p{p:02d}_s{job.seeds[0]}.png"] if f.exists()}))
    rows = min(max_rows, len(lens[0][1].prompts))
    plt = _plt()
    fig, panels = plt.subplots(rows, len(columns), figsize=(0.9 * len(columns) + 1.2, 1.0 * rows + 0.9),
                               squeeze=False)
    for c, (label, images) in enumerate(columns):
        for r in range(rows):
            ax = panels[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r in images:
                ax.imshow(np.clip(images[r], 0, 1))
            if r == rows - 1:
                ax.set_xlabel(label, fontsize=6)
            if c == 0:
                ax.set_ylabel(f"prompt {r}", fontsize=6)
    fig.suptitle("Diffusion Lens: encoder hidden state ℓ fed to all 12 taps (columns: ℓ; stock first)", fontsize=8)
    return save_figure(fig, out / "lens_strip.png")


def fig_tracing_heatmap(jobs: list[JobRecord], out: Path) -> Path | None:
    """The causal_tracing / attribution presets' headline: per pair, restoration (or attribution) of single
    (slot, token) patches, slots × user-text tokens, from the first finished job that computed them."""
    for metric, value in (("restoration", "conditioning restoration"), ("attribution", "attribution (ΔR²)")):
        for job in jobs:
            grids = sorted((job.dir / "arrays").glob(f"{metric}.p*.grid.npy")) if job.status == "done" else []
            if not grids:
                continue
            plt = _plt()
            fig, panels = plt.subplots(1, len(grids), figsize=(4.2 * len(grids) + 0.5, 3.8), squeeze=False)
            for ax, file in zip(panels[0], grids):
                grid = np.load(file)
                tokens_file = file.with_name(file.name.replace(".grid.npy", ".tokens.npy"))
                tokens = [str(t) for t in np.load(tokens_file)] if tokens_file.exists() else None
                im = ax.imshow(np.nan_to_num(grid), aspect="auto", cmap="viridis")
                ax.set_yticks(range(grid.shape[0]), [f"L{layer}" for layer in SELECT_LAYERS][: grid.shape[0]]
                              if grid.shape[0] > 1 else ["all"], fontsize=6)
                if tokens:
                    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
                ax.set_xlabel("user-text token (corrupted prompt)", fontsize=7)
                ax.set_ylabel("patched slot (encoder layer)", fontsize=7)
                ax.set_title(file.name.split(".")[1], fontsize=8)
                fig.colorbar(im, ax=ax, shrink=0.8, label=value)
            fig.suptitle(f"{metric}: single (slot, token) patches from the clean prompt", fontsize=8)
            return save_figure(fig, out / f"{metric}_heatmap.png")
    return None


def save_figure(fig, path: Path, tight: bool = True) -> Path:
    """Lay out, write (110 dpi) and release a figure: many per sweep, so none may stay open. (`tight=False` for a
    figure with a colour bar spanning its panels, which tight_layout cannot place.)"""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _safe(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in key)


def headline_metrics(jobs: list[JobRecord], extra: list[str] | None = None) -> list[str]:
    """What the sweep is about: `--metrics`, the objective, and the experiment's `headline` keys, in that order."""
    keys = list(extra or [])
    for job in jobs:
        keys += [job.config.get("objective")] + list(job.config.get("headline") or [])
    return list(dict.fromkeys(k for k in keys if k))


def write_figures(df, jobs: list[JobRecord], axes: list[str], sweep_dir: Path,
                  metrics: list[str] | None = None) -> list[Path]:
    out = sweep_dir / "figures"
    out.mkdir(exist_ok=True)
    labels = dict(zip(df["job"], df["label"])) if len(df) else {}
    per_job = job_table(df, axes) if len(df) else None
    written = []
    if per_job is not None:
        written += fig_metric_vs_key(df, per_job, axes, out, headline_metrics(jobs, metrics))
        written.append(fig_per_slot(per_job, df, out))
    written.append(fig_attention_grid(jobs, labels, out))
    written.append(fig_contact_sheet(jobs, labels, sweep_dir, out))
    written.append(fig_word_map_grid(jobs, labels, out))
    written.append(fig_word_map_grid(jobs, labels, out, metric="concept_maps"))
    written.append(fig_lens_strip(jobs, sweep_dir, out))
    written.append(fig_tracing_heatmap(jobs, out))
    return [p for p in written if p is not None]


# ------------------------------------------------------------------------------------------------ summary, W&B
def summary_text(df, jobs: list[JobRecord], axes: list[str], sweep_dir: Path, max_metrics: int = 5) -> str:
    counts = {s: sum(j.status == s for j in jobs) for s in ("done", "failed", "incomplete")}
    lines = [f"sweep {sweep_dir}: {len(jobs)} jobs — {counts['done']} done, {counts['failed']} failed, "
             f"{counts['incomplete']} incomplete; {len(df)} rows (job × prompt × seed)"]
    if axes:
        lines.append("swept: " + ", ".join(f"{a} ({df[a].nunique()} values)" if a in df.columns else a for a in axes))
    if len(df):
        per_job = job_table(df, axes)
        metrics = (interesting_metrics(per_job, limit=max_metrics, first=headline_metrics(jobs))
                   or metric_columns(per_job)[:max_metrics])
        show = per_job[["label", "status"] + metrics].copy()
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 32):
            lines.append(show.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for job in jobs:
        if job.status == "failed":
            lines.append(f"failed: {job.name}: {job.record.get('error')}")
    return "\n".join(lines)


def sweep_config(jobs: list[JobRecord], sweep_dir: Path) -> dict:
    """The collect run's config: every config key on which all the sweep's jobs agree (nested, as the jobs logged
    it), plus the sweep's name and its swept keys — so the collect run filters and groups like its jobs."""
    configs = [j.config for j in jobs if j.config]
    common = _agreed(configs) if configs else {}
    common.update(sweep=sweep_dir.name, swept=swept_keys(jobs), jobs=len(jobs))
    return common


def _agreed(configs: list[dict]) -> dict:
    out = {}
    for key, value in configs[0].items():
        others = [c.get(key, _MISSING) for c in configs[1:]]
        if isinstance(value, dict) and all(isinstance(o, dict) for o in others):
            nested = _agreed([value, *others])
            if nested:
                out[key] = nested
        elif all(o == value for o in others):
            out[key] = value
    return out


_MISSING = object()


def sweep_tags(jobs: list[JobRecord], wandb_config: dict) -> list[str]:
    """The tags the sweep's job runs carry that say what it is: experiment, variants, `synthetic`, the user's own."""
    tags = {"collect", *(wandb_config.get("tags") or [])}
    for job in jobs:
        config = job.config
        if config.get("name"):
            tags.add(str(config["name"]))
        if (config.get("model") or {}).get("name"):
            tags.add(f"variant:{config['model']['name']}")
        if (job.record.get("job") or {}).get("synthetic") or job.record.get("synthetic"):
            tags.add("synthetic")
    return sorted(t for t in tags if t)


def log_to_wandb(df, figures: list[Path], jobs: list[JobRecord], sweep_dir: Path, mode: str,
                 server=None) -> str | None:
    """One W&B run (job_type `collect`) in the sweep's group: the table, the figures, the counts."""
    import wandb

    from .tracking import WandbConfig

    wcfg = next((j.config.get("wandb") for j in jobs if j.config.get("wandb")), {}) or {}
    config = WandbConfig(mode=mode, project=wcfg.get("project", "krea_sweeps"), entity=wcfg.get("entity"))
    resolved = config.resolved_mode(server)
    if resolved == "disabled":
        return None
    run = wandb.init(project=config.project, entity=config.entity, mode=resolved, dir=str(sweep_dir),
                     group=sweep_dir.name, job_type="collect", name=f"{sweep_dir.name}-collect",
                     config=sweep_config(jobs, sweep_dir), tags=sweep_tags(jobs, wcfg),
                     reinit="finish_previous", settings=wandb.Settings(console="off", silent=True,
                                                                       x_disable_stats=True))
    try:
        table = df.copy()
        for col in table.columns:
            if table[col].dtype == object:
                table[col] = table[col].map(lambda v: None if v is None else str(v))
        run.log({"results": wandb.Table(dataframe=table)})
        run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
        for status in ("done", "failed", "incomplete"):
            run.summary[f"jobs/{status}"] = sum(j.status == status for j in jobs)
        return str(Path(run.dir).parent)
    finally:
        run.finish()


# ---------------------------------------------------------------------------------------------------------- main
def write_report(jobs: list[JobRecord], axes: list[str], sweep_dir: Path, mode: str | None, server=None) -> str:
    """Build the sweep's W&B report; online, save it and return its URL; otherwise (or when saving fails) write its
    spec next to results.parquet and say how to save it later."""
    from .report import build_report, save, sweep_from_jobs, write_spec
    from .tracking import WandbConfig

    sweep = sweep_from_jobs(jobs, sweep_dir, axes)
    report = build_report(sweep)
    if WandbConfig(mode=mode or "auto").resolved_mode(server) == "online":
        try:
            return f"W&B report: {save(report)}"
        except Exception as e:  # no network, no permission: the spec is still worth keeping
            log.warning("saving the W&B report failed (%s); writing its spec instead", e)
    path = write_spec(report, sweep_dir)
    return (f"W&B report spec: {path} ({len(sweep_panels_of(report))} panels); after `wandb sync`, save it with: "
            f"krea-collect {sweep_dir} --report --push")


def sweep_panels_of(report) -> list:
    return [p for block in report.blocks for p in getattr(block, "panels", [])]


def collect(sweep_dir: Path, figures: bool = True, wandb_mode: str | None = None, quiet: bool = False,
            metrics: list[str] | None = None, report: bool = False):
    """Write results.parquet / results.csv / figures for `sweep_dir`; return the table."""
    sweep_dir = Path(sweep_dir)
    df, jobs, axes = build_table(sweep_dir)
    df.to_parquet(sweep_dir / "results.parquet", index=False)
    df.to_csv(sweep_dir / "results.csv", index=False)
    written = write_figures(df, jobs, axes, sweep_dir, metrics) if figures and jobs else []
    if not quiet:
        print(summary_text(df, jobs, axes, sweep_dir))
        print(f"wrote {sweep_dir / 'results.parquet'}, {sweep_dir / 'results.csv'}"
              + (f", {len(written)} figure(s) in {sweep_dir / 'figures'}" if written else ""))
    from .tracking import ServerCheck

    server = ServerCheck()  # the W&B server is probed at most once per collect
    if wandb_mode:
        where = log_to_wandb(df, written, jobs, sweep_dir, wandb_mode, server)
        if where and not quiet:
            print(f"W&B collect run in {where}")
    if report:
        line = write_report(jobs, axes, sweep_dir, wandb_mode, server)
        if not quiet:
            print(line)
    return df


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="krea-collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep folder, e.g. outputs/solo_sweep")
    parser.add_argument("--no-figures", action="store_true", help="write only the table")
    parser.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default=None,
                        help="also log a summary run in the sweep's W&B group")
    parser.add_argument("--metrics", default="", help="comma-separated metric keys to plot first, e.g. "
                        "image_stats/sharpness,cond_shift/fused/rel_l2 (default: the experiment's `headline`)")
    parser.add_argument("--report", action="store_true", help="build the sweep's W&B report: saved online, else "
                        "its spec written to <sweep>/report.json")
    parser.add_argument("--push", action="store_true", help="with --report: save the spec written offline (after "
                        "`wandb sync`) and print the report's URL")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder — give a sweep folder, e.g. outputs/solo_sweep", file=sys.stderr)
        return 2
    if is_job_dir(args.sweep_dir) or not any(is_job_dir(p) for p in args.sweep_dir.iterdir()):
        print(f"error: {args.sweep_dir} holds no job folders — give a sweep folder (outputs/<name>), not a job",
              file=sys.stderr)
        return 2
    if args.push:
        return push_report(args.sweep_dir, args.report)
    collect(args.sweep_dir, figures=not args.no_figures, wandb_mode=args.wandb,
            metrics=[m for m in args.metrics.split(",") if m], report=args.report)
    return 0


def push_report(sweep_dir: Path, asked_for_report: bool) -> int:
    from .errors import ConfigError
    from .report import push

    if not asked_for_report:
        print("error: --push saves a report: give --report --push", file=sys.stderr)
        return 2
    try:
        print(f"W&B report: {push(sweep_dir)}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
