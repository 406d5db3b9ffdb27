"""Process-level settings that decide what a run costs besides its work: torch's CPU threads, imports nobody uses,
and interpreter teardown. Measurements and baselines: docs/performance.md.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import types
from contextlib import contextmanager

from .errors import ConfigError

log = logging.getLogger("krea_sweeps")

THREADS_ENV = "KREA_SWEEPS_TORCH_THREADS"


# ------------------------------------------------------------------------------------------------------- imports
# module → functions that other packages import from it at their import time but call only in code paths a run
# never takes: served as forwarding functions so that the import itself does not load the module.
DEFERRED_MODULES = {
    # diffusers' flow-match scheduler imports scipy.stats at module top for `use_beta_sigmas`, which Krea 2 never sets.
    "scipy.stats": (),
    # transformers' object-detection losses (loaded with every model through modeling_utils → loss_utils) import
    # `linear_sum_assignment` for Hungarian matching in DETR-like training.
    "scipy.optimize": ("linear_sum_assignment",),
    # diffusers' LMS scheduler (imported with the single-file loaders every checkpoint load goes through) imports
    # scipy.integrate for `integrate.quad` in LMS sampling only; it pulls in scipy.sparse.linalg (~0.3 s).
    "scipy.integrate": (),
}


def defer_unused_imports() -> None:
    """Make `scipy.stats`, `scipy.optimize` and `scipy.integrate` load on first use instead of at import (~0.4 s,
    ~0.8 s and ~0.3 s of every start-up, more on a loaded machine): see `DEFERRED_MODULES` for who imports them and why they go unused.

    importlib's LazyLoader is not enough: Hydra walks `sys.modules` with `inspect` (`hasattr(m, "__file__")`), and any
    attribute access loads a lazy module. `_Deferred` answers the module-identity dunders itself and imports the real
    module on the first other attribute (`scipy.stats.beta`, `from scipy.stats import x`), then takes itself out of
    `sys.modules` and `scipy`; the names in `DEFERRED_MODULES` are handed out as functions that import the module
    when called. `torch._dynamo` (imported and used by diffusers' torch_utils at import, and by transformers'
    `torch.compiler.disable` decorators) stays: deferring it is not safe."""
    import importlib.util

    for name, callables in DEFERRED_MODULES.items():
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        placeholder = _Deferred(name, spec, callables)
        parent, _, child = name.rpartition(".")
        sys.modules[name] = placeholder
        setattr(sys.modules[parent], child, placeholder)


class _Deferred(types.ModuleType):
    """A stand-in for a module not imported yet: see `defer_unused_imports`."""

    def __init__(self, name: str, spec, callables=()) -> None:
        super().__init__(name)
        self.__spec__, self.__loader__, self.__file__ = spec, spec.loader, spec.origin
        self.__path__ = list(spec.submodule_search_locations or [])
        self.__package__ = name
        for attr in callables:
            setattr(self, attr, _forwarding(name, attr))

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__") and attr != "__all__":
            raise AttributeError(attr)
        return getattr(_load_deferred(self.__name__), attr)


def _load_deferred(name: str):
    """The real module `name`, imported now (the placeholder steps aside first)."""
    import importlib

    module = sys.modules.get(name)
    if isinstance(module, _Deferred):
        del sys.modules[name]
        real = importlib.import_module(name)
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, real)
        return real
    return module if module is not None else importlib.import_module(name)


def _forwarding(module: str, attr: str):
    def call(*args, **kwargs):
        return getattr(_load_deferred(module), attr)(*args, **kwargs)

    call.__name__ = call.__qualname__ = attr
    call.__doc__ = f"`{module}.{attr}`, imported on first call (krea_sweeps.process.defer_unused_imports)."
    return call


# ------------------------------------------------------------------------------------------------------- threads
def torch_threads_for(setting, synthetic: bool, device: str) -> int | None:
    """The CPU thread count a job runs torch with, or None for torch's own default (one per core).

    `auto`: 1 when the CPU only does glue or tiny arithmetic — the synthetic model, or a model on a GPU — because on a
    shared machine torch's per-core threads thrash (fast/eager swung from 3.4× to 12.7× with load) while one thread
    costs a quiet run nothing; torch's default for a real model on the CPU, where the threads do real work.
    An integer sets it; `KREA_SWEEPS_TORCH_THREADS` overrides the config (`torch_threads`)."""
    setting = os.environ.get(THREADS_ENV, setting)
    if setting is None or str(setting) == "auto":
        return 1 if synthetic or str(device).startswith("cuda") else None
    try:
        n = int(setting)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ConfigError("torch_threads", f"{setting!r} is not a positive integer or auto",
                          f"set torch_threads=auto, or e.g. torch_threads=1 (or {THREADS_ENV}=1)")
    return n


def apply_torch_threads(n: int | None) -> None:
    import torch

    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------- exit
def exit_now(code) -> None:
    """End the process once everything is on disk, without interpreter teardown (module and tensor finalisers: over a
    second after a run). W&B's own teardown runs first (it flushes and stops its service process), then logging
    handlers and the std streams are flushed; every result file was already written atomically and closed."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)  # sys.exit("message") semantics
        code = 1
    if "wandb" in sys.modules:
        _wandb_teardown(bound=SIGNAL_TEARDOWN_S if code > 128 else None)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


# After Ctrl-C or SIGTERM, how long W&B's teardown may wait for its service process. Every finished job's run was
# flushed by its own `run.finish()`; the interrupted job's run is set aside (no result). What is left to wait for is a
# service blocked on a server that stopped answering: it holds its request for `init_timeout` (30 s) — seconds a user
# pressing Ctrl-C, or a preempted SLURM job inside its grace period, should not pay. The service process watches our
# pid and exits when we do.
SIGNAL_TEARDOWN_S = 3.0


def _wandb_teardown(bound: float | None) -> None:
    """W&B's own teardown (flush, stop its service), waited for at most `bound` seconds (None: until done)."""
    import threading

    def teardown():
        try:
            sys.modules["wandb"].teardown()
        except Exception as e:  # never let W&B decide the exit code
            log.warning("W&B teardown failed: %s", e)

    if bound is None:
        teardown()
        return
    worker = threading.Thread(target=teardown, name="wandb-teardown", daemon=True)
    worker.start()
    worker.join(bound)
    if worker.is_alive():
        log.debug("W&B's service did not stop within %.0f s of the signal; leaving it (it exits with this process)",
                    bound)


# ------------------------------------------------------------------------------------------------------- signals
class Interrupted(BaseException):
    """SIGTERM/SIGINT inside a job: stop cleanly, write no partial result."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by signal: 128 + signal number (130 Ctrl-C, 143 SIGTERM)."""
        return 128 + int(getattr(signal.Signals, self.signame, signal.SIGTERM))


class FailFast(BaseException):
    """`fail_fast=true` and a job failed: stop the sweep now. A BaseException, because Hydra's launchers catch
    `Exception` per job and would start the remaining jobs of the batch before re-raising."""

    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


@contextmanager
def interrupt_guard():
    """Turn SIGTERM (SLURM preemption) and SIGINT (Ctrl-C) into `Interrupted` while a job runs; restore the old
    handlers after (submitit's SIGTERM bypass, Python's KeyboardInterrupt)."""
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    old = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
