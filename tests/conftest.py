"""Shared fixtures: the synthetic model loaded once per test session, Hydra composition, CLI runs."""

from __future__ import annotations

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

    return LoadedModel(ModelVariant(name="turbo", is_distilled=True, steps=8, guidance=0.0), session.models)


@pytest.fixture(scope="session")
def raw(session):
    from krea_sweeps.models import LoadedModel, ModelVariant

    return LoadedModel(ModelVariant(name="raw"), session.models)


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

    return LoadedModel(ModelVariant(name="turbo", is_distilled=True, steps=8, guidance=0.0,
                                    synthetic_weights=ToyWeights()))


@pytest.fixture(scope="session")
def toy_raw():
    from krea_sweeps.models import LoadedModel, ModelVariant
    from krea_sweeps.toy.checkpoints import ToyWeights

    return LoadedModel(ModelVariant(name="raw", synthetic_weights=ToyWeights()))


def compose(overrides: list[str] | None = None):
    """The composed config for `overrides`, as run.py would see it (without running)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from krea_sweeps.plan import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in `cwd` (outputs land in cwd/outputs), W&B offline, no progress bars."""
    full_env = {**os.environ, "KREA_SWEEPS_PROGRESS": "0", "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def cli(tmp_path):
    def _run(*args, **kw):
        return run_cli(list(args), tmp_path, **kw)

    _run.cwd = tmp_path
    return _run
