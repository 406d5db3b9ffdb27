"""Conditioning-side metrics: text encoder + `text_fusion` (+ `txt_in`'s norm) only — no DiT blocks, no VAE, no
sampling, so they run on CPU against the real model too. Definitions: docs/metrics.md.

All of them read one memoised pass per job (`trace.text_trace`), with the job's interventions attached, and one
stock pass where they compare against the stock model. Per-prompt values are the rows; summaries average them, each
prompt weighing equally. Keys: `<metric>/<stat>`, with `/L<layer>` for per-slot values and `/block<i>` (diffusers'
module index, from 0) for per-block ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TYPE_CHECKING

import numpy as np
import torch

from ..configs import FusionAttentionFields, ProjectorWeightsFields, RefinerAttentionFields
from ..errors import require
from .attention import average_layer_stats, layer_attention_stats, token_attention_stats
from .base import BLOCK_INDEX, Metric, MetricOutput
from .trace import text_trace

if TYPE_CHECKING:
    from ..context import JobContext

log = logging.getLogger(__name__)

CONDITIONING = frozenset({"text_encoder", "text_path"})


# ------------------------------------------------------------------------------------------------------ helpers
def labels_of(variant) -> list[str]:
    """`L<layer>` for each tapped layer of a variant (known before any model load: `summary_keys` uses it too)."""
    return [f"L{layer}" for layer in variant.select_layers]


def layer_labels(ctx) -> list[str]:
    return labels_of(ctx.model.variant)


def per_layer(prefix: str, stats, labels: list[str]) -> list[str]:
    return [f"{prefix}/{stat}/{lab}" for stat in stats for lab in labels]


def prompt_row(ctx, p: int) -> dict:
    return {"prompt_idx": p, "prompt": ctx.job.prompts[p]}


def caption(ctx, what: str) -> str:
    return f"{what} | {ctx.job.variant.name} | prompts={ctx.job.prompt_set.name} | {ctx.intervention_label}"


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine along the last axis in float64; a zero vector has cosine 0 with anything."""
    a, b = a.double(), b.double()
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    dot = (a * b).sum(-1)
    return torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(dot))


def effective_weights(slots: torch.Tensor, output: torch.Tensor, candidate: torch.Tensor | None = None,
                      tolerance: float = 1e-6, candidates: tuple = ()) -> tuple[np.ndarray, float]:
    """The 12 weights w with output ≈ Σ_k w_k · slots[..., k], and the relative residual of that fit.

    The first of `candidates`, then `candidate` (the projector's weight parameter), that already reproduces the
    output (relative residual ≤ tolerance) is taken, so an unedited projector reports its exact weights, and an edit
    that declares its weight (`effective_weight`, checked here against what the projector delivered) reports that;
    otherwise a least-squares fit (minimum-norm, so a slot that is all zeros gets weight 0). Exact for any edit that
    reweights slots.
    """
    x = slots.double().reshape(-1, slots.shape[-1]).numpy()
    y = output.double().reshape(-1).numpy()
    scale = max(float(np.linalg.norm(y)), 1e-300)
    for c in (*candidates, candidate):
        if c is None:
            continue
        w = c.double().reshape(-1).numpy()
        residual = float(np.linalg.norm(x @ w - y)) / scale
        if residual <= tolerance:
            return w, residual
    w, *_ = np.linalg.lstsq(x, y, rcond=None)
    w = _snap(w)
    return w, float(np.linalg.norm(x @ w - y)) / scale


