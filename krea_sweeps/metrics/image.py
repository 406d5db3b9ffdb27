"""Image-side metrics: what "detail / contrast / intensity" means in numbers, on [0, 1] RGB images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Metric, MetricOutput

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


def image_statistics(image: np.ndarray) -> dict[str, float]:
    gray = luminance(image)
    return {
        "sharpness": laplacian_variance(gray),
        "contrast": rms_contrast(gray),
        "colourfulness": colourfulness(image),
        "intensity": float(gray.mean()),
        "saturation": mean_saturation(image),
    }


def summarise(rows: list[dict], prefix: str, keys) -> dict[str, float]:
    return {f"{prefix}/{k}": float(np.mean([r[k] for r in rows])) for k in keys}


@dataclass
class ImageStats(Metric):
    name: ClassVar[str] = "image_stats"
    needs: ClassVar[frozenset] = frozenset({"images"})

    def compute(self, job) -> MetricOutput:
        rows = []
        for (p, seed), image in job.images.items():
            rows.append({"prompt_idx": p, "seed": seed, **image_statistics(image)})
        keys = ["sharpness", "contrast", "colourfulness", "intensity", "saturation"]
        return MetricOutput(summary=summarise(rows, self.name, keys), rows=rows)
