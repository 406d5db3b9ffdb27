"""A new metric: the largest |value| of the fused text features, with the job's interventions and without."""
from dataclasses import dataclass
from typing import ClassVar

from krea_sweeps.metrics.base import Metric, MetricOutput


@dataclass
class FusedPeak(Metric):
    """`fused_peak/job`, `fused_peak/stock` and their ratio over the job's prompts (conditioning only: no DiT)."""

    name: ClassVar[str] = "fused_peak"
    needs: ClassVar[frozenset] = frozenset({"text_path"})

    def summary_keys(self, job):
        return [f"{self.name}/{k}" for k in ("job", "stock", "ratio")]

    def compute(self, ctx):
        job = float(ctx.fuse().abs().max())  # ctx.fuse(): the fused features with the job's interventions attached
        stock = float(ctx.fuse(intervened=False).abs().max())
        return MetricOutput(summary={f"{self.name}/job": job, f"{self.name}/stock": stock,
                                     f"{self.name}/ratio": job / stock})
