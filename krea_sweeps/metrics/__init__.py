"""Metrics (config group `metrics`, a list): each declares what it needs, so a conditioning-only run loads neither
the DiT blocks nor the VAE and samples nothing."""

from .base import Metric, MetricOutput, needs_of

__all__ = ["Metric", "MetricOutput", "needs_of"]
