"""Steering Krea 2's conditioning along a direction d, per token, at taps, slots, the fused features or the DiT's
text tokens (`dit_text`, txt_in's output: d is then of the DiT's width).

d comes from A/B prompt pairs — difference of means of the token-pooled (mean over valid tokens) states at the site,
shape [12, D] at taps and slots, [D] at fused — or from a `.npy` / `.safetensors` file. d̂ is d normalised over the
whole vector, or per tap (`normalize: per_tap`, each of the 12 rows on its own: the dot products are then per tap).
For each token c:

    amplify      c + s (c·d̂) d̂          add        c + s d̂          subtract   c − s d̂
    project_out  c − (c·d̂) d̂            clamp      c + (value − c·d̂) d̂   (set the component to `value`)

`consistency` is the mean pairwise cosine of the per-pair deltas: near 1 means the pairs agree on one direction,
near 0 that their difference of means is mostly noise. The direction and consistency are learned by the explicit fit
step (it needs the encoder), recorded by `fitted()` and `report()`; `describe()` stays the configuration.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..configs import SteerFields
from ..errors import ConfigError, require
from .base import Intervention, InterventionContext
from .hooks import Op, capture
from .sites import NUM_SLOTS, SITES, finite, pool_tokens


def load_direction(path: str, key: str = "intervention.direction_file") -> torch.Tensor:
    """A direction from `.npy` or `.safetensors` (one tensor, or the one named `direction`)."""
    file = Path(path).expanduser()
    require(file.is_file(), key, f"{file} does not exist", "give a .npy or .safetensors file")
    try:
        if file.suffix == ".npy":
            return torch.from_numpy(np.load(file, allow_pickle=False)).float()
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(file))
            name = "direction" if "direction" in tensors else (next(iter(tensors)) if len(tensors) == 1 else None)
            require(name is not None, key, f"{file.name} holds {sorted(tensors)}",
                    "store one tensor, or name it `direction`")
            return tensors[name].float()
    except ConfigError:
        raise
    except Exception as e:  # unreadable file: one line, not a traceback
        raise ConfigError(key, f"cannot read {file.name}: {str(e).splitlines()[0]}", "give a valid file") from None
    raise ConfigError(key, f"{file.name} is neither .npy nor .safetensors", "save the direction as .npy or .safetensors")


def steer_tokens(c: torch.Tensor, d_hat: torch.Tensor, mode: str, strength: float, value: float,
                 per_tap: bool) -> torch.Tensor:
    """The per-token edit on c [..., 12, D] (or [..., D] at fused) with unit d̂ of c's trailing shape."""
    if mode == "add":
        return c + strength * d_hat
    if mode == "subtract":
        return c - strength * d_hat
    dims = (-1,) if per_tap or d_hat.dim() == 1 else (-2, -1)
    dot = (c * d_hat).sum(dims, keepdim=True)
    if mode == "amplify":
        return c + strength * dot * d_hat
    if mode == "project_out":
        return c - dot * d_hat
    return c + (value - dot) * d_hat  # clamp


def pairwise_consistency(deltas: torch.Tensor) -> float | None:
    """Mean cosine over all pairs of the per-pair deltas [P, ...]; None with fewer than two pairs."""
    flat = deltas.flatten(1).double()
    if flat.shape[0] < 2:
        return None
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cos = [float(unit[i] @ unit[j]) for i, j in itertools.combinations(range(flat.shape[0]), 2)]
    return sum(cos) / len(cos)


class SteerOp(Op):
    """`steer_tokens` with a unit direction d̂ of the states' trailing shape ([12, D], or [D] at a site without
    slots), in float32 (a copy-free cast on float32 models: bf16 dot products over 12×2560 lose the sign)."""

    name = "steer"

    def __init__(self, mode: str, strength: float, value: float, per_tap: bool, d_hat: torch.Tensor | None = None):
        self.mode, self.strength, self.value, self.per_tap, self.d_hat = mode, strength, value, per_tap, d_hat

    def states(self, c: torch.Tensor, call) -> torch.Tensor:
        d_hat = self.d_hat
        require(c.shape[-d_hat.dim():] == d_hat.shape, "intervention.direction_file",
                f"direction of shape {list(d_hat.shape)} for states of shape {list(c.shape[-d_hat.dim():])}",
                "use a direction computed on this model (text_hidden_dim)")
        return steer_tokens(c.float(), d_hat.to(c.device), self.mode, self.strength, self.value,
                            self.per_tap).to(c.dtype)


