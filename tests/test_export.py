"""`krea-export` writes the model card's files (read back by `intervention=lora_file`) without loading a model."""

from __future__ import annotations

import json
import struct
import sys

import pytest
import torch

from krea_sweeps.errors import ConfigError
from krea_sweeps.export import ORIGINAL_FILE, main, read_projector, synthetic_checkpoint
from krea_sweeps.interventions import DIFF_KEY, InterventionContext, LeaveOneOut, LoraFile, Rebalance, Solo, applied
from krea_sweeps.synthetic import SELECT_LAYERS, projector_values


def safetensors_header(path) -> dict:
    """The JSON header straight from the bytes: u64 little-endian length, then JSON."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["_data_bytes"] = len(raw) - 8 - n
    return header


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from krea_sweeps.memory import ModelCache

    out = tmp_path_factory.mktemp("export")
    fetched, real_get = [], ModelCache.get
    ModelCache.get = lambda self, key, *a, **kw: fetched.append(key[0]) or real_get(self, key, *a, **kw)
    try:
        assert main(["--synthetic", "turbo", "--out", str(out), "--leave-one-out", "L20"]) == 0
    finally:
        ModelCache.get = real_get
    assert fetched == []  # no model part was loaded: only the projector tensor was read
    return out


def test_export_writes_the_seed_files(exported):
    files = sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*.safetensors"))
    solo = [f"solo/projector_solo_b{k:02d}_L{layer:02d}.safetensors" for k, layer in enumerate(SELECT_LAYERS)]
    assert files == sorted([ORIGINAL_FILE, *solo, "rebalance/projector_rebalance_deep_boost.safetensors",
                            "leave_one_out/projector_loo_b06_L20.safetensors"])
    original = safetensors_header(exported / ORIGINAL_FILE)
    assert original["txtfusion.projector.weight"]["shape"] == [1, 12]
    from safetensors.torch import load_file

    weight = load_file(str(exported / ORIGINAL_FILE))["txtfusion.projector.weight"]
    assert weight.view(-1).tolist() == projector_values()["turbo"]


def test_each_probe_is_exactly_one_diff_tensor(exported):
    for path in exported.rglob("*.safetensors"):
        if path.name == ORIGINAL_FILE:
            continue
        header = safetensors_header(path)
        metadata = header.pop("__metadata__")
        data = header.pop("_data_bytes")
        assert list(header) == [DIFF_KEY], path
        assert header[DIFF_KEY]["shape"] == [1, 12] and header[DIFF_KEY]["dtype"] == "F32"
        assert data == 12 * 4 and path.stat().st_size < 2000
        assert len(json.loads(metadata["gains"])) == 12


def test_solo_file_is_w_times_g_minus_one(exported):
    from safetensors.torch import load_file

    w = torch.tensor(projector_values()["turbo"])
    diff = load_file(str(exported / "solo/projector_solo_b06_L20.safetensors"))[DIFF_KEY].view(-1)
    expected = -w
    expected[6] = 0.0
    assert torch.equal(diff, expected)


def test_round_trip_gives_the_same_effective_weights_and_outputs(exported, turbo):
    weight = turbo.text_path.text_fusion.projector.weight
    for k, layer in enumerate(SELECT_LAYERS):
        lora = LoraFile(path=str(exported / f"solo/projector_solo_b{k:02d}_L{layer:02d}.safetensors"))
        assert torch.equal(lora.effective_weight(weight), Solo(slot=k).effective_weight(weight))
        assert {"site": "projector", "file_kind": "solo", "slot": k, "layer": layer}.items() <= lora.describe().items()
        half = LoraFile(path=lora.path, strength=0.5).effective_weight(weight)
        assert torch.allclose(half, Solo(slot=k, strength=0.5).effective_weight(weight), atol=1e-7)
    rebalance = LoraFile(path=str(exported / "rebalance/projector_rebalance_deep_boost.safetensors"), strength=0.8)
    assert rebalance.file_gains == Rebalance().gains
    assert torch.allclose(rebalance.effective_weight(weight), Rebalance(strength=0.8).effective_weight(weight),
                          atol=1e-6)
    loo = LoraFile(path=str(exported / "leave_one_out/projector_loo_b06_L20.safetensors"))
    assert torch.equal(loo.effective_weight(weight), LeaveOneOut(layer=20).effective_weight(weight))

    enc = turbo.text_path  # through the hooks, on the text path
    from krea_sweeps.prompts import EncodeCache

    e = EncodeCache(None).get(turbo, ["a bicycle leaning on a wall"], 32)
    ctx = InterventionContext(text_path=enc)
    outs = []
    for intervention in (LoraFile(path=str(exported / "solo/projector_solo_b03_L11.safetensors")), Solo(layer=11)):
        with torch.no_grad(), applied([intervention], ctx):
            outs.append(enc(e.taps, e.mask))
    assert torch.equal(*outs)


def test_lora_file_rejects_wrong_key_shape_or_content(tmp_path):
    from safetensors.torch import save_file

    cases = {
        "key.safetensors": {"diffusion_model.txtfusion.projector.weight": torch.zeros(1, 12)},
        "shape.safetensors": {DIFF_KEY: torch.zeros(12)},
        "extra.safetensors": {DIFF_KEY: torch.zeros(1, 12), "other": torch.zeros(1)},
        "nan.safetensors": {DIFF_KEY: torch.full((1, 12), float("nan"))},
    }
    for name, tensors in cases.items():
        save_file(tensors, str(tmp_path / name))
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    for name in [*cases, "garbage.safetensors", "missing.safetensors"]:
        with pytest.raises(ConfigError) as info:
            LoraFile(path=str(tmp_path / name))
        assert info.value.key == "intervention.path" and "\n" not in str(info.value), name


def test_export_reads_diffusers_names_and_rejects_non_krea(tmp_path):
    from safetensors.torch import save_file

    w = torch.arange(12, dtype=torch.bfloat16).view(1, 12)
    save_file({"text_fusion.projector.weight": w, "transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4)},
              str(tmp_path / "diffusers_names.safetensors"))
    weight, key = read_projector(str(tmp_path / "diffusers_names.safetensors"))
    assert key == "text_fusion.projector.weight" and torch.equal(weight, w)
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError):
        read_projector(str(tmp_path / "other.safetensors"))
    assert main(["--checkpoint", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert main(["--checkpoint", str(tmp_path / "diffusers_names.safetensors"), "--out", str(tmp_path / "y"),
                 "--rebalance", ",".join(["2"] * 12), "--no-solo"]) == 0
    assert len(list((tmp_path / "y").rglob("*.safetensors"))) == 2


def test_module_entry_point(tmp_path, monkeypatch):
    """`python -m krea_sweeps.export …`: the module's `__main__` block, run here with that argv (runpy, as -m)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["krea_sweeps.export", "--checkpoint", synthetic_checkpoint("raw"),
                                      "--out", str(tmp_path), "--rebalance", "none", "--no-solo"])
    monkeypatch.delitem(sys.modules, "krea_sweeps.export")  # as in a new process: not imported before it runs
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("krea_sweeps.export", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    assert [p.name for p in tmp_path.rglob("*.safetensors")] == [ORIGINAL_FILE]
