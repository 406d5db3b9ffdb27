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
reproduces A exactly only when the counts match. A's activations are captured once per attach, through the text
path as attached so far, for both the padded layout (eager) and the trimmed one (fast path), so either path gets
the bit-exact activation of A's own run: patching every position reproduces A and patching none reproduces B.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch

from ..errors import require
from .base import Intervention, InterventionContext
from .sites import (NUM_LAYERWISE_BLOCKS, NUM_SLOTS, PromptRows, choice, fusion_mask, hooked, layer_of,
                    replace_first_arg, slot_indices, text_fusion, valid_columns)

log = logging.getLogger(__name__)

PATCH_SITES = ("taps", "slots", "block", "fused")


def token_alignment(content_b: int, valid_b: int, content_a: int, valid_a: int) -> list[tuple[int, int]]:
    """(B valid-token index, A valid-token index) pairs: content rank to content rank up to the shorter, then the
    suffix (the valid tokens after the content) rank to rank."""
    pairs = [(i, i) for i in range(min(content_b, content_a))]
    suffix_b, suffix_a = valid_b - content_b, valid_a - content_a
    pairs += [(content_b + j, content_a + j) for j in range(min(suffix_b, suffix_a))]
    return pairs


def site_states(text_path, encoded, site: str, block: int = 0) -> torch.Tensor:
    """The activation at `site` for `encoded`, as [B, T, 12, D] (taps, block), [B, T, D, 12] (slots) or
    [B, T, D] (fused), through `text_path` with whatever hooks are attached."""
    grabbed = {}
    tf = text_path.text_fusion
    if site == "taps":
        return encoded.taps
    if site == "slots":
        scope = hooked(tf.projector, lambda m, a: grabbed.__setitem__("x", a[0]), pre=True)
    elif site == "block":
        scope = hooked(tf.layerwise_blocks[block], lambda m, a, o: grabbed.__setitem__("x", o))
    else:
        scope = hooked(tf, lambda m, a, o: grabbed.__setitem__("x", o))
    with torch.no_grad(), scope:
        text_path(encoded.taps, encoded.mask)
    x = grabbed["x"]
    if site == "block":
        x = x.reshape(*encoded.taps.shape[:2], *x.shape[1:])
    return x