@dataclass
class Steer(SteerFields, Intervention):
    """Move each token's conditioning along a direction (see the module docstring for the modes)."""

    kind: ClassVar[str] = "steer"

    def __post_init__(self):
        super().__post_init__()
        self.check_site()
        require(self.normalize == "whole" or self.has_slots, "intervention.normalize",
                f"{self.site} has no taps", f"use normalize=whole at site={self.site}")
        finite(self.strength, "intervention.strength")
        finite(self.value, "intervention.value")
        if self.direction_file is not None:  # a file replaces the (default) pairs
            self.pairs = None
        require(self.pairs is not None or self.direction_file is not None, "intervention.pairs",
                "no direction given", "set intervention.pairs=[[A,B],...] or intervention.direction_file=d.npy")
        self._direction: torch.Tensor | None = None
        if self.pairs is not None:
            ok = len(self.pairs) > 0 and all(len(p) == 2 for p in self.pairs)
            require(ok, "intervention.pairs", f"{self.pairs!r} is not a list of [A, B] prompt pairs",
                    "give e.g. pairs=[[a smiling face, a neutral face], ...]")
        else:
            self._direction = self._checked(load_direction(self.direction_file), "intervention.direction_file")

    def _checked(self, d: torch.Tensor, key: str) -> torch.Tensor:
        expected = f"[{NUM_SLOTS}, D]" if self.has_slots else "[D]"
        shape_ok = (d.dim() == 2 and d.shape[0] == NUM_SLOTS) if self.has_slots else d.dim() == 1
        require(shape_ok, key, f"direction of shape {list(d.shape)} at site={self.site}", f"give shape {expected}")
        require(bool(torch.isfinite(d).all()), key, "the direction holds NaN/inf", "give a finite direction")
        norms = d.norm(dim=-1) if self.normalize == "per_tap" else d.norm()
        require(bool((norms > 0).all()), key, "the direction (or one of its taps) is zero",
                "use prompt pairs that differ, or normalize=whole")
        return d

    @property
    def is_identity(self) -> bool:
        return self.mode in ("amplify", "add", "subtract") and self.strength == 0.0

    @property
    def has_slots(self) -> bool:
        """Whether the states at the site have the 12-slot axis (declared by the site: not at `fused`)."""
        return SITES[self.site].has_slots

    def expected_shape(self, width: int) -> list[int]:
        return [NUM_SLOTS, width] if self.has_slots else [width]

    def validate(self, ctx: InterventionContext) -> None:
        """A direction file must match the model's width at the site — the encoder's D, or the DiT's hidden size at
        dit_text (both from its config): checked here, before any load, rather than in the forward hook minutes
        later."""
        super().validate(ctx)
        text = SITES[self.site].width == "text"
        width = ctx.text_dim if text else ctx.dit_dim
        if self.direction_file is not None and width is not None:
            expected = self.expected_shape(width)
            require(list(self._direction.shape) == expected, "intervention.direction_file",
                    f"direction of shape {list(self._direction.shape)} at site={self.site}, but this model's "
                    f"states there are {expected} ({'text_hidden_dim' if text else 'DiT hidden size'} {width})",
                    f"give a direction of shape {expected} computed on this model")

    def make_op(self) -> Op:
        return SteerOp(self.mode, self.strength, self.value, self.normalize == "per_tap")

    def learn(self, ctx: InterventionContext) -> dict:
        """The raw direction d from the pairs (difference of means of token-pooled states at the site) and the
        pairs' consistency; the op gets the unit direction d̂."""
        record = {}
        if self._direction is None:
            require(ctx.encode is not None, "intervention.pairs", "prompt pairs need the encoder",
                    "attach through JobContext.intervened() or pass InterventionContext(encode=...)")
            a = self.pooled(ctx, [p[0] for p in self.pairs])
            b = self.pooled(ctx, [p[1] for p in self.pairs])
            deltas = a - b
            record["consistency"] = pairwise_consistency(deltas)
            self._direction = self._checked(deltas.mean(0).float().cpu(), "intervention.pairs")
        d = self._direction.double()
        d = d / (d.norm(dim=-1, keepdim=True) if self.normalize == "per_tap" else d.norm())
        self.op.d_hat = d.float()
        record["direction_norm"] = float(self._direction.norm())
        return record

    @property
    def consistency(self) -> float | None:
        """The pairs' mean pairwise cosine, once fitted (None before, or for a direction file)."""
        return (self.fitted() or {}).get("consistency")

    def direction(self, ctx: InterventionContext) -> torch.Tensor:
        """The raw direction d ([12, D] or [D]), fitting first if needed."""
        self.fit(ctx)
        return self._direction

    def pooled(self, ctx: InterventionContext, prompts: list[str]) -> torch.Tensor:
        """Token-pooled states at the site, one row per prompt: [P, 12, D] or [P, D]."""
        enc = ctx.encode(prompts)
        return pool_tokens(capture(ctx, enc, self.site), enc.mask)

    def unit_direction(self, ctx: InterventionContext) -> torch.Tensor:
        self.fit(ctx)
        return self.op.d_hat

    def describe(self) -> dict:
        out = super().describe()
        if self.mode != "clamp":
            out.pop("value")
        return out

    def report(self) -> dict:
        return {} if self.consistency is None else {"steer/consistency": self.consistency}