def mean_rows(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


# ----------------------------------------------------------------------------------------------------- projector
def read_projector(source: str) -> np.ndarray:
    """The [1, 12] projector weight of a Krea 2 DiT checkpoint (single file or diffusers folder), read alone."""
    from ..models import read_projector_weight

    weight, _key = read_projector_weight(source, "metrics.projector.reference_path")
    return weight.double().reshape(-1).numpy()


@dataclass
class ProjectorWeights(ProjectorWeightsFields, Metric):
    """The 12 projector weights: stock, effective under the job's interventions, and vs a reference variant."""

    name: ClassVar[str] = "projector"
    needs: ClassVar[frozenset] = CONDITIONING

    PER_LAYER: ClassVar[tuple] = ("stock", "effective", "sign", "effective_sign")
    SCALARS: ClassVar[tuple] = ("n_positive", "n_negative", "sum", "l1", "effective_cos_vs_stock",
                                "effective_fit_residual", "sign_changes")
    REFERENCE_SCALARS: ClassVar[tuple] = ("cos_vs_reference", "effective_cos_vs_reference",
                                          "max_abs_diff_vs_reference")

    def summary_keys(self, job) -> list[str]:
        labels = labels_of(job.variant)
        keys = per_layer(self.name, self.PER_LAYER, labels) + [f"{self.name}/{k}" for k in self.SCALARS]
        if self.reference is not None:
            keys += per_layer(self.name, ("reference",), labels) + [f"{self.name}/{k}" for k in self.REFERENCE_SCALARS]
        return keys

    def validate(self, job) -> None:
        super().validate(job)
        if self.reference is None:
            require(self.reference_path is None, "metrics.projector.reference", "reference_path given without a "
                    "reference variant", "set metrics.projector.reference=raw (or turbo) too")
            return
        if self.reference_path is None:
            require(job.variant.synthetic, "metrics.projector.reference_path", "the job runs a real checkpoint, "
                    "so the reference variant needs one too", "set metrics.projector.reference_path=/path/to/"
                    f"krea2_{self.reference}.safetensors (or its diffusers folder)")
        else:
            require(Path(self.reference_path).exists(), "metrics.projector.reference_path",
                    f"{self.reference_path} does not exist", "give a Krea 2 DiT .safetensors or a diffusers folder")
        self.reference_weights(job.variant)  # fail now, before any model load, if it holds no projector

    def reference_weights(self, variant) -> np.ndarray:
        """The reference projector: from `reference_path`, or (synthetic) the job's own synthetic model with the
        reference's DiT weights."""
        if self.reference_path is not None:
            return read_projector(self.reference_path)
        from dataclasses import replace

        from ..models import sources_for

        return read_projector(sources_for(replace(variant, base=self.reference, lora=None)).transformer)

    def compute(self, ctx: JobContext) -> MetricOutput:
        labels = layer_labels(ctx)
        stock_trace, trace = text_trace(ctx, intervened=False), text_trace(ctx, intervened=True)
        stock = stock_trace.prompts[0].weight.double().numpy()
        slots = torch.cat([t.slots for t in stock_trace.prompts])
        delivered = torch.cat([t.projected for t in trace.prompts])
        declared = declared_weight(ctx, trace.prompts[0].weight)
        effective, residual = effective_weights(slots, delivered, trace.prompts[0].weight, candidates=declared)
        rows = []
        for p, (s, t) in enumerate(zip(stock_trace.prompts, trace.prompts)):
            w_p, r_p = effective_weights(s.slots, t.projected, t.weight, candidates=declared)
            rows.append({**prompt_row(ctx, p), "effective_cos_vs_stock": _cos(w_p, stock), "fit_residual": r_p})
        vectors = {"stock": stock, "effective": effective, "sign": np.sign(stock),
                   "effective_sign": np.sign(_snap(effective))}
        scalars = {
            "n_positive": int((stock > 0).sum()), "n_negative": int((stock < 0).sum()),
            "sum": float(stock.sum()), "l1": float(np.abs(stock).sum()),
            "effective_cos_vs_stock": _cos(effective, stock), "effective_fit_residual": residual,
            "sign_changes": int((np.sign(_snap(effective)) != np.sign(stock)).sum()),
        }
        summary = {f"{self.name}/{stat}/{lab}": float(vectors[stat][i])
                   for stat in self.PER_LAYER for i, lab in enumerate(labels)}
        summary |= {f"{self.name}/{k}": scalars[k] for k in self.SCALARS}
        arrays = {"stock": stock, "effective": effective}
        series = {"stock": stock, "effective": effective}
        if self.reference is not None:
            ref = self.reference_weights(ctx.job.variant)
            require(ref.shape == stock.shape, "metrics.projector.reference", f"reference has {ref.size} weights, "
                    f"the job's model {stock.size}", "compare variants of the same model")
            for i, lab in enumerate(labels):
                summary[f"{self.name}/reference/{lab}"] = float(ref[i])
            versus = {"cos_vs_reference": _cos(stock, ref), "effective_cos_vs_reference": _cos(effective, ref),
                      "max_abs_diff_vs_reference": float(np.abs(stock - ref).max())}
            summary |= {f"{self.name}/{k}": versus[k] for k in self.REFERENCE_SCALARS}
            arrays["reference"] = ref
            series[f"reference ({self.reference})"] = ref
        images = {}
        if ctx.figures:
            from .figures import bars

            images["projector/weights"] = (bars(series, labels, "projector weights", ylabel="projector weight"),
                                           caption(ctx, "projector weights"))
        return MetricOutput(summary=summary, rows=rows, arrays=arrays, images=images)


def declared_weight(ctx, weight: torch.Tensor) -> tuple:
    """The projector weight the job's interventions say they apply (each one's `effective_weight`, in list order),
    as a candidate for `effective_weights` (a least-squares fit per config is most of this metric's cost in a
    sweep); () when some intervention does not declare one."""
    interventions = ctx.job.interventions
    if not interventions or not all(callable(getattr(i, "effective_weight", None)) for i in interventions):
        return ()
    w = weight
    for i in interventions:
        w = i.effective_weight(w)
    return (w,)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.clip(float(a @ b) / denom, -1.0, 1.0)) if denom > 0 else 0.0


