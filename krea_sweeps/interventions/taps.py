"""Edits of the states themselves: per-tap gains before fusion (`tap_scale`) and ablations at taps or slots.

Both act through forward-pre-hooks — on `text_fusion` (taps [B, T, 12, D]) or on `text_fusion.projector` (slots
[B, T, D, 12]) — that return edited copies; the cached model's tensors are never written. Reference statistics
(the mean of a prompt set, another prompt's states) are computed once per intervention object, at first attach,
through the text path as attached so far.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch

from ..errors import require
from ..prompts import content_mask
from .base import Intervention, InterventionContext
from .projector import rms_like
from .sites import (NUM_SLOTS, capture, choice, finite, gains_vector, hooked, layer_of, projector, replace_first_arg,
                    slot_indices, text_fusion)

DEFAULT_REFERENCE_PROMPTS = [
    "a photograph of a room",
    "a portrait of a person outdoors",
    "a painting of a landscape",
    "a close-up of an object on a table",
]


def _rank_seed(seed: int, rank: int) -> int:
    """A 63-bit generator seed for (ablate seed, token rank), stable across processes and platforms."""
    digest = hashlib.sha256(f"krea_sweeps.ablate.noise:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class TapScale(Intervention):
    """Per-tap gains × `multiplier` on the encoder states entering text_fusion — the per-layer conditioning scaling
    ComfyUI users apply. `renorm: rms` rescales each token's 12-tap stack back to its stock RMS, so only the balance
    between taps changes (a per-tap RMS restore would undo any positive gain)."""

    gains: list[float] | None = None
    multiplier: float = 1.0
    renorm: str = "none"

    kind: ClassVar[str] = "tap_scale"

    def __post_init__(self):
        super().__post_init__()
        self.gains = [1.0] * NUM_SLOTS if self.gains is None else gains_vector(list(self.gains), "intervention.gains")
        finite(self.multiplier, "intervention.multiplier")
        self.multiplier = float(self.multiplier)
        self.renorm = choice(self.renorm, ("none", "rms"), "intervention.renorm")

    def factors(self) -> list[float]:
        return [g * self.multiplier for g in self.gains]

    @property
    def is_identity(self) -> bool:
        return all(f == 1.0 for f in self.factors())

    @contextmanager
    def attach(self, ctx: InterventionContext) -> Iterator[None]:
        factors = self.factors()

        def scale(module, args):
            if not self.active(ctx.state):
                return None
            x = args[0]
            y = x * torch.tensor(factors, dtype=x.dtype, device=x.device)[:, None]
            if self.renorm == "rms":
                y = rms_like(y.flatten(-2), x.flatten(-2), dim=-1).view_as(x)
            return replace_first_arg(args, y)

        with hooked(text_fusion(ctx), scale, pre=True):
            yield

    def describe(self) -> dict:
        return {**super().describe(), "site": "taps"}


@dataclass
class Ablate(Intervention):
    """Replace the `targets` (slots `3` or layers `L20`) at `site` (taps | slots) with:
    zero; the mean over the valid tokens of `reference_prompts`; the states of `source_prompt` (resample, aligned by
    token rank: content to content, suffix to suffix); or Gaussian noise with each token's norm (seeded per valid-token
    rank, so the same prompt gets the same noise at any padding or batch size)."""

    site: str = "taps"
    mode: str = "zero"
    targets: list[Any] = field(default_factory=list)
    reference_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_REFERENCE_PROMPTS))
    source_prompt: str = "a plain grey background"
    seed: int = 0

    kind: ClassVar[str] = "ablate"
    MODES: ClassVar[tuple[str, ...]] = ("zero", "mean", "resample", "noise")

    def __post_init__(self):
        super().__post_init__()
        choice(self.site, ("taps", "slots"), "intervention.site")
        choice(self.mode, self.MODES, "intervention.mode")
        self.targets = slot_indices(self.targets, "intervention.targets")
        if self.mode == "mean":
            require(len(self.reference_prompts or []) > 0, "intervention.reference_prompts", "no reference prompts",
                    "give prompts whose mean state replaces the targets")
            self.reference_prompts = [str(p) for p in self.reference_prompts]
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "intervention.seed", f"{self.seed!r} is not an integer", "give an int")
        self._reference: torch.Tensor | None = None
        self._noise: dict[tuple, torch.Tensor] = {}

    @property
    def is_identity(self) -> bool:
        return not self.targets

    def _slot_axis_last(self, x: torch.Tensor) -> torch.Tensor:
        """States as [..., 12, D] whatever the site (slots arrive as [..., D, 12])."""
        return x.transpose(-1, -2) if self.site == "slots" else x

    def reference(self, ctx: InterventionContext) -> Any:
        """Mode mean: the [12, D] mean. Mode resample: the source's (content, suffix) states [n, 12, D] each."""
        if self.mode not in ("mean", "resample") or self._reference is not None:
            return self._reference
        require(ctx.encode is not None, "intervention.mode", f"mode={self.mode} needs to encode prompts",
                "attach through JobContext.intervened() or pass InterventionContext(encode=...)")
        prompts = self.reference_prompts if self.mode == "mean" else [self.source_prompt]
        enc = ctx.encode(prompts)
        states = self._slot_axis_last(capture(ctx, enc, self.site))
        if self.mode == "mean":  # mean over every valid token of the set
            m = enc.mask.to(states.dtype)[..., None, None]
            self._reference = (states * m).sum((0, 1)) / m.sum((0, 1)).clamp_min(1.0)
        else:
            content = enc.content[0]
            self._reference = (states[0, content], states[0, enc.mask[0] & ~content])
        return self._reference

    def resampled(self, x: torch.Tensor, mask: torch.Tensor | None, ref) -> torch.Tensor:
        """The source prompt's states for x's targets, aligned by token rank — content token i gets the source's
        content token i (cycling when the target is longer), the template suffix gets the source's suffix — so it
        works at any padding (or none: the fast path trims it). Padded positions keep their states (never read)."""
        src_content, src_suffix = ref
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

    def replacement(self, x: torch.Tensor, ref, mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the targets become; x is [..., 12, D] and the result is [..., len(targets), D]."""
        t = self.targets
        if self.mode == "zero":
            return torch.zeros_like(x[..., t, :])
        if self.mode == "mean":
            return ref[t].to(device=x.device, dtype=x.dtype).expand_as(x[..., t, :])
        if self.mode == "resample":
            return self.resampled(x, mask, ref)
        return self.noised(x, mask)

    def noise_rows(self, n: int, dim: int, device) -> torch.Tensor:
        """[n, 12, D] float32 Gaussian noise, row r drawn from its own generator seeded by (seed, r): a token's noise
        depends only on its rank among the prompt's valid tokens — not on padding, batch size or batch position — so
        the eager, trimmed and batched paths ablate with the same noise. Cached per (D, device), grown on demand."""
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

    def ablated(self, states: torch.Tensor, ref, mask: torch.Tensor | None) -> torch.Tensor:
        x = self._slot_axis_last(states)
        y = x.clone()
        y[..., self.targets, :] = self.replacement(x, ref, mask)
        return self._slot_axis_last(y)

    @contextmanager
    def attach(self, ctx: InterventionContext) -> Iterator[None]:
        if self.is_identity:
            yield
            return
        ref = self.reference(ctx)
        seen = {"mask": None}  # text_fusion's token mask [B, T] of the current call (None: all valid)

        def at_taps(module, args, kwargs):
            m = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            seen["mask"] = None if m is None else m.reshape(m.shape[0], m.shape[-1]).bool()
            if self.site != "taps" or not self.active(ctx.state):
                return None
            return replace_first_arg(args, self.ablated(args[0], ref, seen["mask"])), kwargs

        def at_slots(module, args):
            if not self.active(ctx.state):
                return None
            return replace_first_arg(args, self.ablated(args[0], ref, seen["mask"]))

        with ExitStack() as stack:
            if self.site == "taps" or self.mode in ("resample", "noise"):  # resample and noise need the mask
                stack.enter_context(hooked(text_fusion(ctx), at_taps, pre=True, with_kwargs=True))
            if self.site == "slots":
                stack.enter_context(hooked(projector(ctx), at_slots, pre=True))
            yield

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
