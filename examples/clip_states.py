"""A new op at an existing site: clip every token's conditioning to [-limit, limit] (docs/extending.md)."""
import math
from dataclasses import dataclass
from typing import ClassVar

from krea_sweeps.interventions import Intervention, Op


class Clip(Op):
    """A pure function of the states: canonical [B, T, 12, D] at taps/slots/block, [B, T, D] at fused."""

    name = "clip"

    def __init__(self, limit: float):
        self.limit = limit

    def states(self, x, call):
        return x.clamp(-self.limit, self.limit)


@dataclass
class ClipStates(Intervention):
    """(site, op, gates): the gates `apply_to` and `steps` come from Intervention."""

    site: str = "taps"
    limit: float = math.inf
    kind: ClassVar[str] = "clip"

    def make_op(self):
        return Clip(self.limit)