def _snap(w: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Zero a fit's numerical dust (|w_k| ≤ 1e-6 · max |w|), so a removed slot reads as exactly 0 — weight, sign and
    term — rather than ±1e-9 from float32 rounding. Krea 2's smallest |weight| is ~0.04 × its largest."""
    return np.where(np.abs(w) <= tol * max(float(np.abs(w).max()), 1e-300), 0.0, w)


# ----------------------------------------------------------------------------------------------- fusion attention
@dataclass
class FusionAttention(FusionAttentionFields, Metric):
    """Exact cross-layer attention of each layerwise block over content tokens: the L20 hub measurement."""

    name: ClassVar[str] = "fusion_attention"
    needs: ClassVar[frozenset] = CONDITIONING
    trace_parts: ClassVar[frozenset] = frozenset({"fusion_attention"})
    upstream_of_projector: ClassVar[bool] = True  # the layerwise blocks' attention

    PER_LAYER: ClassVar[tuple] = ("strength", "top_key_share")  # per block
    BLOCK_STATS: ClassVar[tuple] = ("hub_layer", "hub_strength", "hub_ratio", "hub_top_key_share", "entropy",
                                    "entropy_norm", "head_hub_agreement")
    SCALARS: ClassVar[tuple] = ("content_tokens",)

    def summary_keys(self, job) -> list[str]:
        block = f"{self.name}/block{BLOCK_INDEX}"
        return ([f"{self.name}/{k}" for k in self.SCALARS] + per_layer(block, self.PER_LAYER, labels_of(job.variant))
                + [f"{block}/{k}" for k in self.BLOCK_STATS])

    def compute(self, ctx: JobContext) -> MetricOutput:
        from .figures import heatmap, heatmap_grid

        labels = layer_labels(ctx)
        trace = text_trace(ctx, intervened=True, parts={"fusion_attention"})
        n_blocks = len(trace.prompts[0].fusion_attention)
        rows = [{**prompt_row(ctx, p), "content_tokens": int(t.content.sum())} for p, t in enumerate(trace.prompts)]
        summary = {f"{self.name}/{k}": mean_rows(rows, k) for k in self.SCALARS}
        arrays, images = {}, {}
        for b in range(n_blocks):
            per_prompt = [layer_attention_stats(t.fusion_attention[b]) for t in trace.prompts]
            for row, s in zip(rows, per_prompt):
                row |= {f"block{b}/hub_layer": _layer(ctx, s["hub"]), f"block{b}/hub_strength": float(s["strength"][s["hub"]]),
                        f"block{b}/hub_top_key_share": float(s["top_key_share"][s["hub"]]),
                        f"block{b}/entropy_norm": s["entropy_norm"]}
            s = average_layer_stats(per_prompt)
            key = f"{self.name}/block{b}"
            for stat in self.PER_LAYER:
                for i, lab in enumerate(labels):
                    summary[f"{key}/{stat}/{lab}"] = float(s[stat][i])
            hub = s["hub"]
            block = {
                "hub_layer": _layer(ctx, hub), "hub_strength": float(s["strength"][hub]), "hub_ratio": s["hub_ratio"],
                "hub_top_key_share": float(s["top_key_share"][hub]), "entropy": s["entropy"],
                "entropy_norm": s["entropy_norm"], "head_hub_agreement": s["head_hub_agreement"],
            }
            summary |= {f"{key}/{k}": block[k] for k in self.BLOCK_STATS}
            for name in ("mean_map", "head_maps", "strength", "top_key_share"):
                arrays[f"block{b}.{name}"] = s[name].numpy()
            if self.save_probs:
                arrays[f"block{b}.probs"] = torch.cat([t.fusion_attention[b] for t in trace.prompts]).numpy()
            if not ctx.figures:
                continue
            title = f"layerwise block {b}: mean attention (hub {labels[hub]}, s={float(s['strength'][hub]):.3f})"
            images[f"{key}/mean_map"] = (heatmap(s["mean_map"].numpy(), title, labels, labels),
                                         caption(ctx, f"block {b} mean cross-layer attention"))
            names = [f"head {h} (hub {labels[int(k)]})" for h, k in enumerate(s["head_hubs"])]
            images[f"{key}/head_maps"] = (heatmap_grid(s["head_maps"].numpy(), f"layerwise block {b}: per head",
                                                       labels, names), caption(ctx, f"block {b} per-head attention"))
        if self.save_probs:
            arrays["token_prompt"] = np.concatenate([np.full(int(t.content.sum()), p) for p, t in enumerate(trace.prompts)])
        return MetricOutput(summary=summary, rows=rows, arrays=arrays, images=images)


def _layer(ctx, slot: int) -> int:
    return int(ctx.model.variant.select_layers[slot])


# ---------------------------------------------------------------------------------------------- refiner attention
@dataclass
class RefinerAttention(RefinerAttentionFields, Metric):
    """The refiner blocks' token-to-token attention: local or diffuse, and is there a sink token?"""

    name: ClassVar[str] = "refiner_attention"
    needs: ClassVar[frozenset] = CONDITIONING
    trace_parts: ClassVar[frozenset] = frozenset({"refiner_attention"})

    TOKEN_STATS: ClassVar[tuple] = ("local_share", "local_share_uniform", "received_entropy_norm",
                                    "top_received_x_uniform")  # from `token_attention_stats`, per prompt
    BLOCK_STATS: ClassVar[tuple] = TOKEN_STATS + ("top_received_is_suffix",)  # summaries: means over prompts

    def summary_keys(self, job) -> list[str]:
        return [f"{self.name}/block{BLOCK_INDEX}/{k}" for k in self.BLOCK_STATS]

    def validate(self, job) -> None:
        super().validate(job)
        require(self.window >= 0, "metrics.refiner_attention.window",
                f"{self.window!r} is not a non-negative integer", "give e.g. window=8")

    def compute(self, ctx: JobContext) -> MetricOutput:
        from .figures import heatmap

        trace = text_trace(ctx, intervened=True, parts={"refiner_attention"})
        n_blocks = len(trace.prompts[0].refiner_attention)
        rows = [prompt_row(ctx, p) for p in range(len(trace.prompts))]
        summary, arrays, images = {}, {}, {}
        for b in range(n_blocks):
            for p, (row, t) in enumerate(zip(rows, trace.prompts)):
                positions = t.content.nonzero().squeeze(-1)
                s = token_attention_stats(t.refiner_attention[b], positions, t.mask, self.window)
                row |= {f"block{b}/{k}": s[k] for k in self.TOKEN_STATS}
                row[f"block{b}/top_received_rank"] = s["top_received_rank"]
                row[f"block{b}/top_received_is_suffix"] = bool(s["top_received_rank"] >= int(t.content.sum()))
                arrays[f"block{b}.received.p{p:02d}"] = s["received"].numpy()
                mean_map = t.refiner_attention[b].double().mean(0)[:, t.mask]  # [content queries, valid keys]
                arrays[f"block{b}.mean_map.p{p:02d}"] = mean_map.numpy()
                if p == 0 and ctx.figures:
                    title = f"refiner block {b}, prompt 0: mean attention (content queries × valid keys)"
                    images[f"refiner_attention/block{b}/mean_map_p00"] = (
                        heatmap(mean_map.numpy(), title, xlabel="key (valid-token rank)",
                                ylabel="query (content token)"), caption(ctx, f"refiner block {b}, prompt 0"))
            for k in self.BLOCK_STATS:
                summary[f"{self.name}/block{b}/{k}"] = mean_rows(rows, f"block{b}/{k}")
        return MetricOutput(summary=summary, rows=rows, arrays=arrays, images=images)


# ---------------------------------------------------------------------------------------------------- cond shift
@dataclass
class CondShift(Metric):
    """How far the job's interventions move the conditioning the DiT sees, vs the stock model, same prompts."""

    name: ClassVar[str] = "cond_shift"
    needs: ClassVar[frozenset] = CONDITIONING
    trace_parts: ClassVar[frozenset] = frozenset({"normed"})

    STAGES: ClassVar[tuple] = ("fused", "normed")
    STATS: ClassVar[tuple] = ("cos", "rel_l2")

    def summary_keys(self, job) -> list[str]:
        return [f"{self.name}/{stage}/{stat}" for stage in self.STAGES for stat in self.STATS]

    def compute(self, ctx: JobContext) -> MetricOutput:
        stock = text_trace(ctx, intervened=False, parts={"normed"})
        trace = text_trace(ctx, intervened=True, parts={"normed"})
        rows = []
        for p, (s, t) in enumerate(zip(stock.prompts, trace.prompts)):
            row = prompt_row(ctx, p)
            for stage in self.STAGES:
                stats = shift_stats(getattr(t, stage).double().numpy(), getattr(s, stage).double().numpy())
                row |= {f"{stage}/{k}": stats[k] for k in self.STATS}
            rows.append(row)
        summary = {f"{self.name}/{stage}/{k}": mean_rows(rows, f"{stage}/{k}")
                   for stage in self.STAGES for k in self.STATS}
        return MetricOutput(summary=summary, rows=rows)


def shift_stats(a: np.ndarray, ref: np.ndarray) -> dict:
    """Mean row-wise cosine (a zero row has cosine 0) and ‖a − ref‖ / ‖ref‖ (0 when ref is zero) of [tokens, D]
    float64 arrays; numpy rather than torch: a batch computes it thousands of times on small arrays, where each torch
    op's dispatch costs more than its arithmetic."""
    dot = np.einsum("ij,ij->i", a, ref)
    denom = np.sqrt(np.einsum("ij,ij->i", a, a)) * np.sqrt(np.einsum("ij,ij->i", ref, ref))
    cos = np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)
    ref_norm = float(np.linalg.norm(ref))
    return {"cos": float(cos.mean()), "rel_l2": float(np.linalg.norm(a - ref)) / ref_norm if ref_norm > 0 else 0.0}


