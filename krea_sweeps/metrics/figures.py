"""Small figures rendered to HxWx3 float arrays in [0, 1] (what `MetricOutput.images` and W&B take).

matplotlib's object API with the Agg canvas: no pyplot global state, no display, nothing left open.
"""

from __future__ import annotations

import numpy as np


def _render(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return rgba[..., :3].astype(np.float32) / 255.0


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def heatmap(matrix: np.ndarray, title: str, xlabels: list[str] | None = None, ylabels: list[str] | None = None,
            xlabel: str = "key", ylabel: str = "query", vmax: float | None = None) -> np.ndarray:
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    im = ax.imshow(np.asarray(matrix, dtype=np.float64), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.85)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=90, fontsize=7)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
    return _render(fig)


def heatmap_grid(maps: np.ndarray, title: str, labels: list[str], names: list[str]) -> np.ndarray:
    """Several small maps (e.g. one per head) on one shared colour scale."""
    n = len(maps)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig = _figure(2.3 * cols + 0.8, 2.3 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = float(np.max(maps)) if n else 1.0
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        im = ax.imshow(maps[i], cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(names[i], fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
        ax.set_yticks(range(len(labels)), labels, fontsize=5)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6)
    fig.suptitle(title, fontsize=9)
    return _render(fig)


def bars(series: dict[str, np.ndarray], labels: list[str], title: str) -> np.ndarray:
    """Grouped bars, one group per label (e.g. projector weights per layer: stock, effective, reference)."""
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, np.asarray(values, dtype=np.float64), width, label=name)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _render(fig)
