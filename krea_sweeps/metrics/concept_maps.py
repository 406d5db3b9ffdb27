"""Concept maps (metric `concept_maps`, ConceptAttention-style — Helbling et al., 2025) for Krea 2's single-stream DiT.

`concepts: [woman, lilies, sky]` are encoded through Krea 2's own text path (the Qwen encoder, `text_fusion`,
`txt_in`); each concept is one token — the last user-text token of its encoding (the encoder is causal, so it has
read the whole concept). The concept tokens then run through every DiT block beside the real sequence, with that
block's own weights and modulation: they attend to the image tokens and to each other (never to the prompt's text),
and no image or text token attends to them — they are computed in a forward hook after the block, from what the
block's attention produced (its image keys and values), and the block's output is returned untouched. So the image is
bit-identical with and without concept maps (tested), and the concept stream equals running the block on
`[text; image; concepts]` with that attention mask (tested).

Saliency per block: for image token i and concept c, softmax over concepts of ⟨o_i, o_c⟩, where o are the attention
outputs (after the gate and output projection) of the image token and of the concept token — ConceptAttention's
"output space". Mean over the chosen blocks and steps (conditional branch), per prompt × seed, reshaped to the latent
grid and upsampled like the word maps. Arrays: `concept_maps.pPP_sS.npy` [concepts, H, W],
`concept_maps.pPP_sS.grid.npy` [concepts, h, w], `concept_maps.concepts.npy` [concepts] (str).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator, TYPE_CHECKING

import numpy as np
import torch

from ..configs import ConceptMapsFields
from ..errors import require
from ..interventions.hooks import probing
from ..interventions.sites import hooked
from ..toy.ground_truth import GROUND_TRUTH_STATS, job_scenes, mean_scores, score_named_maps
from .base import Metric, MetricOutput
from .word_maps import MapSink, check_index_lists, checked_blocks, latent_grid, map_stats, upsample

if TYPE_CHECKING:
    from ..context import JobContext

log = logging.getLogger(__name__)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V for [B, S, heads, d] tensors (KV heads repeated for GQA) → [B, S_q, heads·d]."""
    heads = query.shape[2]
    if key.shape[2] != heads:
        key = key.repeat_interleave(heads // key.shape[2], dim=2)
        value = value.repeat_interleave(heads // value.shape[2], dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                                           value.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class CapturingProcessor:
    """Runs the block's own processor unchanged and keeps what the concept stream reads: the rotated keys, the
    values and the attention output of the joint sequence."""

    def __init__(self, inner, seen: dict):
        self.inner, self.seen = inner, seen

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        grabbed = {}
        hooks = [attn.norm_k.register_forward_hook(lambda m, a, o: grabbed.__setitem__("k", o)),
                 attn.to_v.register_forward_hook(lambda m, a, o: grabbed.__setitem__("v", o))]
        try:
            output = self.inner(attn, hidden_states, attention_mask, image_rotary_emb)
        finally:
            for h in hooks:
                h.remove()
        key = grabbed["k"]
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        self.seen.update(key=key.detach(), value=grabbed["v"].unflatten(-1, (attn.num_kv_heads, attn.head_dim))
                         .detach(), output=output.detach(), rotary=image_rotary_emb)
        return output


def origin_rotary(rotary, n: int):
    """The rotary embedding of a token at the origin (where Krea 2 puts every text token) for n tokens."""
    if rotary is None:
        return None
    return tuple(r[:1].expand(n, *r.shape[1:]) for r in rotary)


def concept_block_step(block, concepts: torch.Tensor, temb: torch.Tensor, seen: dict, image_tokens: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One block for the concept tokens [B, C, hidden]: the block's modulation, its attention with the concepts'
    queries over [image keys; concept keys] (no text keys), gate, output projection, residual, feed-forward.
    Returns (new concept states, the concepts' attention output)."""
    from diffusers.models.embeddings import apply_rotary_emb

    attn = block.attn
    prescale, preshift, pregate, postscale, postshift, postgate = (
        temb.unflatten(-1, (6, -1)) + block.scale_shift_table).unbind(-2)
    x = (1.0 + prescale) * block.norm1(concepts) + preshift
    q = attn.norm_q(attn.to_q(x).unflatten(-1, (attn.num_heads, attn.head_dim)))
    k = attn.norm_k(attn.to_k(x).unflatten(-1, (attn.num_kv_heads, attn.head_dim)))
    v = attn.to_v(x).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
    gate = attn.to_gate(x)
    rotary = origin_rotary(seen["rotary"], concepts.shape[1])
    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    keys = torch.cat([seen["key"][:, -image_tokens:], k], dim=1)
    values = torch.cat([seen["value"][:, -image_tokens:], v], dim=1)
    out = attn.to_out[0](attend(q, keys, values) * torch.sigmoid(gate))
    concepts = concepts + pregate * out
    concepts = concepts + postgate * block.ff((1.0 + postscale) * block.norm2(concepts) + postshift)
    return concepts, out


def saliency(image_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """softmax over concepts of ⟨o_image, o_concept⟩: [B, N, hidden] × [B, C, hidden] → [B, N, C] (float32)."""
    return torch.einsum("bnd,bcd->bnc", image_out.float(), concept_out.float()).softmax(-1)


@dataclass
class ConceptMaps(ConceptMapsFields, Metric):
    """Where each named concept is in the image, from the DiT's attention output space (module docstring)."""

    name: ClassVar[str] = "concept_maps"
    needs: ClassVar[frozenset] = frozenset({"images"})
    records_generation: ClassVar[bool] = True
    SUMMARY: ClassVar[tuple] = ("entropy", "area")

    def __post_init__(self):
        super().__post_init__()
        require(len(self.concepts) >= 2 and all(c.strip() for c in self.concepts), "metrics.concept_maps.concepts",
                f"{self.concepts!r} is not a list of at least two concepts",
                "give e.g. 'metrics.concept_maps.concepts=[woman,lilies,sky]' (the softmax is over concepts)")
        check_index_lists(self, "concept_maps")

    def summary_keys(self, job) -> list[str]:
        truth = [f"{self.name}/{k}" for k in GROUND_TRUTH_STATS] if job_scenes(job) else []
        return [f"{self.name}/{k}" for k in self.SUMMARY] + truth

    def validate(self, job) -> None:
        super().validate(job)
        require(job.sampler.compile is not True, "metrics.concept_maps", "compiled DiT blocks ignore a swapped "
                "attention processor", "set sampler.compile=false (or auto on CPU)")
        if self.steps is not None:
            require(max(self.steps) < job.sampler.steps, "metrics.concept_maps.steps",
                    f"step {max(self.steps)} is past the sampler's {job.sampler.steps} steps",
                    f"give steps below {job.sampler.steps}")

    def concept_tokens(self, ctx) -> torch.Tensor:
        """[C, hidden]: each concept through the encoder, text_fusion (as attached now) and txt_in; its last user-text
        token."""
        enc = ctx.encode(self.concepts)
        transformer = ctx.model.transformer
        with torch.no_grad():
            fused = transformer.text_fusion(enc.taps, attention_mask=enc.mask[:, None, None, :])
            states = transformer.txt_in(fused)
        last = [int(row.nonzero().max()) for row in enc.content]
        return torch.stack([states[i, t] for i, t in enumerate(last)])

    @contextmanager
    def recording(self, ctx, kind: str, p: int, seeds: list[int]) -> Iterator[None]:
        transformer = ctx.model.transformer
        blocks = checked_blocks(transformer, self.blocks, "metrics.concept_maps.blocks")
        h, w = latent_grid(ctx.job.sampler, ctx.model)
        n_img = h * w
        sink = MapSink(ctx.denoise, self.blocks, self.steps, n_img, ctx.job.sampler.steps, seeds, chunk=1)
        tokens = self.concept_tokens(ctx)
        seen = [dict() for _ in blocks]
        stream = {"c": None}

        def start(module, args, kwargs):  # each transformer call starts the concepts from their text-path states
            hs = kwargs.get("hidden_states", args[0] if args else None)
            stream["c"] = tokens.to(hs.dtype)[None].expand(hs.shape[0], -1, -1)

        def after_block(index):
            def hook(module, args, output):
                if ctx.denoise.current.branch != "cond":
                    return None
                temb = args[1]
                with torch.no_grad():
                    stream["c"], concept_out = concept_block_step(module, stream["c"], temb, seen[index], n_img)
                    if sink.wants(index):
                        sink.add(saliency(seen[index]["output"][:, -n_img:], concept_out))
                return None
            return hook

        key = f"metrics.{self.name}"
        hooks = ctx.session.hooks
        with ExitStack() as stack:  # every hook named, so Session.attached() lists them during the job
            stack.enter_context(probing(ctx.intervention_context(), "dit_attention", "concept_keys",
                                        lambda old, i: CapturingProcessor(old, seen[i]), at=range(len(blocks)),
                                        key=key))
            stack.enter_context(hooked(transformer, start, pre=True, with_kwargs=True))
            stack.enter_context(hooks.named(key, "dit", "concept_start"))
            for i, b in enumerate(blocks):
                stack.enter_context(hooked(b, after_block(i)))
                stack.enter_context(hooks.named(key, "dit_block", "concept_stream", i))
            yield
        store = ctx.cache.setdefault((self.name, kind), {})
        for seed, maps in sink.means().items():
            store[(p, seed)] = maps  # [N, C]

    def compute(self, ctx: JobContext) -> MetricOutput:
        from .figures import word_map_grid

        kind = "stock" if ctx.job.is_stock else "job"
        keys = sorted(ctx.images)
        store = ctx.cache.setdefault((self.name, kind), {})
        missing = [k for k in keys if k not in store]
        if missing:  # the images came from the stock-image cache: run them again, recording (and check they match)
            again = ctx.generate(missing, kind == "job", "concept maps")
            for k in missing:
                if not np.array_equal(again[k], ctx.images[k]):
                    raise RuntimeError(f"concept_maps: image {k} came out different when regenerated")
        h, w = latent_grid(ctx.job.sampler, ctx.model)
        size = (ctx.job.sampler.height, ctx.job.sampler.width)
        rows, arrays, images = [], {"concepts": np.array(self.concepts, dtype=str)}, {}
        scenes, scored = job_scenes(ctx.job), []  # toy-world prompts: concepts that name one object vs its mask
        for p, seed in keys:
            grid_maps = store[(p, seed)].T.reshape(len(self.concepts), h, w).numpy().astype(np.float32)
            tag = f"p{p:02d}_s{seed}"
            arrays[f"{tag}.grid"] = grid_maps
            full = upsample(grid_maps, size)
            if self.upsample:
                arrays[tag] = full
            stats = [map_stats(m) for m in grid_maps]
            row = {"prompt_idx": p, "seed": seed}
            for c, concept in enumerate(self.concepts):
                row[f"share/{concept}"] = stats[c]["share"]
            for k in self.SUMMARY:
                row[k] = float(np.mean([s[k] for s in stats]))
            if scenes:
                truth = score_named_maps(self.concepts, grid_maps, scenes[p])
                row |= mean_scores(list(truth.values())) | {f"pointing/{c}": t["pointing"] for c, t in truth.items()}
                scored += truth.values()
            rows.append(row)
            if seed == ctx.job.seeds[0]:
                images[f"concept_maps/p{p:02d}"] = (
                    word_map_grid(ctx.images[(p, seed)], full, self.concepts, f"concept maps · prompt {p} · seed "
                                  f"{seed}", colorbar_label="concept saliency (softmax over concepts)"),
                    f"{ctx.job.prompts[p][:80]} | ConceptAttention saliency per concept")
        summary = {f"{self.name}/{k}": float(np.mean([r[k] for r in rows])) for k in self.SUMMARY}
        if scenes:
            summary |= {f"{self.name}/{k}": v for k, v in mean_scores(scored).items()}
        return MetricOutput(summary=summary, rows=rows, arrays=arrays, images=images)
