"""The Diffusion Lens (Toker et al., ACL 2024) for Krea 2: condition the DiT on other encoder layers than its 12.

`layer: ℓ` feeds the Qwen encoder's hidden state ℓ (0 = the embeddings … 36 = the last layer) into every one of the
12 taps — or only into tap `tap` — and the learned fusion, projector and refiners run on it as usual. The hidden
state is encoded once per (prompt, layer) and cached like the taps (`EncodeCache.get(..., layers=(ℓ,))`); a
`LensOp` at the `taps` site swaps it in, row by row, for the prompt whose taps the row holds
(`sites.PromptRows`). `tap: k, layer: select_layers[k]` is the identity, bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..configs import LensFields
from ..errors import require
from .base import Intervention, InterventionContext
from .hooks import Op
from .sites import ENCODER_LAYERS, NUM_SLOTS, PromptRows, layer_of, slot_index, valid_columns


class LensOp(Op):
    """Each row of the taps whose prompt is known (`rows`: by its valid tokens' taps) gets that prompt's encoder
    state `full[i]` ([T, 1, D], as encoded) in the taps `taps`; rows of unknown prompts are left alone."""

    name = "lens"
    needs_slots = True
    only_at = ("taps",)

    def __init__(self, taps: list[int]):
        self.taps = taps
        self.rows: PromptRows | None = None
        self.full: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []

    def states(self, x: torch.Tensor, call) -> torch.Tensor:
        mask = call.mask
        y = x.clone()
        for b, hit in enumerate(self.rows.find(x, mask)):
            if hit is None:  # not one of the job's prompts (e.g. a reference set encoded by another edit): untouched
                continue
            full = self.full[hit].to(device=x.device, dtype=x.dtype)
            if full.shape[0] == x.shape[1]:  # padded as encoded: the pads get layer ℓ too, as a direct encoding has
                y[b, :, self.taps] = full.expand(-1, len(self.taps), -1)
                continue
            cols = valid_columns(mask, b, x.shape[1], x.device)  # trimmed: the valid tokens only
            state = full[self.masks[hit].to(full.device)]
            rows = y[b, cols]
            rows[:, self.taps] = state.expand(-1, len(self.taps), -1)
            y[b, cols] = rows
        return y


@dataclass
class Lens(LensFields, Intervention):
    """Encoder hidden state `layer` (0–36) into all 12 taps, or only into tap `tap` (index 0–11 or `L20`)."""

    kind: ClassVar[str] = "lens"

    def __post_init__(self):
        super().__post_init__()
        require(self.layer is not None and 0 <= self.layer <= ENCODER_LAYERS,
                "intervention.layer", f"{self.layer!r} is not an encoder hidden state",
                f"give intervention.layer=0..{ENCODER_LAYERS} (0 = embeddings; Krea 2 taps 2, 5, …, 35)")
        self.tap = None if self.tap is None else slot_index(self.tap, "intervention.tap")

    @property
    def taps(self) -> list[int]:
        return list(range(NUM_SLOTS)) if self.tap is None else [self.tap]

    @property
    def placement(self) -> tuple[str, None]:
        return "taps", None

    def make_op(self) -> Op:
        return LensOp(self.taps)

    def learn(self, ctx: InterventionContext) -> dict:
        """Encode layer ℓ of every prompt that may enter text_fusion (the job's prompts and negative prompt)."""
        require(ctx.prompts is not None and ctx.encode is not None and ctx.encode_layers is not None,
                "intervention", "the lens needs the job's prompts and encoder",
                "attach through JobContext.intervened() or pass InterventionContext(prompts=..., encode=..., "
                "encode_layers=...)")
        prompts = list(dict.fromkeys(ctx.prompts))
        stock = ctx.encode(prompts)
        lens = ctx.encode_layers(prompts, (self.layer,))
        self.op.rows = PromptRows(stock)
        self.op.full = [lens.taps[i] for i in range(len(prompts))]  # [T, 1, D] each (padded as encoded)
        self.op.masks = [lens.mask[i].bool() for i in range(len(prompts))]
        return {"prompts": len(prompts)}

    def describe(self) -> dict:
        out = super().describe()
        out.update(site="taps", tap_layers=[layer_of(k) for k in self.taps])
        return out
