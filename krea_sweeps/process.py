"""Process-level settings that decide what a run costs besides its work: torch's CPU threads, imports nobody uses,
and interpreter teardown. Measurements and baselines: docs/performance.md.
"""

from __future__ import annotations

import logging
import os
import sys
import types

from .errors import ConfigError

log = logging.getLogger("krea_sweeps")

THREADS_ENV = "KREA_SWEEPS_TORCH_THREADS"


# ------------------------------------------------------------------------------------------------------- imports
def defer_unused_imports() -> None:
    """Make `scipy.stats` load on first use instead of at import. diffusers' flow-match scheduler imports it at module
    top for `use_beta_sigmas`, which Krea 2 never sets (~0.4 s of every start-up, more on a loaded machine).

    importlib's LazyLoader is not enough: Hydra walks `sys.modules` with `inspect` (`hasattr(m, "__file__")`), and any
    attribute access loads a lazy module. `_Deferred` answers the module-identity dunders itself and imports the real
    module on the first other attribute (`scipy.stats.beta`, `from scipy.stats import x`), then takes itself out of
    `sys.modules` and `scipy`. `torch._dynamo` (imported and used by diffusers' torch_utils at import) stays: deferring
    it is not safe."""
    import importlib.util

    name = "scipy.stats"
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return
    if spec is None:
        return
    placeholder = _Deferred(name, spec)
    sys.modules[name] = placeholder
    setattr(sys.modules["scipy"], "stats", placeholder)


class _Deferred(types.ModuleType):
    """A stand-in for a module not imported yet: see `defer_unused_imports`."""

    def __init__(self, name: str, spec) -> None:
        super().__init__(name)
        self.__spec__, self.__loader__, self.__file__ = spec, spec.loader, spec.origin
        self.__path__ = list(spec.submodule_search_locations or [])
        self.__package__ = name

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__") and attr != "__all__":
            raise AttributeError(attr)
        import importlib

        name = self.__name__
        parent, _, child = name.rpartition(".")
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        setattr(sys.modules[parent], child, real)
        return getattr(real, attr)


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
        try:
            sys.modules["wandb"].teardown()
        except Exception as e:  # never let W&B decide the exit code
            log.warning("W&B teardown failed: %s", e)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
