"""Pictures worth looking at: labelled contact sheets with images ≥ 256 px, labelled axes, colour bars where there is
colour, categorical sweep values drawn as categories."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def test_contact_sheet_upsamples_exactly_and_labels_prompt_seed_and_intervention():
    from krea_sweeps.metrics.figures import MIN_CELL, SHEET_GAP, SHEET_LABEL_W, SHEET_TOP, labelled_contact_sheet

    rng = np.random.default_rng(0)
    images = {(p, s): rng.integers(0, 256, (64, 64, 3)).astype(np.float32) / 255 for p in range(2) for s in (0, 3)}
    prompts = ["a red fox in snow", "a lighthouse at dusk"]
    sheet = labelled_contact_sheet(images, prompts, [0, 3], "solo site=projector slot=6 layer=20 | turbo")
    blank = labelled_contact_sheet(images, ["", ""], [0, 3], "")
    assert sheet.shape == blank.shape and sheet.shape[0] >= 2 * MIN_CELL and sheet.shape[1] >= 2 * MIN_CELL
    # each image is there at ≥ 256 px, upsampled by pixel repetition (values unchanged, nothing blurred)
    scale = MIN_CELL // 64
    for (p, s), image in images.items():
        y, x = SHEET_TOP + p * (MIN_CELL + SHEET_GAP), SHEET_LABEL_W + [0, 3].index(s) * (MIN_CELL + SHEET_GAP)
        expected = np.kron((image * 255).round(), np.ones((scale, scale, 1)))
        assert np.array_equal((sheet[y:y + MIN_CELL, x:x + MIN_CELL] * 255).round(), expected), (p, s)
    # the labels are drawn: the title, `seed N` headers and the prompt column differ from a sheet without text
    differs = np.abs(sheet - blank).sum(axis=2) > 0
    assert differs[:30].any() and differs[:, :200].any()


def test_categorical_axes_are_points_at_categories_numeric_axes_are_lines():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from krea_sweeps.metrics.figures import plot_against

    ax = Figure().add_subplot()
    plot_against(ax, ["rebalance", "tap_scale"], [1.0, 2.0])
    (line,) = ax.get_lines()
    assert line.get_linestyle() == "None" and [t.get_text() for t in ax.get_xticklabels()] == ["rebalance", "tap_scale"]
    ax = Figure().add_subplot()
    plot_against(ax, [0.0, 0.5, 2.0], [1.0, 2.0, 3.0])
    assert ax.get_lines()[0].get_linestyle() == "-"


def test_collect_figures_label_every_axis_and_colour_has_a_bar(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_collect import write_job

    from krea_sweeps import collect as collect_module

    sweep = tmp_path / "outputs" / "known"
    for slot in (0, 1):
        write_job(sweep, slot, "done")
    figures = {}

    def keep(fig, path, tight=True):
        figures[Path(path).name] = fig
        return path

    monkeypatch.setattr(collect_module, "save_figure", keep)
    collect_module.collect(sweep, quiet=True)
    assert {"attention_grid.png", "per_slot.png", "contact_sheet.png"} <= set(figures)
    for name, fig in figures.items():
        plots = [ax for ax in fig.axes if ax.get_images() or ax.get_lines() or ax.patches]
        if name == "contact_sheet.png":
            assert fig.get_supylabel() == "prompt" and fig.get_supxlabel()
            continue
        assert plots and all(ax.get_xlabel() and ax.get_ylabel() for ax in plots), name
    grid = figures["attention_grid.png"]
    colourbars = [ax for ax in grid.axes if ax.get_label() == "<colorbar>"]
    assert len(colourbars) == 1 and "attention" in colourbars[0].get_ylabel()
