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

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..configs import KnockoutFields
from ..errors import require
from .base import Intervention
from .hooks import Op
from .installers import key_mask, masked_attention  # noqa: F401 - the fusion_attention site's installer
from .sites import NUM_SLOTS, block_indices, layer_of, slot_indices


class KeyMask(Op):
    """A fixed key mask for the layerwise attention (True = may attend)."""

    name = "key_mask"

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def key_mask(self) -> torch.Tensor:
        return self.mask


@dataclass
class Knockout(KnockoutFields, Intervention):
    """No query (or only `queries`) in the chosen layerwise `blocks` may attend to the `keys` (slots: `6` or `L20`).

    `keys: []` is the identity and installs nothing (an all-True mask would switch the attention kernel's code path).
    """

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