@dataclass
class Patch(Intervention):
    """Run each corrupted prompt B with `site`'s activation (at `slots` × `tokens`) taken from its clean prompt A."""

    pairs: list[list[str]] = field(default_factory=list)
    site: str = "slots"
    slots: Any = None
    tokens: list[int] | None = None
    block: int = 0

    kind: ClassVar[str] = "patch"

    def __post_init__(self):
        super().__post_init__()
        require(isinstance(self.pairs, (list, tuple)) and len(self.pairs) > 0 and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) and s.strip() for s in p)
            for p in self.pairs), "intervention.pairs", f"{self.pairs!r} is not a list of [clean, corrupted] prompts",
            "give e.g. 'intervention.pairs=[[a smiling woman,a serious woman]]'")
        self.pairs = [[str(a), str(b)] for a, b in self.pairs]
        choice(self.site, PATCH_SITES, "intervention.site")
        self.slots = list(range(NUM_SLOTS)) if self.slots is None else slot_indices(self.slots, "intervention.slots")
        if self.tokens is not None:
            require(isinstance(self.tokens, (list, tuple)) and len(self.tokens) == 2
                    and all(isinstance(t, int) for t in self.tokens) and 0 <= self.tokens[0] < self.tokens[1],
                    "intervention.tokens", f"{self.tokens!r} is not a span [start, end)",
                    "give user-text token positions [start, end), e.g. [4, 5], or null for every token")
            self.tokens = [int(t) for t in self.tokens]
        require(isinstance(self.block, int) and 0 <= self.block < NUM_LAYERWISE_BLOCKS, "intervention.block",
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

    # ---- capture
    def prepare(self, ctx: InterventionContext) -> None:
        from ..sampler import trim_padding

        require(ctx.encode is not None, "intervention", "patching needs to encode the pairs",
                "attach through JobContext.intervened() or pass InterventionContext(encode=...)")
        clean = ctx.encode([a for a, _ in self.pairs])
        corrupted = ctx.encode([b for _, b in self.pairs])
        self._rows = PromptRows(corrupted)
        self._clean, self._content = [], []
        for i in range(len(self.pairs)):
            a, b = clean.index(i), corrupted.index(i)
            states = {}
            for layout in (a, trim_padding(a)):
                x = site_states(ctx.text_path, layout, self.site, self.block)[0]
                states[x.shape[0]] = x[layout.mask[0].bool()]  # valid tokens of A, keyed by the layout's length
            n_a, n_b = int(a.content.sum()), int(b.content.sum())
            if n_a != n_b:
                log.warning("patch: %r has %d user-text tokens and %r has %d: only the first %d are aligned, so "
                            "patching everything does not reproduce the clean prompt", self.pairs[i][0], n_a,
                            self.pairs[i][1], n_b, min(n_a, n_b))
            self._clean.append({"states": states, "content": n_a, "valid": int(a.mask.sum())})
            self._content.append((n_b, int(b.mask.sum())))

    # ---- the edit
    def selected(self, pairs: list[tuple[int, int]], content_b: int) -> list[tuple[int, int]]:
        if self.tokens is None:
            return pairs
        start, end = self.tokens
        return [(b, a) for b, a in pairs if b < content_b and start <= b < end]

    def patched(self, x: torch.Tensor, hits: list[int | None], mask) -> torch.Tensor:
        """x [B, T, ...] with each matched row's selected (token, slot) entries replaced by the clean run's."""
        y = x.clone()
        for b, hit in enumerate(hits):
            if hit is None:
                continue
            clean = self._clean[hit]
            cols = valid_columns(mask, b, x.shape[1], x.device).nonzero().flatten()
            # A's run in the same layout as this one: padded (eager) or trimmed (fast path; the shorter length)
            source = clean["states"].get(x.shape[1], clean["states"][min(clean["states"])])
            content_b, valid_b = self._content[hit]
            pairs = self.selected(token_alignment(content_b, valid_b, clean["content"], clean["valid"]), content_b)
            if not pairs:
                continue
            to = cols[torch.tensor([p[0] for p in pairs], device=x.device)]
            frm = torch.tensor([p[1] for p in pairs], device=source.device)
            values = source[frm].to(device=x.device, dtype=x.dtype)
            if self.site == "fused":
                y[b, to] = values
            elif self.site == "slots":  # [T, D, 12]
                rows = y[b, to]
                rows[..., self.slots] = values[..., self.slots]
                y[b, to] = rows
            else:  # taps, block: [T, 12, D]
                rows = y[b, to]
                rows[:, self.slots] = values[:, self.slots]
                y[b, to] = rows
        return y

    @contextmanager
    def attach(self, ctx: InterventionContext) -> Iterator[None]:
        if self.is_identity:
            yield
            return
        self.prepare(ctx)
        tf = text_fusion(ctx)
        seen: dict = {"hits": [], "mask": None}  # the current text_fusion call's rows → pairs, and its mask

        def at_entry(module, args, kwargs):
            seen["mask"] = fusion_mask(args, kwargs)
            seen["hits"] = self._rows.find(args[0], seen["mask"])
            if self.site != "taps" or not self.active(ctx.state):
                return None
            return replace_first_arg(args, self.patched(args[0], seen["hits"], seen["mask"])), kwargs

        def at_slots(module, args):
            if not self.active(ctx.state):
                return None
            return replace_first_arg(args, self.patched(args[0], seen["hits"], seen["mask"]))

        def at_block(module, args, output):
            if not self.active(ctx.state):
                return None
            hits, mask = seen["hits"], seen["mask"]
            rows = len(hits)
            x = output.reshape(rows, output.shape[0] // rows, *output.shape[1:])
            return self.patched(x, hits, mask).reshape(output.shape)

        def at_output(module, args, output):
            if not self.active(ctx.state):
                return None
            return self.patched(output, seen["hits"], seen["mask"])

        with ExitStack() as stack:
            stack.enter_context(hooked(tf, at_entry, pre=True, with_kwargs=True))
            if self.site == "slots":
                stack.enter_context(hooked(tf.projector, at_slots, pre=True))
            elif self.site == "block":
                stack.enter_context(hooked(tf.layerwise_blocks[self.block], at_block))
            elif self.site == "fused":
                stack.enter_context(hooked(tf, at_output))
            yield

    def describe(self) -> dict:
        out = super().describe()
        out["slot_layers"] = [layer_of(k) for k in self.slots] if self.site != "fused" else None
        return out
