"""Shared fixtures: the synthetic model loaded once per test session, Hydra composition, CLI runs (in this process,
or as a real subprocess for the few end-to-end tests that are about the process itself)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("KREA_SWEEPS_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).parent))  # tests/wandb_offline.py


@pytest.fixture(scope="session")
def session():
    """One krea_sweeps Session for the test run: the synthetic parts load once and are shared by the fixtures."""
    from krea_sweeps.session import Session

    return Session()


@pytest.fixture(scope="session")
def turbo(session):
    """The synthetic Turbo model (parts load lazily and are cached for the whole session)."""
    from krea_sweeps.models import LoadedModel, ModelVariant

    return LoadedModel(ModelVariant(name="turbo", base="turbo", is_distilled=True, steps=8, guidance=0.0), session.models)


@pytest.fixture(scope="session")
def raw(session):
    from krea_sweeps.models import LoadedModel, ModelVariant

    return LoadedModel(ModelVariant(name="raw", base="raw"), session.models)


@pytest.fixture
def no_loads(monkeypatch):
    """Records every model part a test fetches through any ModelCache (a spy on the real method): a test that
    must load nothing asserts the list stays empty."""
    from krea_sweeps.memory import ModelCache

    fetched, real_get = [], ModelCache.get

    def spy(self, key, build, estimate_bytes=0):
        fetched.append(key[0])
        return real_get(self, key, build, estimate_bytes)

    monkeypatch.setattr(ModelCache, "get", spy)
    return fetched


@pytest.fixture(scope="session")
def toy_turbo():
    """The trained toy Turbo (krea_sweeps/toy), loaded through the same loaders."""
    from krea_sweeps.models import LoadedModel, ModelVariant
    from krea_sweeps.toy.checkpoints import ToyWeights

    return LoadedModel(ModelVariant(name="turbo", base="turbo", is_distilled=True, steps=8, guidance=0.0,
                                    synthetic_weights=ToyWeights()))


@pytest.fixture(scope="session")
def toy_raw():
    from krea_sweeps.models import LoadedModel, ModelVariant
    from krea_sweeps.toy.checkpoints import ToyWeights

    return LoadedModel(ModelVariant(name="raw", base="raw", synthetic_weights=ToyWeights()))


# The config's defaults are the trained toy and its world's prompts (what `python run.py` shows a user). Most tests
# check plumbing, written against the random-weight model and the smoke prompts: the helpers pin those unless the test
# names its own (or an experiment preset, which may choose its prompts); `user_defaults=True` leaves the defaults.
PLUMBING_PINS = ("model/synthetic_weights=random", "prompts=smoke")
FLAGS_WITHOUT_OVERRIDES = ("--help", "-h", "--hydra-help", "--info")


def pinned(overrides: list[str]) -> list[str]:
    """`overrides` plus the plumbing pins that none of them already decides."""
    names = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if any(o in FLAGS_WITHOUT_OVERRIDES for o in overrides):
        return list(overrides)
    out = list(overrides)
    if "model/synthetic_weights" not in names:
        out.append(PLUMBING_PINS[0])
    if "prompts" not in names and not any(n == "experiment" or n.endswith("/experiment") for n in names):
        out.append(PLUMBING_PINS[1])
    return out


def compose(overrides: list[str] | None = None, user_defaults: bool = False):
    """The composed config for `overrides`, as run.py would see it (without running)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from krea_sweeps.plan import register_resolvers

    register_resolvers()
    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides if user_defaults else pinned(overrides))


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None,
            user_defaults: bool = False) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in `cwd` (outputs land in cwd/outputs), W&B offline, no progress bars."""
    full_env = {**os.environ, "KREA_SWEEPS_PROGRESS": "0", "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    args = list(args) if user_defaults else pinned(list(args))
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def run_entry_point():
    """run.py as the module `run` (imported once), so a test can call what `python run.py` calls without a new
    interpreter; a launcher's job process (submitit) unpickles its functions by that name, with the repository on
    PYTHONPATH. Hydra finds `conf/` next to the file of a task function whose module is `__main__` (under any other
    module name it would look for a `conf` package instead), so the task function keeps `__main__` as its module."""
    if "run" not in sys.modules:
        spec = importlib.util.spec_from_file_location("run", REPO / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["run"] = module
        spec.loader.exec_module(module)  # `if __name__ == "__main__"` (and its os._exit) does not run
        module.main.__wrapped__.__module__ = "__main__"
    return sys.modules["run"]


class FastExitInTest(BaseException):
    """`os._exit` reached during an in-process run: a BaseException, so no `except Exception` (the runner's failed-job
    handler, Hydra's error report) turns it into an ordinary failure."""


def run_in_process(args: list[str], cwd: Path, env: dict | None = None, session=None,
                   user_defaults: bool = False) -> subprocess.CompletedProcess:
    """What `python run.py ARGS` does in `cwd` — preflight, Hydra (run or multirun, the basic launcher runs the jobs
    here), the runner, the exit code — without paying a new interpreter's imports (~5 s a run). Isolated like a new
    process: a fresh `Session` (or `session`, for tests about reuse), Hydra's global state cleared, cwd, argv,
    environment (`env`: values to set, None to unset) and logging restored after; stdout/stderr captured.
    `SystemExit` becomes the return code; run.py's `os._exit` fast exit is never reached (only its `__main__` block
    calls it; any `os._exit` in this process while the run lasts fails the test instead of ending pytest)."""
    from hydra.core.global_hydra import GlobalHydra

    from krea_sweeps import session as sessions

    entry = run_entry_point()
    args = list(args) if user_defaults else pinned(list(args))
    overrides = {"KREA_SWEEPS_PROGRESS": "0", "HYDRA_FULL_ERROR": "0", **(env or {})}
    saved_env = {k: os.environ.get(k) for k in [*overrides, "WANDB_API_KEY"]}
    saved_argv, saved_cwd, saved_process = sys.argv[:], os.getcwd(), sessions._PROCESS[:]
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    code = 0
    real_exit, test_pid = os._exit, os.getpid()

    def no_exit(status):  # a forked child (not this process) may still leave the way it means to
        if os.getpid() != test_pid:
            real_exit(status)
        raise FastExitInTest(f"os._exit({status}) called inside the test process by `run.py {' '.join(args)}`")

    try:
        os._exit = no_exit
        os.environ.pop("WANDB_API_KEY", None)
        for k, v in overrides.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        sys.argv = [str(REPO / "run.py"), *map(str, args)]
        sessions._PROCESS[:] = [session if session is not None else sessions.Session()]
        GlobalHydra.instance().clear()
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                entry.run_command_line()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
    finally:
        os._exit = real_exit
        os.chdir(saved_cwd)
        GlobalHydra.instance().clear()
        sessions._PROCESS[:] = saved_process
        sys.argv = saved_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for handler in root.handlers[:]:  # Hydra's job logging: console (our StringIO) and the job's log file
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in saved_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved_level)
    return subprocess.CompletedProcess(["run.py", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(tmp_path):
    """`python run.py ARGS` in tmp_path, run in this process (see `run_in_process`)."""
    def _run(*args, **kw):
        kw.pop("timeout", None)
        return run_in_process(list(args), tmp_path, **kw)

    _run.cwd = tmp_path
    return _run


@pytest.fixture
def cli_process(tmp_path):
    """`python run.py ARGS` in tmp_path as a real subprocess: for the end-to-end tests about the process itself."""
    def _run(*args, **kw):
        return run_cli(list(args), tmp_path, **kw)

    _run.cwd = tmp_path
    return _run
