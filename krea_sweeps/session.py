"""The `Session`: everything a process keeps between the jobs it runs, in one object owned by the runner.

Hydra's basic launcher (and a Ray worker) runs many jobs in one process; what they share — loaded model parts,
encoded prompts, stock images, the projector's edit chains, the sweep's failures — lives here instead of in module
globals, so it has one owner, one lifetime and one place where tests read its counters. A test or a notebook makes
its own `Session()`; `current_session()` is the process's, created at first use by the runner.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import HookRegistry
from .models import ModelCache
from .tracking import ServerCheck


@dataclass
class Session:
    """One process's caches and the sweep's failure list.

    - `models`: loaded parts, least recently used evicted under a memory budget (`model.memory_budget_gb`);
    - `encodings`: the in-memory side of each folder's encode cache (the disk side is the folder);
    - `baselines`: stock images by key, and how many this process actually generated;
    - `stock_traces`: the stock text-path trace per (model, prompts, length), with a weak reference to the module it
      was traced on (metrics/trace.py): the conditioning metrics' stock pass runs once per sweep, not once per job;
    - `projector_chains`: the projector's active edit chain per module (weak: it dies with the module);
    - `hooks`: the named hooks attached now (`attached()` lists them: each intervention's (site, op));
    - `failed_jobs`: `name: error` per failed job, reported by `run.py` at exit;
    - `wandb_server`: whether the W&B server answered (probed once per process, not once per job);
    - `warned`: one-time warnings already given;
    - `jobs_started`: how many jobs this process has started (`result.json` records it with the loads so far);
    - `compiled`, `warned_compiled`: the DiTs whose blocks this process compiled (compiling lasts for the process),
      and those already warned about an eager call on them — kept here, not as attributes on the model.
    """

    models: ModelCache = field(default_factory=ModelCache)
    encodings: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, Any] = field(default_factory=dict)
    baseline_generations: int = 0
    stock_traces: dict[tuple, tuple] = field(default_factory=dict)
    projector_chains: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    hooks: HookRegistry = field(default_factory=HookRegistry)
    failed_jobs: list[str] = field(default_factory=list)
    wandb_server: ServerCheck = field(default_factory=ServerCheck)
    warned: set[str] = field(default_factory=set)
    jobs_started: int = 0
    compiled: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    warned_compiled: weakref.WeakSet = field(default_factory=weakref.WeakSet)

    def attached(self) -> list[str]:
        """What is attached to the models at this moment, one name per (intervention, op, site[block])."""
        return self.hooks.names()

    def process_record(self) -> dict:
        """Which process ran a job and what it had loaded by then: the evidence, in `result.json`, that a worker
        kept its model between jobs (a Ray or SLURM worker's log lines can be lost; this cannot)."""
        import os
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname(), "job_in_process": self.jobs_started,
                "model_loads": dict(self.models.load_counts)}

    def encode_cache(self, folder: Path | None):
        """One encode cache per folder (the sweep's `_encoded/`), shared by the jobs this process runs."""
        from .prompts import EncodeCache

        key = str(folder)
        if key not in self.encodings:
            self.encodings[key] = EncodeCache(folder)
        return self.encodings[key]

    def warn_once(self, name: str) -> bool:
        """True the first time `name` is asked for in this session (the caller then logs its warning)."""
        if name in self.warned:
            return False
        self.warned.add(name)
        return True


_PROCESS: list[Session] = []  # the runner's session: the one reference a launcher's worker process keeps


def current_session() -> Session:
    """This process's session, made at first use: each job the launcher runs here gets the same one."""
    if not _PROCESS:
        _PROCESS.append(Session())
    return _PROCESS[0]
