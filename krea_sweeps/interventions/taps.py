"""Edits of the states themselves: per-tap gains before fusion (`tap_scale`) and ablations at taps or slots.

Both are ops on canonical states (`hooks.Op`) installed at the `taps` or `slots` site; they return edited copies,
the cached model's tensors are never written. Reference statistics (the mean of a prompt set, another prompt's
states) are computed by the explicit fit step (`Intervention.fit`), through the text path as attached so far.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..configs import AblateFields, TapScaleFields
from ..errors import require
from ..prompts import content_mask
from .base import Intervention, InterventionContext
from .hooks import Op, capture
from .projector import Gains
from .sites import NUM_SLOTS, finite, gains_vector, layer_of, slot_indices

def _rank_seed(seed: int, rank: int) -> int:
    """A 63-bit generator seed for (ablate seed, token rank), stable across processes and platforms."""
    digest = hashlib.sha256(f"krea_sweeps.ablate.noise:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class TapScale(TapScaleFields, Intervention):
    """Per-tap gains × `multiplier` on the encoder states entering text_fusion — the per-layer conditioning scaling
    ComfyUI users apply. `renorm: rms` rescales each token's 12-tap stack back to its stock RMS, so only the balance
    between taps changes (a per-tap RMS restore would undo any positive gain)."""

    kind: ClassVar[str] = "tap_scale"

    def __post_init__(self):
        super().__post_init__()
        self.gains = [1.0] * NUM_SLOTS if self.gains is None else gains_vector(list(self.gains), "intervention.gains")
        finite(self.multiplier, "intervention.multiplier")

    def factors(self) -> list[float]:
        return [g * self.multiplier for g in self.gains]

    @property
    def is_identity(self) -> bool:
        return all(f == 1.0 for f in self.factors())

    @property
    def placement(self) -> tuple[str, None]:
        return "taps", None

    def make_op(self) -> Op:
        return Gains(self.factors(), renorm=self.renorm == "rms")

    def describe(self) -> dict:
        return {**super().describe(), "site": "taps"}


class Replace(Op):
    """Replace the `targets` slots of every token (canonical [B, T, 12, D]) with: zero; a reference mean [12, D]; a
    source prompt's states, aligned by token rank (content to content, suffix to suffix); or Gaussian noise with each
    token's norm, seeded per valid-token rank (the same prompt gets the same noise at any padding or batch size)."""

    name = "replace"
    needs_slots = True

    def __init__(self, mode: str, targets: list[int], seed: int = 0, reference=None):
        self.mode, self.targets, self.seed, self.reference = mode, list(targets), seed, reference
        self._noise: dict[tuple, torch.Tensor] = {}  # memo of noise_rows (a pure function of seed, rank, D)

    def states(self, x: torch.Tensor, call) -> torch.Tensor:
        y = x.clone()
        y[..., self.targets, :] = self.replacement(x, call.mask)
        return y

    def replacement(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the targets become; x is [..., 12, D] and the result is [..., len(targets), D]."""
        t = self.targets
        if self.mode == "zero":
            return torch.zeros_like(x[..., t, :])
        if self.mode == "mean":
            return self.reference[t].to(device=x.device, dtype=x.dtype).expand_as(x[..., t, :])
        if self.mode == "resample":
            return self.resampled(x, mask)
        return self.noised(x, mask)

    def resampled(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The source prompt's states for x's targets, aligned by token rank — content token i gets the source's
        content token i (cycling when the target is longer), the template suffix gets the source's suffix — so it
        works at any padding (or none: the fast path trims it). Padded positions keep their states (never read)."""
        src_content, src_suffix = self.reference
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.to(x.device)
        content = content_mask(valid)
        out = x[..., self.targets, :].clone()
        for b in range(x.shape[0]):
            for where, src in ((content[b], src_content), (valid[b] & ~content[b], src_suffix)):
                n = int(where.sum())
                if n and src.shape[0]:
                    rank = torch.arange(n, device=x.device) % src.shape[0]
                    out[b, where] = src[rank][:, self.targets].to(device=x.device, dtype=x.dtype)
        return out

    def noise_rows(self, n: int, dim: int, device) -> torch.Tensor:
        """[n, 12, D] float32 Gaussian noise, row r drawn from its own generator seeded by (seed, r): a token's noise
        depends only on its rank among the prompt's valid tokens — not on padding, batch size or batch position — so
        the eager, trimmed and batched paths ablate with the same noise. Memoised per (D, device), grown on demand."""
        key = (dim, str(device))
        have = self._noise.get(key, torch.zeros((0, NUM_SLOTS, dim), device=device))
        if have.shape[0] < n:
            rows = [torch.randn((NUM_SLOTS, dim), dtype=torch.float32,
                                generator=torch.Generator().manual_seed(_rank_seed(self.seed, r)))
                    for r in range(have.shape[0], n)]
            have = self._noise[key] = torch.cat([have, torch.stack(rows).to(device)])
        return have[:n]

    def noised(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mode noise: each valid token's targets become its rank's noise, rescaled to the target's own norm (per
        tap); padded positions keep their states (masked keys, never read)."""
        out = x[..., self.targets, :].clone()
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.to(x.device)
        for b in range(x.shape[0]):
            where = valid[b]
            target = out[b, where].float()  # [n, k, D]
            noise = self.noise_rows(target.shape[0], x.shape[-1], x.device)[:, self.targets]
            scale = target.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            out[b, where] = (noise * scale).to(x.dtype)
        return out


@dataclass
class Ablate(AblateFields, Intervention):
    """Replace the `targets` (slots `3` or layers `L20`) at `site` (taps | slots) with zero, the mean over the
    valid tokens of `reference_prompts`, the states of `source_prompt` (resample) or norm-matched noise (`Replace`).
    The mean and the source's states are learned by `fit`."""

    kind: ClassVar[str] = "ablate"

    def __post_init__(self):
        super().__post_init__()
        self.check_site()
        self.targets = slot_indices(self.targets, "intervention.targets")
        if self.mode == "mean":
            require(len(self.reference_prompts) > 0, "intervention.reference_prompts", "no reference prompts",
                    "give prompts whose mean state replaces the targets")

    @property
    def is_identity(self) -> bool:
        return not self.targets

    def make_op(self) -> Op:
        return Replace(self.mode, self.targets, self.seed)

    def learn(self, ctx: InterventionContext) -> dict:
        """Mode mean: the [12, D] mean over every valid token of the reference set. Mode resample: the source's
        (content, suffix) states [n, 12, D] each. Both at the site, through the text path as attached so far."""
        if self.mode not in ("mean", "resample") or self.is_identity:
            return {}
        require(ctx.encode is not None, "intervention.mode", f"mode={self.mode} needs to encode prompts",
                "attach through JobContext.intervened() or pass InterventionContext(encode=...)")
        prompts = self.reference_prompts if self.mode == "mean" else [self.source_prompt]
        enc = ctx.encode(prompts)
        states = capture(ctx, enc, self.site)
        if self.mode == "mean":
            m = enc.mask.to(states.dtype)[..., None, None]
            self.op.reference = (states * m).sum((0, 1)) / m.sum((0, 1)).clamp_min(1.0)
            return {"reference_tokens": int(enc.mask.sum())}
        content = enc.content[0]
        self.op.reference = (states[0, content], states[0, enc.mask[0] & ~content])
        return {"source_tokens": int(enc.mask[0].sum())}

    def reference(self, ctx: InterventionContext) -> Any:
        """What `fit` learned (fitting now if it has not run)."""
        self.fit(ctx)
        return self.op.reference

    def describe(self) -> dict:
        out = super().describe()
        out["target_layers"] = [layer_of(k) for k in self.targets]
        if self.mode != "mean":
            out.pop("reference_prompts")
        if self.mode != "resample":
            out.pop("source_prompt")
        if self.mode != "noise":
            out.pop("seed")
        return out
