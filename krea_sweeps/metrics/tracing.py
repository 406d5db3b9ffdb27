"""Causal tracing (metric `restoration`) and attribution patching (metric `attribution`) for the `patch`
intervention's prompt pairs [clean A, corrupted B]. Definitions: docs/metrics.md.

restoration  R = 1 − d(patched, A) / d(B, A), for the image (d = RGB-RMS, A and B the stock images of the same seed)
             and for the conditioning (d = Frobenius distance of the fused text features over the aligned tokens).
             1 = the patch restores A, 0 = it leaves B. With `grid`, the conditioning restoration of every single
             (slot, user-text token) patch at the job's site: the tracing heatmap [12 slots, tokens].
attribution  the linear approximation of all those single patches at once (text path only, no DiT):
             R²(x) = 1 − ‖F(x) − F_A‖² / ‖F_B − F_A‖² (F = fused features, aligned tokens), and
             a[k, t] = ∇ₓR²(x_B)[t, k] · (x_A − x_B)[t, k], summed over the feature axis — one backward pass per pair.
             Reported with its Pearson correlation against the true single patches R²(patch_{k,t}).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator, TYPE_CHECKING

import numpy as np
import torch

from ..configs import AttributionFields, RestorationFields
from ..errors import require
from ..interventions.hooks import Always, Op, attach, capture
from ..interventions.patch import Patch, token_alignment
from ..interventions.sites import NUM_SLOTS, SITES
from .base import Metric, MetricOutput

if TYPE_CHECKING:
    from ..context import JobContext

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ helpers
def the_patch(job) -> Patch:
    patches = [i for i in job.interventions if isinstance(i, Patch)]
    require(len(patches) == 1, "intervention", f"{len(patches)} patch interventions in the job",
            "use intervention=patch (with intervention.pairs) for restoration / attribution")
    return patches[0]


def aligned_rows(enc_b, enc_a) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence positions of B and of A that the alignment pairs (content to content, suffix to suffix)."""
    cols_b = enc_b.mask[0].bool().nonzero().flatten()
    cols_a = enc_a.mask[0].bool().nonzero().flatten()
    pairs = token_alignment(int(enc_b.content.sum()), len(cols_b), int(enc_a.content.sum()), len(cols_a))
    return cols_b[[b for b, _ in pairs]], cols_a[[a for _, a in pairs]]


def distance(f: torch.Tensor, f_a: torch.Tensor, rows_b, rows_a) -> torch.Tensor:
    """‖F[B rows] − F_A[A rows]‖ (Frobenius, float64) over the aligned tokens; f, f_a are [1, T, D]."""
    return (f[0, rows_b].double() - f_a[0, rows_a].double()).norm()


def restoration(d_patched: float, d_corrupted: float) -> float:
    """1 − d(patched, A) / d(B, A); NaN when A and B do not differ (nothing to restore)."""
    return 1.0 - d_patched / d_corrupted if d_corrupted > 0 else math.nan


def token_labels(tokenizer, prompt: str, n: int) -> list[str]:
    from .word_maps import content_token_spans

    from ..prompts import body_and_tail

    text = body_and_tail(prompt)[0]
    return [text[max(a, 0):b].strip() or "␣" for a, b in content_token_spans(tokenizer, prompt, n)]


class _SetTo(Op):
    """The states become `x` (canonical layout; a leaf tensor for the gradient)."""

    name = "set_to"

    def __init__(self, x: torch.Tensor):
        self.x = x

    def states(self, states, call):
        return self.x


def _context(text_path):
    from ..interventions import InterventionContext

    return InterventionContext(text_path=text_path)


def site_states(text_path, encoded, site: str, block: int = 0) -> torch.Tensor:
    """The activation at `site` for `encoded` in the canonical layout ([B, T, 12, D], or [B, T, D] at fused)."""
    return capture(_context(text_path), encoded, site, block)


@contextmanager
def site_replaced(text_path, site: str, x: torch.Tensor, block: int = 0) -> Iterator[None]:
    """While active, the text path's activation at `site` is `x` (canonical layout; for the gradient: a leaf)."""
    with attach(site, _SetTo(x), Always(), _context(text_path), at=[block], key="tracing"):
        yield


def nan_mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    denom = math.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else math.nan


