"""Cross-layer attention knockout: in Krea 2's layerwise text-fusion blocks, chosen queries may not attend to chosen
key layers (e.g. remove the L20 hub).

The layerwise blocks run attention over the 12-tap axis with no mask (`block(hidden_states)`), so a forward-pre-hook
on `layerwise_blocks[i].attn` can inject a boolean `attention_mask` ([1, 1, 1, 12], or [1, 1, 12, 12] when only
some queries lose the keys) that diffusers' processor hands to its attention kernel unchanged — no processor swap,
nothing to restore but the hook. A query row with every key masked has no softmax (an explicit computation gives
NaN, SDPA gives zeros, other kernels may differ), so such rows are defined as "attention contributes nothing": a
forward hook zeroes their output, whatever the kernel — judged on the mask actually passed to the kernel, so two
knockouts that together hide every key (e.g. keys 0–5 and 6–11) are defined too.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch

from ..errors import require
from .base import Intervention, InterventionContext
from .hooks import Op
from .sites import NUM_SLOTS, block_indices, hooked, layer_of, slot_indices


def key_mask(keys_visible: list[bool], queries: list[int] | None = None) -> torch.Tensor:
    """Bool mask (True = may attend): [1, 1, 1, 12] for every query, or [1, 1, 12, 12] for the listed queries."""
    visible = torch.tensor(keys_visible, dtype=torch.bool)
    if queries is None:
        return visible.view(1, 1, 1, NUM_SLOTS)
    mask = torch.ones(NUM_SLOTS, NUM_SLOTS, dtype=torch.bool)
    mask[queries] = visible
    return mask.view(1, 1, NUM_SLOTS, NUM_SLOTS)


@contextmanager
def masked_attention(intervention: Intervention, ctx: InterventionContext, modules: list, mask: torch.Tensor
                     ) -> Iterator[None]:
    """Inject `mask` into the given attention modules while `intervention` is active (ANDed with any mask already
    there, so knockouts compose). Query rows left with no visible key by the mask actually used — which for
    composed knockouts can be dead although neither mask alone is — get zero output, whatever the kernel. (The
    `fusion_attention` site's installer: `hooks.attach` calls this.)"""
    used = {}  # id(module) -> the combined mask this hook passed on in the current call

    def pre(module, args, kwargs):
        if not intervention.active(ctx.state):
            used.pop(id(module), None)
            return None
        m = mask.to(args[0].device)
        existing = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if existing is not None:
            m = existing.bool() & m
        used[id(module)] = m
        if len(args) > 1:
            return (args[0], m, *args[2:]), kwargs
        return args, {**kwargs, "attention_mask": m}

    def zero_dead(module, args, output):
        m = used.pop(id(module), None)
        if m is None:
            return None
        dead = (~m.any(-1)).all(1)  # [b, q]: queries with no visible key (in every head); no host sync to ask
        rows = dead.expand(output.shape[0], output.shape[-2])
        return output.masked_fill(rows[..., None], 0.0)

    with ExitStack() as stack:
        for attn in modules:
            stack.enter_context(hooked(attn, pre, pre=True, with_kwargs=True))
            stack.enter_context(hooked(attn, zero_dead))
        yield


class KeyMask(Op):
    """A fixed key mask for the layerwise attention (True = may attend)."""

    name = "key_mask"

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def key_mask(self) -> torch.Tensor:
        return self.mask


@dataclass
class Knockout(Intervention):
    """No query (or only `queries`) in the chosen layerwise `blocks` may attend to the `keys` (slots: `6` or `L20`).

    `keys: []` is the identity and installs nothing (an all-True mask would switch the attention kernel's code path).
    """

    keys: list[Any] | None = None
    queries: list[Any] | None = None
    blocks: list[int] | None = None

    kind: ClassVar[str] = "knockout"

    def __post_init__(self):
        super().__post_init__()
        self.keys = slot_indices(self.keys, "intervention.keys")
        if self.queries is not None:
            self.queries = slot_indices(self.queries, "intervention.queries")
            require(len(self.queries) > 0, "intervention.queries", "an empty query list knocks out nothing",
                    "give queries, or null for all")
        self.blocks = block_indices(self.blocks, "intervention.blocks")

    @property
    def is_identity(self) -> bool:
        return not self.keys

    @property
    def mask(self) -> torch.Tensor:
        return key_mask([k not in self.keys for k in range(NUM_SLOTS)], self.queries)

    @property
    def placement(self) -> tuple[str, list[int]]:
        return "fusion_attention", self.blocks

    def make_op(self) -> Op:
        return KeyMask(self.mask)

    def describe(self) -> dict:
        out = super().describe()
        out.update(site="fusion_attention", key_layers=[layer_of(k) for k in self.keys],
                   query_layers=None if self.queries is None else [layer_of(q) for q in self.queries])
        return out
