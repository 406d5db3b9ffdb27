"""Activation patching (causal tracing) on Krea 2's text path: run the corrupted prompt B with the activation at one
site taken from the clean prompt A's run.

`pairs` lists [clean A, corrupted B]; the job's prompts are the B's. Sites (`sites.py` names):
- `taps`: the 12 encoder states entering text_fusion [T, 12, D]; `slots`: the projector inputs [T, D, 12];
- `block`: the output of layerwise block `block` [T, 12, D] (the cross-layer attention's result);
- `fused`: the text features after the refiners [T, D] (no slot axis).
`slots` picks slots/taps (null = all 12; ignored at `fused`), `tokens` a span [start, end) of user-text token
positions (null = every valid token: the user text and the template suffix).

Token alignment: positions are matched on the user text — content token i of B gets content token i of A, and the
template suffix gets A's suffix. When A and B have different token counts, only the first min(n_A, n_B) content
positions are aligned: B's extra tokens keep their own activations (a warning is logged), so patching everything
reproduces A exactly only when the counts match. A's activations are captured by the fit step, through the text
path as attached so far, for both the padded layout (eager) and the trimmed one (fast path), so either path gets
the bit-exact activation of A's own run: patching every position reproduces A and patching none reproduces B.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..configs import PatchFields
from ..errors import require
from .base import Intervention, InterventionContext
from .hooks import Op, capture
from .sites import NUM_LAYERWISE_BLOCKS, NUM_SLOTS, PromptRows, layer_of, slot_indices, valid_columns

log = logging.getLogger(__name__)



def token_alignment(content_b: int, valid_b: int, content_a: int, valid_a: int) -> list[tuple[int, int]]:
    """(B valid-token index, A valid-token index) pairs: content rank to content rank up to the shorter, then the
    suffix (the valid tokens after the content) rank to rank."""
    pairs = [(i, i) for i in range(min(content_b, content_a))]
    suffix_b, suffix_a = valid_b - content_b, valid_a - content_a
    pairs += [(content_b + j, content_a + j) for j in range(min(suffix_b, suffix_a))]
    return pairs


class PatchOp(Op):
    """Each row whose prompt is a known corrupted prompt B (found by the call's taps) gets the clean run's
    activation at the selected (token, slot) entries, tokens aligned on the user text (`token_alignment`)."""

    name = "patch"

    def __init__(self, slots: list[int], tokens: list[int] | None):
        self.slots, self.tokens = slots, tokens
        self.rows: PromptRows | None = None
        self.clean: list[dict] = []
        self.content: list[tuple[int, int]] = []

    def selected(self, pairs: list[tuple[int, int]], content_b: int) -> list[tuple[int, int]]:
        if self.tokens is None:
            return pairs
        start, end = self.tokens
        return [(b, a) for b, a in pairs if b < content_b and start <= b < end]

    def states(self, x: torch.Tensor, call) -> torch.Tensor:
        """x [B, T, 12, D] (or [B, T, D]) with each matched row's selected entries replaced by the clean run's."""
        mask = call.mask
        y = x.clone()
        for b, hit in enumerate(self.rows.find(call.taps, mask)):
            if hit is None:
                continue
            clean = self.clean[hit]
            cols = valid_columns(mask, b, x.shape[1], x.device).nonzero().flatten()
            # A's run in the same layout as this one: padded (eager) or trimmed (fast path; the shorter length)
            source = clean["states"].get(x.shape[1], clean["states"][min(clean["states"])])
            content_b, valid_b = self.content[hit]
            pairs = self.selected(token_alignment(content_b, valid_b, clean["content"], clean["valid"]), content_b)
            if not pairs:
                continue
            to = cols[torch.tensor([p[0] for p in pairs], device=x.device)]
            frm = torch.tensor([p[1] for p in pairs], device=source.device)
            values = source[frm].to(device=x.device, dtype=x.dtype)
            if x.dim() == 3:  # no slot axis (fused): whole tokens
                y[b, to] = values
            else:
                rows = y[b, to]
                rows[:, self.slots] = values[:, self.slots]
                y[b, to] = rows
        return y


@dataclass
class Patch(PatchFields, Intervention):
    """Run each corrupted prompt B with `site`'s activation (at `slots` × `tokens`) taken from its clean prompt A."""

    kind: ClassVar[str] = "patch"

    def __post_init__(self):
        super().__post_init__()
        require(len(self.pairs) > 0 and all(len(p) == 2 and all(s.strip() for s in p) for p in self.pairs),
                "intervention.pairs", f"{self.pairs!r} is not a list of [clean, corrupted] prompts",
                "give e.g. 'intervention.pairs=[[a smiling woman,a serious woman]]'")
        self.slots = list(range(NUM_SLOTS)) if self.slots is None else slot_indices(self.slots, "intervention.slots")
        if self.tokens is not None:
            require(len(self.tokens) == 2 and 0 <= self.tokens[0] < self.tokens[1],
                    "intervention.tokens", f"{self.tokens!r} is not a span [start, end)",
                    "give user-text token positions [start, end), e.g. [4, 5], or null for every token")
        require(0 <= self.block < NUM_LAYERWISE_BLOCKS, "intervention.block",
                f"{self.block!r} is not a layerwise block", f"give 0–{NUM_LAYERWISE_BLOCKS - 1}")
        self._clean: list[dict] = []
        self._rows: PromptRows | None = None
        self._content: list[tuple[int, int]] = []

    @property
    def is_identity(self) -> bool:
        return not self.slots and self.site != "fused"

    def validate(self, ctx: InterventionContext) -> None:
        super().validate(ctx)
        if ctx.prompts is not None:
            corrupted = {b for _, b in self.pairs}
            for p in ctx.prompts:
                require(p in corrupted, "prompts", f"{p[:60]!r} is not a corrupted prompt of intervention.pairs, so "
                        "patching would leave it alone", "run the pairs' corrupted prompts (second of each pair) "
                        "as the job's prompts, e.g. prompts.prompts=[...]")

    def clean_of(self, prompt: str) -> str:
        return next(a for a, b in self.pairs if b == prompt)

    @property
    def placement(self) -> tuple[str, list[int]]:
        return self.site, [self.block]

    def make_op(self) -> Op:
        return PatchOp(self.slots, self.tokens)

    def learn(self, ctx: InterventionContext) -> dict:
        """Capture A's activation at the site, for both the padded layout (eager) and the trimmed one (fast path)."""
        from ..sampler import trim_padding

        if self.is_identity:
            return {}
        require(ctx.encode is not None, "intervention", "patching needs to encode the pairs",
                "attach through JobContext.intervened() or pass InterventionContext(encode=...)")
        clean = ctx.encode([a for a, _ in self.pairs])
        corrupted = ctx.encode([b for _, b in self.pairs])
        op = self.op
        op.rows = PromptRows(corrupted)
        op.clean, op.content = [], []
        for i in range(len(self.pairs)):
            a, b = clean.index(i), corrupted.index(i)
            states = {}
            for layout in (a, trim_padding(a)):
                x = capture(ctx, layout, self.site, self.block)[0]
                states[x.shape[0]] = x[layout.mask[0].bool()]  # valid tokens of A, keyed by the layout's length
            n_a, n_b = int(a.content.sum()), int(b.content.sum())
            if n_a != n_b:
                log.warning("patch: %r has %d user-text tokens and %r has %d: only the first %d are aligned, so "
                            "patching everything does not reproduce the clean prompt", self.pairs[i][0], n_a,
                            self.pairs[i][1], n_b, min(n_a, n_b))
            op.clean.append({"states": states, "content": n_a, "valid": int(a.mask.sum())})
            op.content.append((n_b, int(b.mask.sum())))
        return {"pairs": len(self.pairs)}

    def describe(self) -> dict:
        out = super().describe()
        out["slot_layers"] = [layer_of(k) for k in self.slots] if self.site != "fused" else None
        return out
