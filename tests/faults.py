"""Metrics that misbehave on purpose, for the sweep tests. They are real metrics, instantiated by `_target_` like any
other (`+metrics.fault._target_=faults.FailOnSeed`), so a test exercises the real runner, launcher and sweeper; the
subprocess finds this module through PYTHONPATH=tests."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from krea_sweeps.metrics import Metric, MetricOutput


@dataclass
class FailOnSeed(Metric):
    """Raises in the job whose seeds include `seed`, while the file `marker` exists (delete it to "fix" the bug)."""

    name: ClassVar[str] = "fault"
    needs: ClassVar[frozenset] = frozenset()
    seed: int = 1
    marker: str = ""

    def compute(self, ctx) -> MetricOutput:
        if self.seed in ctx.seeds and Path(self.marker).exists():
            raise RuntimeError(f"injected failure for seed {self.seed}")
        return MetricOutput(summary={"fault/seed": float(ctx.seeds[0])})


@dataclass
class SleepOnSeed(Metric):
    """In the job whose seeds include `seed`: touch `started`, then sleep (long enough to be signalled)."""

    name: ClassVar[str] = "sleep"
    needs: ClassVar[frozenset] = frozenset()
    seed: int = 1
    started: str = ""
    seconds: float = 60.0

    def compute(self, ctx) -> MetricOutput:
        if self.seed in ctx.seeds and self.started:
            Path(self.started).touch()
            time.sleep(self.seconds)
        return MetricOutput(summary={"sleep/seed": float(ctx.seeds[0])})


@dataclass
class ConfigErrorOnSeed(Metric):
    """Raises a ConfigError while the job runs (after planning passed) in the job whose seeds include `seed`: a bad
    value found only at run time fails that job like any other error."""

    name: ClassVar[str] = "config_fault"
    needs: ClassVar[frozenset] = frozenset()
    seed: int = 1

    def compute(self, ctx) -> MetricOutput:
        from krea_sweeps.errors import ConfigError

        if self.seed in ctx.seeds:
            raise ConfigError("metrics.config_fault.seed", f"seed {self.seed} is refused at run time",
                              "pick another seed")
        return MetricOutput(summary={"config_fault/seed": float(ctx.seeds[0])})
