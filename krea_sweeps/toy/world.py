"""The toy world: 64×64 scenes of one or two flat shapes on a coloured background, with captions and masks.

Everything is drawn from a seed (numpy's PCG64), so a scene, its caption and its masks are ground truth that any
metric can be scored against. A held-out split keeps some (colour, shape) pairs out of training altogether: prompt
following on them is composition, not recall.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..prompts import PromptSet

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {  # object colours, RGB 0-255: far apart so the nearest palette colour is unambiguous
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 210, 40), "purple": (140, 50, 190), "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (235, 235, 235), "black": (20, 20, 20), "teal": (30, 130, 130)}
SIZES = {"small": 8, "large": 13}  # half-extent in pixels
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "centre": (32, 32)}  # (x, y)
POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                  "centre": "in the centre"}
PAIRS = (("left", "right"), ("top", "bottom"))  # two-object layouts: objects never overlap
JITTER = 2  # pixels of positional jitter, so the model learns regions rather than one pixel grid
# (colour, shape) pairs never drawn for training, in either object of a scene.
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "triangle"),
            ("purple", "circle"), ("orange", "square"))


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str
    dx: int = 0
    dy: int = 0

    @property
    def centre(self) -> tuple[int, int]:
        x, y = POSITIONS[self.position]
        return x + self.dx, y + self.dy

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITION_WORDS[self.position]}"

    def mask(self) -> np.ndarray:
        """[SIZE, SIZE] bool: the pixels the shape covers."""
        cx, cy = self.centre
        r = SIZES[self.size]
        y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
        if self.shape == "circle":
            return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        if self.shape == "square":
            s = 0.85 * r
            return (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
        top, bottom = cy - r, cy + 0.8 * r  # an upright isosceles triangle
        half_width = r * (y - top) / (bottom - top)
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"

    def masks(self) -> np.ndarray:
        """[n_objects, SIZE, SIZE] bool: the pixels of each object that are visible (later objects on top)."""
        masks = np.stack([o.mask() for o in self.objects])
        for i in range(len(masks) - 1):
            masks[i] &= ~masks[i + 1 :].any(0)
        return masks

    def render(self) -> np.ndarray:
        """[SIZE, SIZE, 3] uint8."""
        image = np.empty((SIZE, SIZE, 3), np.uint8)
        image[:] = BACKGROUNDS[self.background]
        for obj, mask in zip(self.objects, self.masks()):
            image[mask] = COLOURS[obj.colour]
        return image

    def describe(self) -> dict:
        """The scene as plain data (for result.json): caption, background, each object's attributes and centre."""
        return {"caption": self.caption, "background": self.background,
                "objects": [{**asdict(o), "centre": list(o.centre)} for o in self.objects]}


def is_held_out(colour: str, shape: str) -> bool:
    return (colour, shape) in HELD_OUT


def _draw_object(rng: np.random.Generator, position: str, held_out: bool, avoid_colour: str | None = None) -> Obj:
    """One object at `position` whose (colour, shape) pair is held out or not, as asked."""
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        dx, dy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2))
        if is_held_out(colour, shape) == held_out and colour != avoid_colour:
            return Obj(shape, colour, size, position, dx, dy)


def draw_scene(rng: np.random.Generator, split: str = "train", two_object_fraction: float = 0.4) -> Scene:
    """A random scene. `train`: no held-out pair anywhere, one or two objects; `heldout`: one object with a held-out
    (colour, shape) pair; `single`: one object, training pairs only."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if split == "train" and rng.random() < two_object_fraction:
        pair = PAIRS[rng.integers(len(PAIRS))]
        first, second = pair if rng.random() < 0.5 else pair[::-1]
        a = _draw_object(rng, first, held_out=False)
        return Scene((a, _draw_object(rng, second, held_out=False, avoid_colour=a.colour)), background)
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    return Scene((_draw_object(rng, position, held_out=(split == "heldout")),), background)


def draw_scenes(seed: int, n: int, split: str = "train", **kw) -> list[Scene]:
    """`n` scenes from `seed`: the same list on every machine (numpy's PCG64 is platform-independent)."""
    rng = np.random.default_rng(seed)
    return [draw_scene(rng, split, **kw) for _ in range(n)]


def all_single_object_scenes(split: str = "heldout") -> list[Scene]:
    """Every single-object scene without jitter whose (colour, shape) pair is held out (or, `train`, not held out)."""
    out = []
    for shape in SHAPES:
        for colour in COLOURS:
            if is_held_out(colour, shape) != (split == "heldout"):
                continue
            for size in SIZES:
                for position in POSITIONS:
                    for background in BACKGROUNDS:
                        out.append(Scene((Obj(shape, colour, size, position),), background))
    return out


def parse_caption(caption: str) -> Scene | None:
    """The jitter-free scene a caption of this world describes, or None for any other text (so prompts typed by hand
    in the world's grammar also get ground truth)."""
    text = caption.strip()
    for background in BACKGROUNDS:
        tail = f" on a {background} background"
        if text.endswith(tail):
            phrases = text[: -len(tail)].split(" and ")
            objects = [_parse_phrase(p) for p in phrases]
            if objects and all(o is not None for o in objects):
                return Scene(tuple(objects), background)
    return None


def _parse_phrase(phrase: str) -> Obj | None:
    for position, words in POSITION_WORDS.items():
        if phrase.endswith(" " + words):
            parts = phrase[: -len(words) - 1].split(" ")
            if len(parts) == 4 and parts[0] == "a" and parts[1] in SIZES and parts[2] in COLOURS and parts[3] in SHAPES:
                return Obj(parts[3], parts[2], parts[1], position)
    return None


# ---------------------------------------------------------------------------------------------- prompts = toy
@dataclass
class WorldPrompts(PromptSet):
    """`prompts=toy`: captions of the world, so every image has ground truth (the job record carries each prompt's
    objects and `arrays/scenes.masks_pNN.npy`). Any other text may be given too (`prompts.prompts=[…]` keeps working
    on the default prompt set); it simply has no scene (`null` in the record)."""

    name: str = "toy"
    prompts: list[str] = field(default_factory=list)

    def scenes(self) -> list[Scene | None]:
        """Each prompt's scene, or None for text outside the world's grammar."""
        return [parse_caption(p) for p in self.prompts]

    def ground_truth(self, arrays_dir) -> list[dict | None]:
        """Each prompt's scene as data, its masks saved as `arrays/scenes.masks_pNN.npy` [n_objects, 64, 64] bool."""
        from pathlib import Path

        out = []
        for i, scene in enumerate(self.scenes()):
            if scene is None:
                out.append(None)
                continue
            Path(arrays_dir).mkdir(parents=True, exist_ok=True)
            file = Path(arrays_dir) / f"scenes.masks_p{i:02d}.npy"
            np.save(file, scene.masks())
            out.append({**scene.describe(), "masks": str(Path("arrays") / file.name)})
        return out