# --------------------------------------------------------------------------------------------------- computations
def single_patch_grid(text_path, patch: Patch, enc_b, enc_a, squared: bool = False) -> np.ndarray:
    """Conditioning restoration of each single (slot, user-text token) patch at `patch`'s site: [slots, tokens]
    (one row at `fused`, which has no slot axis). `squared`: the R² form that attribution linearises.

    Each cell runs the text path once with B's site activation, one (slot, token) entry taken from A's, set in
    place (`site_replaced`), on the trimmed encodings (no padding: the same math on ~40 instead of 512 tokens)."""
    from ..sampler import trim_padding

    enc_b, enc_a = trim_padding(enc_b), trim_padding(enc_a)
    site, block = patch.site, patch.block
    rows_b, rows_a = aligned_rows(enc_b, enc_a)
    with torch.no_grad():
        f_a, f_b = text_path(enc_a.taps, enc_a.mask), text_path(enc_b.taps, enc_b.mask)
        x_b = site_states(text_path, enc_b, site, block)
        x_a = site_states(text_path, enc_a, site, block)
    d_ba = float(distance(f_b, f_a, rows_b, rows_a))
    n_tokens = min(int(enc_b.content.sum()), int(enc_a.content.sum()))
    slots = list(range(NUM_SLOTS)) if SITES[site].has_slots else [None]
    grid = np.full((len(slots), int(enc_b.content.sum())), np.nan)
    for r, k in enumerate(slots):
        for t in range(n_tokens):  # content token t sits at position t in both (trimmed: no padding before it)
            x = x_b.clone()
            if k is None:
                x[0, t] = x_a[0, t]
            else:
                x[0, t, k] = x_a[0, t, k]
            with torch.no_grad(), site_replaced(text_path, site, x, block):
                d = float(distance(text_path(enc_b.taps, enc_b.mask), f_a, rows_b, rows_a))
            grid[r, t] = (1.0 - d * d / (d_ba * d_ba) if d_ba > 0 else math.nan) if squared else restoration(d, d_ba)
    return grid


def attribution_grid(text_path, patch: Patch, enc_b, enc_a) -> np.ndarray:
    """a[k, t] = ∇ₓR²(x_B)[t, k] · (x_A − x_B)[t, k] at `patch`'s site, [slots, user-text tokens] (see the module
    docstring); through `text_path` in its own dtype, with whatever hooks are attached."""
    site, block = patch.site, patch.block
    rows_b, rows_a = aligned_rows(enc_b, enc_a)
    with torch.no_grad():
        f_a = text_path(enc_a.taps, enc_a.mask)
        f_b = text_path(enc_b.taps, enc_b.mask)
        x_b = site_states(text_path, enc_b, site, block).detach()
        x_a = site_states(text_path, enc_a, site, block).detach()
    d_ba2 = distance(f_b, f_a, rows_b, rows_a) ** 2
    delta = torch.zeros_like(x_b)
    delta[0, rows_b] = x_a[0, rows_a] - x_b[0, rows_b]
    x = x_b.clone().requires_grad_(True)
    with torch.enable_grad(), site_replaced(text_path, site, x, block):
        f = text_path(enc_b.taps, enc_b.mask)
        r2 = 1.0 - distance(f, f_a, rows_b, rows_a) ** 2 / d_ba2
        (grad,) = torch.autograd.grad(r2, x)
    terms = (grad.double() * delta.double())[0]  # [T, 12, D], or [T, D] at a site without slots
    per = terms.sum(-1) if SITES[site].has_slots else terms.sum(-1, keepdim=True)  # [T, slots]
    content = enc_b.content[0].bool().nonzero().flatten()
    n = min(len(content), int(enc_a.content.sum()))
    out = np.full((per.shape[1], len(content)), np.nan)
    out[:, :n] = per[content[:n]].T.cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------------- the metrics
class PatchMetric(Metric):
    """A metric that reads the job's patch intervention (clean prompt, site): the job is refused without one."""

    def validate(self, job) -> None:
        super().validate(job)
        the_patch(job)


