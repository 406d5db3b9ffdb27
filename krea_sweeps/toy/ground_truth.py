"""Scores of a spatial map (a word map, a concept map: any [h, w] array over the image) against a toy scene's masks.

Used by the word-map / concept-map metrics: a map for the word "circle" in "a large red circle on the left …"
should point inside that object's mask. Maps at the DiT's token grid (4×4 for a 64² toy image) are upsampled to the
image by nearest neighbour (each token owns a 16×16 block), so no interpolation decides the score.
"""

from __future__ import annotations

import numpy as np

from .world import Scene


def to_image_grid(heatmap: np.ndarray, size: int) -> np.ndarray:
    """[h, w] → [size, size] by repeating each cell (size must be a multiple of h and w)."""
    h, w = heatmap.shape
    if size % h or size % w:
        raise ValueError(f"a {h}×{w} map does not tile a {size}² image")
    return np.repeat(np.repeat(heatmap, size // h, axis=0), size // w, axis=1)


def pointing_game(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum falls inside the mask (any of the cells tied for the maximum)."""
    grid = to_image_grid(np.asarray(heatmap, np.float64), mask.shape[0])
    return bool(mask[grid == grid.max()].any())


def mask_iou(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the mask with the map's top pixels, as many as the mask has (area-matched, so no threshold to tune)."""
    grid = to_image_grid(np.asarray(heatmap, np.float64), mask.shape[0])
    k = int(mask.sum())
    if k == 0:
        return 0.0
    order = np.argsort(-grid.ravel(), kind="stable")[:k]
    top = np.zeros(mask.size, bool)
    top[order] = True
    top = top.reshape(mask.shape)
    return float((top & mask).sum() / (top | mask).sum())


def object_words(scene: Scene) -> list[tuple[int, list[str]]]:
    """(object index, the words that name it) for each object: its colour, its shape, its size."""
    return [(i, [o.size, o.colour, o.shape]) for i, o in enumerate(scene.objects)]


def score_word_maps(maps: dict[str, np.ndarray], scene: Scene) -> dict[str, dict]:
    """`maps`: word → [h, w] map for one prompt. For each word that names one of the scene's objects (and only one):
    pointing-game hit and area-matched mask IoU against that object's mask."""
    masks = scene.masks()
    named: dict[str, list[int]] = {}
    for i, words in object_words(scene):
        for word in words:
            named.setdefault(word, []).append(i)
    out = {}
    for word, heatmap in maps.items():
        objects = named.get(word, [])
        if len(objects) == 1:
            mask = masks[objects[0]]
            out[word] = {"object": objects[0], "pointing": pointing_game(heatmap, mask), "iou": mask_iou(heatmap, mask)}
    return out


# ------------------------------------------------------------------------------ the map metrics' ground-truth scores
GROUND_TRUTH_STATS = ("pointing", "mask_iou")  # summary keys `<metric>/pointing`, `<metric>/mask_iou`


def job_scenes(job) -> list[Scene | None] | None:
    """Each prompt's scene when the job's prompts come from the toy world (`prompts=toy`, or captions in its
    grammar), None when no prompt has one: then the map metrics report no ground-truth keys."""
    scenes = getattr(getattr(job, "prompt_set", None), "scenes", None)
    if scenes is None:
        return None
    found = scenes()
    return found if any(s is not None for s in found) else None


def score_named_maps(names: list[str], grid_maps: np.ndarray, scene: Scene | None) -> dict[str, dict]:
    """`score_word_maps` for maps given as parallel lists (a metric's words or concepts and its [n, h, w] maps);
    {} without a scene."""
    if scene is None:
        return {}
    return score_word_maps({name: grid_maps[i] for i, name in enumerate(names)}, scene)


def mean_scores(scored: list[dict]) -> dict[str, float]:
    """Pointing-game accuracy and mean mask IoU over scored words (NaN when nothing named an object)."""
    if not scored:
        return {k: float("nan") for k in GROUND_TRUTH_STATS}
    return {"pointing": float(np.mean([s["pointing"] for s in scored])),
            "mask_iou": float(np.mean([s["iou"] for s in scored]))}