# ----------------------------------------------------------------------------------------------- slot contribution
@dataclass
class SlotContribution(Metric):
    """What each of the 12 projector inputs contributes to the projector output, and what removing it costs."""

    name: ClassVar[str] = "slot_contribution"
    needs: ClassVar[frozenset] = CONDITIONING

    PER_LAYER: ClassVar[tuple] = ("slot_norm", "term_norm", "term_share", "drop")  # from `slot_terms`
    SCALARS: ClassVar[tuple] = ("top_drop_layer", "fit_residual", "sum_rel_error")

    def summary_keys(self, job) -> list[str]:
        scalars = [f"{self.name}/{k}" for k in self.SCALARS]
        return per_layer(self.name, self.PER_LAYER, labels_of(job.variant)) + scalars

    def compute(self, ctx: JobContext) -> MetricOutput:
        labels = layer_labels(ctx)
        trace = text_trace(ctx, intervened=True)
        rows, per_prompt = [], []
        for p, t in enumerate(trace.prompts):
            s = slot_terms(t.slots, t.projected, t.weight)
            per_prompt.append(s)
            row = prompt_row(ctx, p) | {"fit_residual": s["fit_residual"], "sum_rel_error": s["sum_rel_error"]}
            for i, lab in enumerate(labels):
                row |= {f"drop/{lab}": float(s["drop"][i]), f"term_norm/{lab}": float(s["term_norm"][i])}
            rows.append(row)
        summary, arrays = {}, {}
        for stat in self.PER_LAYER:
            avg = np.mean([s[stat] for s in per_prompt], axis=0)
            arrays[stat] = avg
            for i, lab in enumerate(labels):
                summary[f"{self.name}/{stat}/{lab}"] = float(avg[i])
        scalars = {"top_drop_layer": _layer(ctx, int(np.argmax(arrays["drop"]))),
                   "fit_residual": mean_rows(rows, "fit_residual"), "sum_rel_error": mean_rows(rows, "sum_rel_error")}
        summary |= {f"{self.name}/{k}": scalars[k] for k in self.SCALARS}
        return MetricOutput(summary=summary, rows=rows, arrays=arrays)


