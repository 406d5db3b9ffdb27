"""examples/ (docs/extending.md): a user's op and metric, each <= 30 lines in their own module, used from the command
line, and the tests a user writes for them — run here, and their effect checked against an independent computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_in_process
from krea_sweeps.prompts import EncodeCache

EXAMPLES = REPO / "examples"
ENV = {"PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("name", ["clip_states.py", "fused_peak.py"])
def test_each_example_is_at_most_30_lines(name):
    assert len((EXAMPLES / name).read_text().splitlines()) <= 30


def test_the_examples_run_from_the_command_line_and_do_what_they_say(tmp_path, monkeypatch, session, turbo):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # what PYTHONPATH=examples does for `python run.py`
    proc = run_in_process(["conditioning_only=true", "model=turbo", "wandb.mode=disabled", "metrics=[]",
                    "intervention._target_=clip_states.ClipStates", "+intervention.limit=0.05",
                    "+intervention.site=taps", "+metrics.fused_peak={_target_: fused_peak.FusedPeak}"],
                   tmp_path, session=session)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [result] = list((tmp_path / "outputs").rglob("result.json"))
    record = json.loads(result.read_text())
    assert record["interventions"] == [{"kind": "clip", "apply_to": "cond", "steps": None, "site": "taps",
                                        "limit": 0.05}]
    # Independent: the stock text path on the prompts as encoded, and on their taps clipped by hand (no hooks).
    prompts = record["config"]["prompts"]["prompts"]
    enc = EncodeCache(None).get(turbo, prompts, record["config"]["sampler"]["max_sequence_length"])
    with torch.no_grad():
        stock = float(turbo.text_path(enc.taps, enc.mask).abs().max())
        clipped = float(turbo.text_path(enc.taps.clamp(-0.05, 0.05), enc.mask).abs().max())
    summary = record["summary"]
    assert summary["fused_peak/stock"] == pytest.approx(stock, rel=1e-6)
    assert summary["fused_peak/job"] == pytest.approx(clipped, rel=1e-6)
    assert summary["fused_peak/job"] != pytest.approx(summary["fused_peak/stock"], rel=1e-3)


def test_an_op_at_a_site_that_does_not_take_it_is_one_line_before_any_load(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    proc = run_in_process(["conditioning_only=true", "model=turbo", "wandb.mode=disabled", "metrics=[]",
                    "intervention._target_=clip_states.ClipStates", "+intervention.site=projector"], tmp_path)
    assert proc.returncode != 0
    assert "config key `intervention.site`" in proc.stderr and "use one of: taps, slots, block, fused" in proc.stderr
    assert "loading" not in proc.stderr


def test_the_users_own_tests_pass():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES)],
                          cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 passed" in proc.stdout


def test_docs_extending_shows_the_example_files_as_they_are():
    doc = (REPO / "docs" / "extending.md").read_text()
    for name in ("clip_states.py", "fused_peak.py", "test_clip_states.py"):
        assert f"```python\n{(EXAMPLES / name).read_text()}```" in doc, name
