"""`krea-export`: write the model card's projector files from any Krea 2 checkpoint — or the synthetic model.

    krea-export --checkpoint /models/krea2_turbo.safetensors --out exports/turbo
    krea-export --synthetic turbo --out exports/synthetic --leave-one-out L20 --rebalance deep_boost
    python -m krea_sweeps.export --checkpoint /models/Krea-2-Raw   # a diffusers folder (sharded or not)

Only the projector tensor is read (a safetensors slice through `safe_open`): no model is built, so it takes a second
on a 26 GB checkpoint. Files written (the seed's format, loadable by ComfyUI's stock LoraLoaderModelOnly):

    krea2_projector_original_weights.safetensors      the [1, 12] weight itself (`txtfusion.projector.weight`)
    solo/projector_solo_bNN_Lxx.safetensors           12 probes: keep slot NN (layer xx), zero the other 11
    rebalance/projector_rebalance_<name>.safetensors  per --rebalance (default deep_boost)
    leave_one_out/projector_loo_bNN_Lxx.safetensors   per --leave-one-out slot

Each probe holds ONE tensor `diffusion_model.txtfusion.projector.diff` [1, 12] = w ⊙ (g − 1), so w + s·diff is the
model card's w ⊙ (1 + s(g − 1)); the gains, slot and source are in the file's metadata. `intervention=lora_file`
reads them back.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from .errors import ConfigError, require
from .files import atomic_write
from .interventions.projector import DIFF_KEY, PRESETS, diff_of
from .interventions.sites import NUM_SLOTS, gains_vector, layer_of, slot_indices
from .synthetic import SELECT_LAYERS

ORIGINAL_FILE = "krea2_projector_original_weights.safetensors"
ORIGINAL_KEY = "txtfusion.projector.weight"


def read_projector(source: str) -> tuple[torch.Tensor, str]:
    """The [1, 12] projector weight of a single-file checkpoint or a diffusers folder, read alone, and its key."""
    from .models import read_projector_weight

    path = Path(source).expanduser()
    require(path.exists(), "--checkpoint", f"{path} does not exist", "give a Krea 2 .safetensors or diffusers folder")
    return read_projector_weight(str(path), "--checkpoint")


def synthetic_checkpoint(variant: str) -> str:
    from .synthetic import ensure_synthetic_checkpoints

    return str(ensure_synthetic_checkpoints() / f"krea2_{variant}.safetensors")


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return path


def write_diff(path: Path, weight: torch.Tensor, gains: list[float], meta: dict) -> Path:
    return _write(path, {DIFF_KEY: diff_of(weight, gains)},
                  {"format": "krea2-projector-diff", "gains": gains, "select_layers": list(SELECT_LAYERS),
                   "apply": "w' = w + strength * diff (strength 1 = w * gains)", **meta})


def solo_name(slot: int) -> str:
    return f"projector_solo_b{slot:02d}_L{layer_of(slot):02d}.safetensors"


def rebalance_spec(text: str) -> tuple[str, list[float]]:
    """`deep_boost` → the preset; `1,1,...` (12 numbers) → custom-<hash>."""
    if text in PRESETS:
        return text, [float(g) for g in PRESETS[text]]
    try:
        gains = [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError("--rebalance", f"{text!r} is neither a preset nor 12 numbers",
                          f"use one of {', '.join(PRESETS)} or 12 comma-separated gains") from None
    gains = gains_vector(gains, "--rebalance")
    return "custom-" + hashlib.sha1(json.dumps(gains).encode()).hexdigest()[:8], gains


def export(weight: torch.Tensor, out: Path, source: str, rebalance: list[str] = ("deep_boost",),
           leave_one_out: list[int] = (), solo: bool = True) -> list[Path]:
    """Write the seed-format files for `weight` under `out`; returns the paths written."""
    require(bool(torch.isfinite(weight).all()), "--checkpoint", "the projector holds NaN/inf", "check the checkpoint")
    meta = {"source": source, "source_weight": [float(x) for x in weight.float().view(-1)]}
    written = [_write(out / ORIGINAL_FILE, {ORIGINAL_KEY: weight.detach().cpu().view(1, NUM_SLOTS)},
                      {"format": "krea2-projector-weight", "select_layers": list(SELECT_LAYERS),
                       "note": "reference copy of the learned weights, not a patch", "source": source})]
    if solo:
        for k in range(NUM_SLOTS):
            gains = [1.0 if i == k else 0.0 for i in range(NUM_SLOTS)]
            written.append(write_diff(out / "solo" / solo_name(k), weight, gains,
                                      {"kind": "solo", "slot": str(k), "layer": str(layer_of(k)), **meta}))
    for spec in rebalance:
        name, gains = rebalance_spec(spec)
        written.append(write_diff(out / "rebalance" / f"projector_rebalance_{name}.safetensors", weight, gains,
                                  {"kind": "rebalance", "preset": name, **meta}))
    for k in leave_one_out:
        gains = [0.0 if i == k else 1.0 for i in range(NUM_SLOTS)]
        written.append(write_diff(out / "leave_one_out" / f"projector_loo_b{k:02d}_L{layer_of(k):02d}.safetensors",
                                  weight, gains, {"kind": "leave_one_out", "slot": str(k), "layer": str(layer_of(k)),
                                                  **meta}))
    return written


def check_out(out: Path) -> None:
    """`--out` is a folder we can write into (or create)."""
    require(not out.exists() or out.is_dir(), "--out", f"{out} is a file, not a folder",
            "give a folder, e.g. --out exports")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    require(os.access(existing, os.W_OK | os.X_OK), "--out", f"{existing} is not writable",
            "choose a folder you can write to")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="krea-export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="Krea 2 DiT .safetensors (original/ComfyUI or diffusers names) or diffusers "
                                          "folder; only the projector tensor is read")
    src.add_argument("--synthetic", choices=("turbo", "raw"), help="the synthetic model's projector (default: turbo)")
    parser.add_argument("--out", default="exports", help="output folder (default: exports)")
    parser.add_argument("--rebalance", action="append", default=None,
                        help=f"preset ({', '.join(PRESETS)}) or 12 comma-separated gains; repeatable "
                             "(default: deep_boost; 'none' for no rebalance file)")
    parser.add_argument("--leave-one-out", nargs="*", default=[], metavar="SLOT",
                        help="slots (0-11) or layers (L20) to write leave-one-out diffs for; 'all' for the 12")
    parser.add_argument("--no-solo", action="store_true", help="skip the 12 solo probes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # every argument is checked before the model is read and before the first file is written
        check_out(Path(args.out))
        rebalance = ["deep_boost"] if args.rebalance is None else [r for r in args.rebalance if r != "none"]
        for spec in rebalance:
            rebalance_spec(spec)
        loo = list(range(NUM_SLOTS)) if args.leave_one_out == ["all"] else slot_indices(args.leave_one_out,
                                                                                        "--leave-one-out")
        source = args.checkpoint or synthetic_checkpoint(args.synthetic or "turbo")
        weight, key = read_projector(source)
        written = export(weight, Path(args.out), f"{source}:{key}", rebalance, loo, solo=not args.no_solo)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a permission lost after the check
        print(f"error: config key `--out`: cannot write under {args.out} ({e.strerror or e}) — choose a writable "
              "folder with free space", file=sys.stderr)
        return 2
    print(f"projector of {source} ({key}): w = {[round(float(x), 4) for x in weight.float().view(-1)]}")
    print(f"wrote {len(written)} files under {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
