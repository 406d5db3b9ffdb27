"""Image-side metrics: what "detail / contrast / intensity" means in numbers, on [0, 1] RGB images."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TYPE_CHECKING

import numpy as np

from ..configs import ClipScoreFields
from ..errors import require
from .base import Metric, MetricOutput

if TYPE_CHECKING:
    from ..context import JobContext

log = logging.getLogger(__name__)

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def luminance(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ LUMA


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over interior pixels (no padding artefacts): 0 for a flat image."""
    lap = -4 * gray[1:-1, 1:-1] + gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]
    return float(lap.var())


def rms_contrast(gray: np.ndarray) -> float:
    return float(gray.std())


def colourfulness(image: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003) on [0, 1] RGB: sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²)."""
    r, g, b = (image[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def mean_saturation(image: np.ndarray) -> float:
    """HSV saturation (max − min) / max, 0 where max = 0, averaged over pixels."""
    mx, mn = image.max(-1).astype(np.float64), image.min(-1).astype(np.float64)
    sat = np.where(mx > 0, (mx - mn) / np.where(mx > 0, mx, 1), 0.0)
    return float(sat.mean())


# stat -> f(image, luminance): one table for the values and for the keys declared before a run (`summary_keys`).
IMAGE_STATS = {
    "sharpness": lambda image, gray: laplacian_variance(gray),
    "contrast": lambda image, gray: rms_contrast(gray),
    "colourfulness": lambda image, gray: colourfulness(image),
    "intensity": lambda image, gray: float(gray.mean()),
    "saturation": lambda image, gray: mean_saturation(image),
}


def image_statistics(image: np.ndarray) -> dict[str, float]:
    gray = luminance(image)
    return {name: stat(image, gray) for name, stat in IMAGE_STATS.items()}


def summarise(rows: list[dict], prefix: str, keys) -> dict[str, float]:
    return {f"{prefix}/{k}": float(np.mean([r[k] for r in rows])) for k in keys}


@dataclass
class ImageStats(Metric):
    name: ClassVar[str] = "image_stats"
    needs: ClassVar[frozenset] = frozenset({"images"})

    def summary_keys(self, job) -> list[str]:
        return [f"{self.name}/{k}" for k in IMAGE_STATS]

    def compute(self, ctx: JobContext) -> MetricOutput:
        rows = []
        for (p, seed), image in ctx.images.items():
            rows.append({"prompt_idx": p, "seed": seed, **image_statistics(image)})
        return MetricOutput(summary=summarise(rows, self.name, IMAGE_STATS), rows=rows)


def rgb_rms(a: np.ndarray, b: np.ndarray) -> float:
    """sqrt(mean over pixels and channels of (a − b)²) on [0, 1] RGB: 0 for identical images, 1 for black vs white."""
    require(a.shape == b.shape, "sampler", f"images of different sizes {a.shape} and {b.shape}",
            "compare images generated at the same resolution")
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt(np.mean(d * d)))


@dataclass
class ImageDistance(Metric):
    """RGB-RMS between each image and the stock image for the same variant, prompt, seed and sampler (the model
    card's solo / leave-one-out number). Stock images are generated once per sweep and cached (task.py)."""

    name: ClassVar[str] = "image_distance"
    needs: ClassVar[frozenset] = frozenset({"images", "baseline"})

    STATS: ClassVar[dict] = {"rgb_rms": np.mean, "rgb_rms_max": np.max}  # over prompt × seed

    def summary_keys(self, job) -> list[str]:
        return [f"{self.name}/{k}" for k in self.STATS]

    def validate(self, job) -> None:
        super().validate(job)
        if job.is_stock:
            log.info("image_distance on a stock job: every distance is 0 by definition")

    def compute(self, ctx: JobContext) -> MetricOutput:
        rows = []
        for (p, seed), image in sorted(ctx.images.items()):
            stock = ctx.baseline_images.get((p, seed))
            if stock is None:
                raise RuntimeError(f"image_distance: no stock image for prompt {p}, seed {seed} (task.py makes them "
                                   "when a metric needs 'baseline')")
            rows.append({"prompt_idx": p, "seed": seed, "rgb_rms": rgb_rms(image, stock)})
        values = [r["rgb_rms"] for r in rows]
        return MetricOutput(summary={f"{self.name}/{k}": float(f(values)) for k, f in self.STATS.items()}, rows=rows)


@dataclass
class Diversity(Metric):
    """Mean pairwise RGB-RMS across the seeds of each prompt: does an intervention collapse or widen the outputs?"""

    name: ClassVar[str] = "diversity"
    needs: ClassVar[frozenset] = frozenset({"images"})

    STATS: ClassVar[tuple] = ("rgb_rms",)  # per prompt (rows), mean over prompts (summary)

    def summary_keys(self, job) -> list[str]:
        return [f"{self.name}/{k}" for k in self.STATS]

    def validate(self, job) -> None:
        super().validate(job)
        require(len(job.seeds) >= 2, "seeds", f"diversity compares seeds within a job, which has only {job.seeds}",
                "give a list of seeds to one job, e.g. seeds=[0,1,2] (not a -m sweep over seeds)")

    def compute(self, ctx: JobContext) -> MetricOutput:
        rows = []
        prompts = sorted({p for p, _ in ctx.images})
        for p in prompts:
            images = [ctx.images[(p, s)] for s in ctx.seeds if (p, s) in ctx.images]
            pairs = [rgb_rms(a, b) for i, a in enumerate(images) for b in images[i + 1:]]
            rows.append({"prompt_idx": p, "rgb_rms": float(np.mean(pairs)), "pairs": len(pairs)})
        return MetricOutput(summary=summarise(rows, self.name, self.STATS), rows=rows)


@dataclass
class ClipScore(ClipScoreFields, Metric):
    """CLIPScore = 100 · max(cos(image embedding, prompt embedding), 0) with a local CLIP model (transformers).
    Selecting it without a path, or with a path that is not a CLIP model, is a config error (not an empty summary)."""

    name: ClassVar[str] = "clip_score"
    needs: ClassVar[frozenset] = frozenset({"images"})

    STATS: ClassVar[tuple] = ("score",)

    def summary_keys(self, job) -> list[str]:
        return [f"{self.name}/{k}" for k in self.STATS] if self.path is not None else []  # no path: skipped

    def validate(self, job) -> None:
        super().validate(job)
        require(self.path is not None, "metrics.clip_score.path",
                "no CLIP model given: clip_score would report nothing",
                "set metrics.clip_score.path=/path/to/clip-folder (or KREA2_CLIP), or drop clip_score from metrics")
        folder = Path(self.path).expanduser()
        require(folder.is_dir(), "metrics.clip_score.path", f"{folder} is not a folder",
                "give a local CLIP model folder (config.json + weights + tokenizer), or null to skip clip_score")
        config = folder / "config.json"
        model_type = None
        if config.is_file():
            try:
                model_type = json.loads(config.read_text()).get("model_type")
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        require(model_type == "clip", "metrics.clip_score.path",
                f"{folder} is not a CLIP model (config.json model_type: {model_type!r})",
                "give a transformers CLIP folder, e.g. a download of openai/clip-vit-base-patch32")

    def compute(self, ctx: JobContext) -> MetricOutput:
        if self.path is None:
            log.warning("clip_score skipped: no CLIP model path (set metrics.clip_score.path or KREA2_CLIP)")
            return MetricOutput()
        import torch
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(self.path, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(self.path, local_files_only=True)
        keys = sorted(ctx.images)
        images = [(np.clip(ctx.images[k], 0, 1) * 255).round().astype(np.uint8) for k in keys]
        texts = [ctx.prompts[p] for p, _ in keys]
        with torch.no_grad():
            inputs = processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)
            image_emb = model.get_image_features(pixel_values=inputs["pixel_values"])
            text_emb = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image_emb = _features(image_emb)
        text_emb = _features(text_emb)
        cos = torch.nn.functional.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
        scores = (100 * cos.clamp_min(0)).tolist()
        rows = [{"prompt_idx": p, "seed": s, "clip_score": v} for (p, s), v in zip(keys, scores)]
        (stat,) = self.STATS
        return MetricOutput(summary={f"{self.name}/{stat}": float(np.mean(scores))}, rows=rows)


def _features(out):
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    if hasattr(out, "pooler_output") and not hasattr(out, "shape"):
        return out.pooler_output
    return out
