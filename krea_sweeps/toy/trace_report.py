"""Where the toy's text path carries an attribute: `python -m krea_sweeps.toy.trace_report outputs/toy_causal_tracing`.

Reads a finished `+experiment=toy_causal_tracing` sweep (one job per patched slot; caption pairs that differ in the
object's colour only) and prints, per slot: the image and conditioning restoration (metric `restoration`) and, read
against the scene as the evaluator reads images, how often the patched image shows the *clean* prompt's colour in the
object's mask — a ground-truth restoration that needs no distance. Then, from the single-(slot, token) heatmaps, which
token restores the most and how much of the total restoration sits on the colour word.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from . import world
from .evaluate import read_scene


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def slot_rows(sweep: Path) -> list[dict]:
    """One row per job (patched slot): restoration and the colour the patched images show."""
    rows = []
    for file in sorted(sweep.glob("*/result.json")):
        record = json.loads(file.read_text())
        if record.get("status") != "done":
            continue
        patch = next(i for i in record["interventions"] if i.get("kind", i.get("_target_", "")).endswith("patch")
                     or "pairs" in i)
        pairs = {b: a for a, b in patch["pairs"]}
        shows_clean = []
        seeds = record["config"]["seeds"]
        for p, prompt in enumerate(record["job"]["prompts"]):
            clean = world.parse_caption(pairs[prompt])
            scene = world.parse_caption(prompt)
            for s in seeds if isinstance(seeds, list) else [seeds]:
                image = load_image(file.parent / "images" / f"p{p:02d}_s{s}.png")
                shows_clean.append(read_scene(image, scene)["objects"][0]["colour"] == clean.objects[0].colour)
        rows.append({"slots": patch.get("slots"), "image": record["summary"].get("restoration/image"),
                     "cond": record["summary"].get("restoration/cond"), "shows_clean_colour": float(np.mean(shows_clean)),
                     "dir": file.parent})
    return sorted(rows, key=lambda r: list(r["slots"] or []))


def token_profile(job_dir: Path) -> list[dict]:
    """Per pair, from the single-patch heatmap [12 slots, tokens]: the token and slot restoring most, and the colour
    word's share of the positive restoration."""
    out = []
    for grid_file in sorted((job_dir / "arrays").glob("restoration.p*.grid.npy")):
        grid = np.nan_to_num(np.load(grid_file))
        tokens = [str(t).strip() for t in np.load(str(grid_file).replace(".grid.", ".tokens."))]
        slot, token = np.unravel_index(int(grid.argmax()), grid.shape)
        positive = np.clip(grid, 0, None)
        colour_cols = [i for i, t in enumerate(tokens) if t in world.COLOURS]
        share = float(positive[:, colour_cols].sum() / positive.sum()) if positive.sum() > 0 else float("nan")
        out.append({"pair": grid_file.name.split(".")[1], "best_token": tokens[token], "best_slot": int(slot),
                    "best": float(grid.max()), "colour_word_share": share,
                    "colour_word_by_slot": [round(float(v), 3) for v in grid[:, colour_cols].sum(1)]})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    args = parser.parse_args(argv)
    rows = slot_rows(args.sweep)
    print("slots | image restoration | cond restoration | patched image shows the clean colour")
    for r in rows:
        print(f"{r['slots']} | {r['image']:.3f} | {r['cond']:.3f} | {r['shows_clean_colour']:.2f}")
    if rows:
        for t in token_profile(rows[0]["dir"]):
            print(json.dumps(t))


if __name__ == "__main__":
    main()
