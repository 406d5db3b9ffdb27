"""The metric protocol: `needs` (what must be loaded or generated), checks against the planned `Job` before any load,
and `compute(ctx: JobContext) -> MetricOutput` once the job has run (`krea_sweeps.context`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..configs import check_instance
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..context import JobContext
    from ..plan import Job

# In a declared summary key, stands for a block index (`fusion_attention/block<i>/hub_layer`): how many blocks a
# checkpoint has is known only once it is loaded, and keys are checked before that.
BLOCK_INDEX = "<i>"

# What a metric can need. `images` implies transformer + vae + generation; `baseline` implies stock images too.
NEEDS = frozenset({"text_encoder", "text_path", "transformer", "vae", "images", "baseline"})


@dataclass
class MetricOutput:
    """Scalar summaries (`<metric>/<stat>` keys), per-item rows (prompt × seed), arrays saved to the job dir,
    and figures/images (name -> (HxWx3 array in [0, 1], caption)) for W&B."""

    summary: dict[str, float] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)


@dataclass
class Metric:
    """Base: a metric's settings are the fields of its dataclass in `configs.py` (the runtime class subclasses it), so
    they are declared once and typed alike from the command line and from Python."""

    name: ClassVar[str] = "metric"
    needs: ClassVar[frozenset] = frozenset()
    # Reads nothing downstream of the projector's input (taps, layerwise blocks): without figures, its output is the
    # same for every config of a batch that edits the projector only, so a batch computes it once (`task.measure`).
    upstream_of_projector: ClassVar[bool] = False

    def __post_init__(self):
        check_instance(self, f"metrics.{self.name}")  # types and choices, as composition checks them

    def validate(self, job: Job) -> None:
        """Checks against the planned job (e.g. a baseline-able config); raise ConfigError. Runs before model load.
        Subclasses that add checks call `super().validate(job)`."""
        cfg = getattr(job, "cfg", None)
        conditioning_only = bool(cfg.get("conditioning_only", False)) if cfg is not None else False
        if conditioning_only and self.needs & {"images", "baseline"}:
            raise ConfigError(f"metrics.{self.name}", f"`{self.name}` needs generated images but the run is "
                              "configured conditioning-only (conditioning_only=true)",
                              f"drop {self.name} from metrics=[...] or set conditioning_only=false")

    def summary_keys(self, job: Job) -> list[str] | None:
        """Every summary key `compute` reports for `job` (`BLOCK_INDEX` standing for a block index), known before any
        model loads, so that a misspelt `objective` stops the sweep before its first job. Built from the same
        constants `compute` builds its summary from. None: not declared (checked only after the first job)."""
        return None

    def compute(self, ctx: JobContext) -> MetricOutput:
        """The metric on the job that ran: `ctx.job` (the plan), `ctx.model`, `ctx.encoded`, `ctx.images`, …"""
        raise NotImplementedError


def key_matches(pattern: str, key: str) -> bool:
    """Whether `key` is the declared key `pattern` (where `BLOCK_INDEX` matches a block number)."""
    regex = re.escape(pattern).replace(re.escape(BLOCK_INDEX), r"\d+")
    return re.fullmatch(regex, key) is not None


def needs_of(metrics: list[Metric]) -> frozenset:
    needs = set()
    for metric in metrics:
        needs |= metric.needs
    if "baseline" in needs:
        needs.add("images")
    if "images" in needs:
        needs |= {"transformer", "vae", "text_encoder"}
    if needs & {"text_path", "transformer"}:
        needs.add("text_encoder")
    return frozenset(needs)