def slot_terms(slots: torch.Tensor, projected: torch.Tensor, weight: torch.Tensor | None = None) -> dict:
    """Per-slot statistics of o_t = Σ_k w_k x_{t,k} over tokens t (slots [Tc, D, 12], projected [Tc, D]).

    w are the projector's effective weights (`effective_weights`), so the terms describe what the projector did under
    the job's interventions; `sum_rel_error` = ‖Σ_k terms − delivered output‖ / ‖output‖ checks it.
    """
    w, residual = effective_weights(slots, projected, weight)
    x = slots.double()
    terms = x * torch.from_numpy(w)  # [Tc, D, 12]
    o = terms.sum(-1)  # [Tc, D]
    term_norm = terms.norm(dim=1).mean(0).numpy()
    drop = torch.stack([1 - cosine(o, o - terms[..., k]) for k in range(x.shape[-1])], -1).mean(0).numpy()
    denom = projected.double().norm()
    return {
        "slot_norm": x.norm(dim=1).mean(0).numpy(), "term_norm": term_norm,
        "term_share": term_norm / term_norm.sum() if term_norm.sum() > 0 else term_norm, "drop": drop,
        "terms": terms, "output": o, "fit_residual": residual,
        "sum_rel_error": float((o - projected.double()).norm() / denom) if denom > 0 else 0.0,
    }


