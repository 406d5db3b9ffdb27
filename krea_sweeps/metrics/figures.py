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
    """Fixed margins, not `layout="constrained"`: the layout solver cost more than drawing (0.59 s of a 1.24 s
    conditioning job went to its figures)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(left=0.14, right=0.95, bottom=0.16, top=0.9, wspace=0.45, hspace=0.55)
    return fig


def heatmap(matrix: np.ndarray, title: str, xlabels: list[str] | None = None, ylabels: list[str] | None = None,
            xlabel: str = "key", ylabel: str = "query", vmax: float | None = None, vmin: float = 0.0,
            colorbar_label: str | None = None) -> np.ndarray:
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    im = ax.imshow(np.asarray(matrix, dtype=np.float64), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.85, label=colorbar_label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=90, fontsize=7)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
    return _render(fig)


def heatmap_grid(maps: np.ndarray, title: str, labels: list[str], names: list[str], xlabel: str = "key",
                 ylabel: str = "query") -> np.ndarray:
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
    fig.supxlabel(xlabel, fontsize=8)
    fig.supylabel(ylabel, fontsize=8)
    return _render(fig)


def bars(series: dict[str, np.ndarray], labels: list[str], title: str, xlabel: str = "tapped encoder layer",
         ylabel: str = "value") -> np.ndarray:
    """Grouped bars, one group per label (e.g. projector weights per layer: stock, effective, reference)."""
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, np.asarray(values, dtype=np.float64), width, label=name)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x, labels, fontsize=7)
    label(ax, xlabel, ylabel, title, fontsize=9)
    ax.legend(fontsize=7)
    return _render(fig)


# ------------------------------------------------------------------------------------------------ contact sheets
MIN_CELL = 256  # px per image on a sheet: the synthetic model's 64² images are upsampled (nearest) to be seen
SHEET_LABEL_W, SHEET_TOP, SHEET_GAP = 230, 56, 4  # prompt column width, title + seed header height, gutter (px)


def labelled_contact_sheet(images: dict[tuple[int, int], np.ndarray], prompts: list[str], seeds: list[int],
                           title: str, min_cell: int = MIN_CELL) -> np.ndarray:
    """Rows = prompts, columns = seeds, each image at least `min_cell` px (integer nearest-neighbour upsampling,
    so pixels stay pixels), with the intervention as a title, `seed N` over each column and the prompt beside each
    row. Drawn with PIL, not matplotlib: one per job, so it must cost milliseconds."""
    from PIL import Image, ImageDraw, ImageFont

    first = next(iter(images.values()))
    h, w = first.shape[:2]
    scale = max(1, -(-min_cell // min(h, w)))  # ceil: at least min_cell on the short side
    ch, cw = h * scale, w * scale
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=13)
    label_w, top, gap = SHEET_LABEL_W, SHEET_TOP, SHEET_GAP
    rows = max((p for p, _ in images), default=0) + 1
    sheet = Image.new("RGB", (label_w + len(seeds) * (cw + gap), top + rows * (ch + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), _fit(draw, title, font, sheet.width - 16), fill="black", font=font)
    for c, seed in enumerate(seeds):
        draw.text((label_w + c * (cw + gap) + 4, top - 20), f"seed {seed}", fill="black", font=small)
    for p in range(rows):
        y = top + p * (ch + gap)
        text = prompts[p] if p < len(prompts) else f"prompt {p}"
        for i, line in enumerate(_wrap(draw, f"p{p:02d}: {text}", small, label_w - 12)[: max(1, ch // 17)]):
            draw.text((6, y + 4 + 17 * i), line, fill="black", font=small)
    for (p, seed), image in images.items():
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        cell = Image.fromarray(pixels).resize((cw, ch), Image.NEAREST)
        sheet.paste(cell, (label_w + seeds.index(seed) * (cw + gap), top + p * (ch + gap)))
    return np.asarray(sheet, dtype=np.float32) / 255.0


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


def _fit(draw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text


# ------------------------------------------------------------------------------------------ labelling (collect too)
def label(ax, xlabel: str, ylabel: str, title: str | None = None, fontsize: int = 8) -> None:
    """Every figure names both axes (and says what it shows)."""
    ax.set_xlabel(xlabel, fontsize=fontsize)
    ax.set_ylabel(ylabel, fontsize=fontsize)
    if title:
        ax.set_title(title, fontsize=fontsize)


def is_numeric(values) -> bool:
    return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)


def plot_against(ax, xs, ys, label_text: str | None = None, offset: float = 0.0) -> None:
    """y against a swept value: a line over a numeric axis; over a categorical one (rebalance → tap_scale, raw →
    turbo) points at evenly spaced category ticks, never joined — a line between categories would suggest an order
    and an in-between that do not exist. `offset` nudges one series so several stay visible on one category."""
    if is_numeric(xs):
        ax.plot(xs, ys, "o-", label=label_text)
        return
    categories = list(dict.fromkeys(str(x) for x in xs))
    positions = [categories.index(str(x)) + offset for x in xs]
    ax.plot(positions, ys, "o", linestyle="none", label=label_text)
    ax.set_xticks(range(len(categories)), categories, rotation=45, ha="right", fontsize=7)


def word_map_grid(image: np.ndarray, maps: np.ndarray, words: list[str], title: str, cols: int = 6,
                  colorbar_label: str = "attention probability on the word") -> np.ndarray:
    """One panel per word: the maps [words, H, W] over the image (grey), one shared colour scale with its bar; axis
    ticks on the outer panels only (a fixed layout: constrained layout costs seconds per figure)."""
    from matplotlib.figure import Figure

    n = max(len(words), 1)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(1.7 * cols + 1.2, 1.8 * rows + 0.6), dpi=100)
    fig.subplots_adjust(left=0.08, right=0.86, bottom=0.08, top=0.9, wspace=0.15, hspace=0.3)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    grey = np.asarray(image, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    vmax = float(np.max(maps)) if len(maps) and np.max(maps) > 0 else 1.0
    h, w = grey.shape
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= len(words):
            ax.axis("off")
            continue
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0))
        im = ax.imshow(maps[i], cmap="inferno", alpha=0.6, vmin=0.0, vmax=vmax, extent=(0, w, h, 0),
                       interpolation="nearest")
        ax.set_title(words[i][:18], fontsize=8)
        ax.tick_params(labelsize=5)
        if i % cols == 0:
            ax.set_ylabel("y (px)", fontsize=6)
        if i // cols == rows - 1 or i + cols >= len(words):
            ax.set_xlabel("x (px)", fontsize=6)
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.89, 0.15, 0.02, 0.7)), label=colorbar_label)
    fig.suptitle(title, fontsize=9)
    return _render(fig)