@dataclass
class Restoration(RestorationFields, PatchMetric):
    """How much of the clean prompt A the job's patch restores in the corrupted prompt B (module docstring)."""

    name: ClassVar[str] = "restoration"
    STATS: ClassVar[tuple] = ("cond",)

    @property
    def needs(self) -> frozenset:
        return frozenset({"images", "baseline", "text_path"} if self.images else {"text_path"})

    def summary_keys(self, job) -> list[str]:
        return [f"{self.name}/cond"] + ([f"{self.name}/image"] if self.images else [])

    def compute(self, ctx: JobContext) -> MetricOutput:
        from ..interventions import applied
        from .image import rgb_rms

        patch = the_patch(ctx.job)
        rows, arrays, images = [], {}, {}
        for p, prompt_b in enumerate(ctx.job.prompts):
            prompt_a = patch.clean_of(prompt_b)
            enc_b, enc_a = ctx.encoded.index(p), ctx.encode([prompt_a])
            rows_b, rows_a = aligned_rows(enc_b, enc_a)
            with torch.no_grad():
                f_a = ctx.text_path(enc_a.taps, enc_a.mask)
                f_b = ctx.text_path(enc_b.taps, enc_b.mask)
                with applied(ctx.job.interventions, ctx.intervention_context()):
                    f_p = ctx.text_path(enc_b.taps, enc_b.mask)
            row = {"prompt_idx": p, "prompt": prompt_b, "clean": prompt_a,
                   "cond": restoration(float(distance(f_p, f_a, rows_b, rows_a)),
                                       float(distance(f_b, f_a, rows_b, rows_a)))}
            if self.images:
                clean = ctx.stock_images(prompt_a, ctx.job.seeds)
                for s in ctx.job.seeds:
                    d_p = rgb_rms(ctx.images[(p, s)], clean[s])
                    d_b = rgb_rms(ctx.baseline_images[(p, s)], clean[s])
                    rows.append({**row, "seed": s, "image": restoration(d_p, d_b)})
            else:
                rows.append(row)
            if self.grid:
                grid = single_patch_grid(ctx.text_path, patch, enc_b, enc_a)
                labels = token_labels(ctx.model.tokenizer, prompt_b, grid.shape[1])
                arrays[f"p{p:02d}.grid"] = grid
                arrays[f"p{p:02d}.tokens"] = np.array(labels, dtype=str)
                images[f"restoration/p{p:02d}"] = (tracing_heatmap(grid, labels, patch,
                    f"restoration · {prompt_b[:48]}"), f"conditioning restoration of single patches from "
                    f"{prompt_a[:60]!r} into {prompt_b[:60]!r} at site {patch.site}")
        summary = {f"{self.name}/cond": nan_mean(r["cond"] for r in rows)}
        if self.images:
            summary[f"{self.name}/image"] = nan_mean(r["image"] for r in rows)
        return MetricOutput(summary=summary, rows=rows, arrays=arrays, images=images)


@dataclass
class Attribution(AttributionFields, PatchMetric):
    """Attribution patching: one gradient per pair approximates every single (slot, token) patch (module docstring).
    Text path only: no DiT, CPU-able at full size."""

    name: ClassVar[str] = "attribution"
    needs: ClassVar[frozenset] = frozenset({"text_encoder", "text_path"})

    def summary_keys(self, job) -> list[str]:
        return [f"{self.name}/total"] + ([f"{self.name}/corr_patching"] if self.compare else [])

    def compute(self, ctx: JobContext) -> MetricOutput:
        from ..sampler import trim_padding

        patch = the_patch(ctx.job)
        rows, arrays, images = [], {}, {}
        for p, prompt_b in enumerate(ctx.job.prompts):
            prompt_a = patch.clean_of(prompt_b)
            enc_b, enc_a = ctx.encoded.index(p), ctx.encode([prompt_a])
            grid = attribution_grid(ctx.text_path, patch, trim_padding(enc_b), trim_padding(enc_a))
            arrays[f"p{p:02d}.grid"] = grid
            row = {"prompt_idx": p, "prompt": prompt_b, "clean": prompt_a, "total": float(np.nansum(grid))}
            labels = token_labels(ctx.model.tokenizer, prompt_b, grid.shape[1])
            arrays[f"p{p:02d}.tokens"] = np.array(labels, dtype=str)
            if self.compare:
                true = single_patch_grid(ctx.text_path, patch, enc_b, enc_a, squared=True)
                arrays[f"p{p:02d}.patching"] = true
                row["corr_patching"] = pearson(grid, true)
            rows.append(row)
            images[f"attribution/p{p:02d}"] = (tracing_heatmap(grid, labels, patch, f"attribution · {prompt_b[:48]}",
                                                               value="attribution (ΔR², linear)"),
                                               f"attribution patching {prompt_a[:60]!r} → {prompt_b[:60]!r}")
        summary = {f"{self.name}/total": nan_mean(r["total"] for r in rows)}
        if self.compare:
            summary[f"{self.name}/corr_patching"] = nan_mean(r["corr_patching"] for r in rows)
        return MetricOutput(summary=summary, rows=rows, arrays=arrays, images=images)


def tracing_heatmap(grid: np.ndarray, tokens: list[str], patch: Patch, title: str,
                    value: str = "restoration") -> np.ndarray:
    from ..synthetic import SELECT_LAYERS
    from .figures import heatmap

    ylabels = ["all"] if grid.shape[0] == 1 else [f"L{layer}" for layer in SELECT_LAYERS]
    finite = grid[np.isfinite(grid)]
    lo = float(min(finite.min(), 0.0)) if finite.size else 0.0
    hi = float(max(finite.max(), 1e-9)) if finite.size else 1.0
    return heatmap(np.nan_to_num(grid, nan=0.0), title, xlabels=tokens, ylabels=ylabels,
                   xlabel="user-text token (corrupted prompt)", ylabel=f"patched {patch.site} slot (encoder layer)",
                   vmin=lo, vmax=hi, colorbar_label=value)