# ------------------------------------------------------------------------------------------------------ tap norms
@dataclass
class TapNorms(Metric):
    """Mean token norm of each of the 12 taps as text_fusion receives them (the card: ~48× growth L2 → L35)."""

    name: ClassVar[str] = "tap_norms"
    needs: ClassVar[frozenset] = CONDITIONING
    upstream_of_projector: ClassVar[bool] = True  # the taps as text_fusion receives them

    def growth_key(self, labels: list[str]) -> str:
        """Deepest over shallowest tap (`tap_norms/growth_L35_over_L2` for Krea 2)."""
        return f"{self.name}/growth_{labels[-1]}_over_{labels[0]}"

    def summary_keys(self, job) -> list[str]:
        labels = labels_of(job.variant)
        return [f"{self.name}/{lab}" for lab in labels] + [self.growth_key(labels)]

    def compute(self, ctx: JobContext) -> MetricOutput:
        labels = layer_labels(ctx)
        trace = text_trace(ctx, intervened=True)
        rows, norms = [], []
        for p, t in enumerate(trace.prompts):
            n = t.taps.double().norm(dim=-1).mean(0).numpy()  # [12]
            norms.append(n)
            rows.append(prompt_row(ctx, p) | {lab: float(n[i]) for i, lab in enumerate(labels)})
        avg = np.mean(norms, axis=0)
        summary = {f"{self.name}/{lab}": float(avg[i]) for i, lab in enumerate(labels)}
        summary[self.growth_key(labels)] = float(avg[-1] / avg[0]) if avg[0] > 0 else np.inf
        return MetricOutput(summary=summary, rows=rows, arrays={"mean_norm": avg})
