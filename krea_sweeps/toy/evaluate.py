"""Score the toy Krea 2 against its world: `python -m krea_sweeps.toy.evaluate [--scenes 90] [--out FILE]`.

Prompt following: every held-out single-object caption (a (colour, shape) pair never seen in training) is generated
through Krea2Pipeline (Raw: 28 steps, CFG; Turbo: 8 steps, no CFG — the variants' own configs) and read back against
its scene: the colour of the pixels inside the object's mask (nearest palette colour), the object's position (the
centroid of the non-background pixels, nearest named position), its size (their area, nearest of small/large) and
the background (border pixels). Accuracy per attribute.

Interventions: solo / leave-one-out at L20, knockout of key L20, rebalance (deep_boost), built from their own
`conf/intervention/*.yaml`, change each image by mean |Δpixel| against the stock image of the same seed; the ratio to
seed-to-seed noise (mean |Δpixel| between stock images of different seeds, same prompt) says whether the effect is
visible above what a reseed does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from . import world

REPO = Path(__file__).resolve().parents[2]
FOREGROUND_DISTANCE = 60.0  # RGB distance (0-255) from the background above which a pixel belongs to an object
INTERVENTIONS = {  # label -> (conf/intervention/<name>.yaml, overrides)
    "solo L20": ("solo", {"layer": 20}),
    "leave_one_out L20": ("leave_one_out", {"layer": 20}),
    "knockout L20": ("knockout", {"keys": ["L20"]}),
    "rebalance deep_boost": ("rebalance", {"preset": "deep_boost", "strength": 1.0}),
}


# -------------------------------------------------------------------------------------------------- reading images
def _nearest(palette: dict[str, tuple], rgb: np.ndarray) -> str:
    names = list(palette)
    dist = ((np.array([palette[n] for n in names], np.float32) - rgb) ** 2).sum(-1)
    return names[int(dist.argmin())]


def read_scene(image: np.ndarray, scene: world.Scene) -> dict:
    """What an image [H, W, 3] (floats in [0, 1] or uint8) shows, read against `scene`: per object the colour inside
    its mask; where the object is (centroid → nearest named position) and how big (area → nearest size), from the
    pixels that are not background in a one-object scene — so position does not depend on the colour being right —
    and from the pixels nearest the object's colour when there are several; their IoU with its mask; the
    background (median of the border)."""
    img = image.astype(np.float32) * (255.0 if image.dtype != np.uint8 else 1.0)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    palette = {**world.COLOURS, "_background": tuple(background)}
    names = list(palette)
    dist = ((img[:, :, None, :] - np.array([palette[n] for n in names], np.float32)) ** 2).sum(-1)
    label = np.array(names)[dist.argmin(-1)]
    foreground = np.sqrt(((img - background) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    objects = []
    for obj, mask in zip(scene.objects, scene.masks()):
        pixels = foreground if len(scene.objects) == 1 else label == obj.colour
        area = int(pixels.sum())
        if area:
            ys, xs = np.nonzero(pixels)
            centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
            anchors = {k: np.array(v, np.float32) for k, v in world.POSITIONS.items()}
            position = min(anchors, key=lambda k: float(((anchors[k] - centre) ** 2).sum()))
        else:
            position = None
        expected = {s: world.Obj(obj.shape, obj.colour, s, obj.position).mask().sum() for s in world.SIZES}
        size = min(expected, key=lambda s: abs(expected[s] - area)) if area else None
        iou = float((pixels & mask).sum() / max(1, (pixels | mask).sum()))
        objects.append({"colour": _nearest(world.COLOURS, img[mask].mean(0)), "position": position, "size": size,
                        "iou": iou})
    return {"background": _nearest(world.BACKGROUNDS, background), "objects": objects}


def score(reading: dict, scene: world.Scene) -> dict[str, bool]:
    """Per-attribute correctness of one reading (objects' attributes all right for multi-object scenes)."""
    pairs = list(zip(reading["objects"], scene.objects))
    out = {key: all(r[key] == getattr(o, key) for r, o in pairs) for key in ("colour", "position", "size")}
    out["background"] = reading["background"] == scene.background
    out["colour+position"] = out["colour"] and out["position"]
    return out


def accuracy(scores: list[dict[str, bool]]) -> dict[str, float]:
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


# -------------------------------------------------------------------------------------------------- generating
def compose_config(overrides: list[str]):
    """The repository's `conf/` composed with `overrides`, as `python run.py` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ..plan import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def toy_model(variant: str):
    """The toy variant as `python run.py model=<variant> model/synthetic_weights=toy` builds it, and its sampler."""
    from ..models import LoadedModel
    from ..plan import instantiate

    cfg = compose_config([f"model={variant}", "model/synthetic_weights=toy", "sampler.batch_seeds=true"])
    model_variant = instantiate(cfg.model, "model")
    sampler = instantiate(cfg.sampler, "sampler").resolved(model_variant)
    return LoadedModel(model_variant), sampler


def generate(model, sampler, prompts: list[str], seeds: list[int], interventions: list | None = None) -> np.ndarray:
    """[P, S, H, W, 3] images through Krea2Pipeline, with `interventions` attached around the generation."""
    from contextlib import nullcontext

    from ..interventions import InterventionContext, applied
    from ..prompts import EncodeCache
    from ..sampler import generate_many

    cache = EncodeCache(None)
    encode = lambda ps: cache.get(model, ps, sampler.max_sequence_length)  # noqa: E731
    encoded, negative = encode(prompts), encode([sampler.negative_prompt])
    pipe = model.pipeline()
    ctx = InterventionContext(text_path=model.text_path, encode=encode, num_steps=sampler.steps,
                              guidance=sampler.guidance)
    scope = applied(interventions, ctx) if interventions else nullcontext()
    with scope:
        return np.stack([np.stack(generate_many(pipe, sampler, encoded.index(i), negative, seeds,
                                                denoising=ctx.denoising)) for i in range(len(prompts))])


def build_intervention(name: str, overrides: dict):
    """`intervention=<name>` with `overrides`, composed as `python run.py` composes it (its schema and defaults)."""
    from ..plan import instantiate

    values = [f"intervention.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()]
    cfg = compose_config([f"intervention={name}", *values])
    intervention = instantiate(cfg.intervention, "intervention")
    intervention.config_key = "intervention"
    return intervention


def prompt_following(variant: str, scenes: list[world.Scene], seed: int = 0) -> dict:
    model, sampler = toy_model(variant)
    t0 = time.perf_counter()
    images = generate(model, sampler, [s.caption for s in scenes], [seed])[:, 0]
    scores = [score(read_scene(img, s), s) for img, s in zip(images, scenes)]
    return {"accuracy": accuracy(scores), "n": len(scenes), "steps": sampler.steps, "guidance": sampler.guidance,
            "seconds": round(time.perf_counter() - t0, 1)}


def vae_alone(scenes: list[world.Scene]) -> dict:
    """The same reading on the true images encoded and decoded by the toy's VAE: the ceiling the VAE puts on what any
    DiT can show (toy-train-v1's VAE got a third of object colours right here; v2's whitened code keeps them all)."""
    import torch

    model, _ = toy_model("turbo")
    arr = np.stack([s.render() for s in scenes]).astype(np.float32) / 127.5 - 1.0
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).unsqueeze(2)
    with torch.no_grad():
        decoded = model.vae.decode(model.vae.encode(x).latent_dist.mean).sample[:, :, 0]
    images = ((decoded.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return {"accuracy": accuracy([score(read_scene(img, s), s) for img, s in zip(images, scenes)]), "n": len(scenes)}


def effect_ratios(variant: str, scenes: list[world.Scene], seeds: list[int]) -> dict:
    model, sampler = toy_model(variant)
    prompts = [s.caption for s in scenes]
    stock = generate(model, sampler, prompts, seeds)
    noise = float(np.mean([np.abs(stock[:, a] - stock[:, b]).mean() for a, b in itertools.combinations(
        range(len(seeds)), 2)]))
    out = {"seed_noise": noise}
    for label, (name, overrides) in INTERVENTIONS.items():
        changed = generate(model, sampler, prompts, seeds, [build_intervention(name, overrides)])
        change = float(np.abs(changed - stock).mean())
        out[label] = {"change": change, "ratio": change / noise}
    return out


def map_scores(scenes: list[world.Scene], variant: str = "turbo", seed: int = 0) -> dict:
    """The `word_maps` metric on `scenes` (exact DiT attention, averaged over blocks and steps) scored by the metric
    itself against the masks — pointing game and area-matched IoU of each object word (size, colour, shape) — and the
    same maps with their cells shuffled (chance for those masks), recomputed here from the saved arrays."""
    import contextlib
    import tempfile

    from ..plan import plan
    from ..session import Session
    from ..task import execute
    from .ground_truth import mask_iou, pointing_game

    captions = ",".join(s.caption for s in scenes)
    cfg = compose_config([f"model={variant}", "model/synthetic_weights=toy", "prompts=toy",
                          f"prompts.prompts=[{captions}]", f"seeds=[{seed}]", "metrics=[word_maps]",
                          "metrics.word_maps.compare_stock=false", "wandb.mode=disabled", "figures=false"])
    rng = np.random.default_rng(0)
    chance = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        job = plan(cfg)
        summary = execute(job, Session()).record["summary"]
        arrays = Path(tmp) / job.job_dir / "arrays"
        for p, scene in enumerate(job.prompt_set.scenes()):
            words = [str(w) for w in np.load(arrays / f"word_maps.p{p:02d}.words.npy")]
            grid = np.load(arrays / f"word_maps.p{p:02d}_s{seed}.grid.npy")
            mask = scene.masks()[0]
            for word in (scene.objects[0].size, scene.objects[0].colour, scene.objects[0].shape):
                shuffled = [rng.permutation(grid[words.index(word)].ravel()).reshape(grid.shape[1:]) for _ in range(50)]
                chance.append((np.mean([pointing_game(m, mask) for m in shuffled]),
                               np.mean([mask_iou(m, mask) for m in shuffled])))
    chance_pointing, chance_iou = np.mean(chance, axis=0)
    return {"n": len(scenes), "pointing": summary["word_maps/pointing"], "mask_iou": summary["word_maps/mask_iou"],
            "shuffled_pointing": float(chance_pointing), "shuffled_mask_iou": float(chance_iou)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=90, help="held-out single-object scenes to score (of 180)")
    parser.add_argument("--effect-prompts", type=int, default=6)
    parser.add_argument("--variants", nargs="*", default=["raw", "turbo"])
    parser.add_argument("--map-scenes", type=int, default=26, help="held-out captions (every 7th) for the word maps")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    held_out = world.all_single_object_scenes("heldout")
    scenes = [held_out[i] for i in sorted(rng.choice(len(held_out), min(args.scenes, len(held_out)), replace=False))]
    effect_scenes = scenes[:: max(1, len(scenes) // args.effect_prompts)][: args.effect_prompts]
    report = {"vae": vae_alone(held_out)}
    print("vae", json.dumps(report["vae"]))
    for variant in args.variants:
        report[variant] = {"held_out_single": prompt_following(variant, scenes),
                           "effects": effect_ratios(variant, effect_scenes, [0, 1, 2])}
        print(variant, json.dumps(report[variant], indent=1))
    if args.map_scenes:
        report["word_maps"] = map_scores(held_out[::7][: args.map_scenes])
        print("word_maps", json.dumps(report["word_maps"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
