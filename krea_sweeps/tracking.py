"""Weights & Biases (config group `wandb`): one run per job, files first, W&B second.

The job's files are the record; W&B is a view of them. So every W&B call is guarded: an error there logs a warning
and the job goes on. In one process `wandb.init` would hand back the previous run, so each job finishes the previous
one explicitly (`reinit="finish_previous"`). Without an API key runs go offline into the job dir, to `wandb sync`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .configs import WandbFields

if TYPE_CHECKING:
    from .plan import Job

log = logging.getLogger(__name__)


PROBE_TIMEOUT_S = 3.0  # how long the W&B server gets to answer before this process logs offline
INIT_TIMEOUT_S = 30.0  # wandb.init's own bound when the probe passed but the server stops answering later


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def server_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")


def server_answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether anything answers HTTP at `url` within `timeout` (an HTTP error status still counts: it answered).
    A compute node without a route out would otherwise make every `wandb.init` retry for ~90 s."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True, "answered"
    except urllib.error.HTTPError:
        return True, "answered"
    except Exception as e:  # URLError, timeout, refused, DNS: no W&B from this node
        return False, f"{type(e).__name__}: {getattr(e, 'reason', e)}"


@dataclass
class ServerCheck:
    """Whether the W&B server answered, asked once (the session keeps one per process, so a sweep pays the probe
    once); when it does not answer, say so in one line and stay offline."""

    online: bool | None = None

    def __call__(self) -> bool:
        if self.online is None:
            url = server_url()
            self.online, why = server_answers(url)
            if not self.online:
                log.warning("W&B server %s did not answer within %.0f s (%s): logging offline into the job folders "
                            "for this whole process; upload later with `wandb sync outputs/<name>/*/wandb/offline-run-*`",
                            url, PROBE_TIMEOUT_S, why)
        return self.online


@dataclass
class WandbConfig(WandbFields):
    """`wandb`: the fields and their choices are `configs.WandbFields` (checked by composition)."""

    def resolved_mode(self, server: ServerCheck | None = None) -> str:
        """`auto` is online with an API key; online falls back to offline (asked once per `server` — the session's —
        in one line) when the W&B server does not answer within a few seconds."""
        if self.mode in ("offline", "disabled") or (self.mode == "auto" and not has_api_key()):
            return "offline" if self.mode == "auto" else self.mode
        return "online" if (server if server is not None else ServerCheck())() else "offline"


class Tracker:
    """A guarded W&B run for one job."""

    def __init__(self, config: WandbConfig, server: ServerCheck | None = None):
        self.config = config
        self.mode = config.resolved_mode(server)
        self.run = None
        self.run_dir: str | None = None

    def start(self, *, job_dir: Path, name: str, group: str, job_type: str, tags: list[str], config: dict) -> None:
        if self.mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(
                project=self.config.project, entity=self.config.entity, mode=self.mode, dir=str(job_dir),
                name=name, group=group, job_type=job_type, tags=sorted(set(tags) | set(self.config.tags)),
                config=config, reinit="finish_previous",
                # x_save_requirements: W&B lists every installed package per run (importlib.metadata over the
                # whole environment: the largest part of its per-job cost); result.json records our versions.
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, init_timeout=INIT_TIMEOUT_S,
                                        x_save_requirements=False),
            )
            self.run_dir = str(Path(self.run.dir).parent) if self.run is not None else None
        except Exception as e:  # a W&B failure never fails the job
            log.warning("W&B init failed (%s); the job's files are still written", e)
            self.run = None

    def _guard(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:
            log.warning("W&B %s failed: %s", what, e)

    def define_metrics(self, summary: dict[str, Any], objective: str | None = None,
                       direction: str | None = None) -> None:
        """Give the objective the sweeper's goal (`maximize`/`minimize`), so W&B marks the best run the way Optuna
        does. The other summary keys need no definition: they are set once per job with `summary.update` (never
        logged as history), and each `define_metric` is a round trip to W&B's service (~1 ms a key, ~40 keys)."""

        def do():
            if objective and "objective" in summary and direction in ("maximize", "minimize"):
                self.run.define_metric("objective", summary="max" if direction == "maximize" else "min",
                                       goal=direction)

        self._guard("define_metric", do)

    def log_summary(self, summary: dict[str, Any]) -> None:
        # One call: setting keys one at a time costs a round trip to W&B's service each (37–41 ms a job, vs 1.2 ms).
        self._guard("summary", lambda: self.run.summary.update(dict(summary)))

    def log_table(self, name: str, rows: list[dict]) -> None:
        if not rows:
            return

        def do():
            import wandb

            columns = sorted({k for r in rows for k in r})
            data = [[_plain(r.get(c)) for c in columns] for r in rows]
            self.run.log({name: wandb.Table(columns=columns, data=data)})

        self._guard("table", do)

    def log_images(self, images: dict[str, tuple[np.ndarray, str]]) -> None:
        if not images or not self.config.log_images:
            return

        def do():
            import wandb

            self.run.log({k: wandb.Image(_to_uint8(img), caption=cap) for k, (img, cap) in images.items()})

        self._guard("images", do)

    def mark_preempting(self) -> None:
        """The job was interrupted (SLURM preemption, Ctrl-C): W&B shows the run as preempted, not crashed."""
        self._guard("mark_preempting", lambda: self.run.mark_preempting())

    def finish(self, failed: bool = False) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as e:
            log.warning("W&B finish failed: %s", e)
        self.run = None

    def where(self) -> dict:
        info = {"mode": self.mode, "dir": self.run_dir}
        if self.mode == "offline" and self.run_dir:
            info["sync"] = f"wandb sync {self.run_dir}"
        return info


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (list, tuple, dict)):
        return str(value)
    return value


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def tags_for(job: Job) -> list[str]:
    tags = [f"variant:{job.variant.name}", job.experiment]
    for i in job.interventions:
        described = i.describe()
        tags.append(f"intervention:{i.kind}")
        tags += [f"{k}:{described[k]}" for k in ("site", "slot", "layer") if described.get(k) is not None]
    if job.variant.synthetic:
        tags += ["synthetic", f"synthetic:{job.variant.synthetic_weights.kind}"]
    return tags
