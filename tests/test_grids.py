"""Grids carry their labels: which prompt (or checkpoint) made each row, and a title."""

import numpy as np
from PIL import Image

from booth.dreambooth.grids import labelled_grid


def _cells(tmp_path, rows, cols, size=64):
    cells = {}
    for row in range(rows):
        for col in range(1, cols + 1):
            path = tmp_path / f"{row}-{col}.png"
            Image.new("RGB", (size, size), (40 * row, 30 * col, 200)).save(path)
            cells[row, col] = path
    return cells


def _ink(pixels) -> int:
    """How many pixels are not white: text drawn there."""
    return int((pixels.min(axis=-1) < 128).sum())


def test_rows_are_labelled_and_cells_stay_where_they_belong(tmp_path):
    grid = labelled_grid(_cells(tmp_path, 2, 3), 2, 3, row_labels=["a photo of sks dog",
                                                                   "sks dog on the moon"],
                         title="run rex (checkpoint-200, step 200)")
    label, title = grid.width - 3 * 64, grid.height - 2 * 64
    assert label >= 160 and title > 0
    pixels = np.asarray(grid)
    assert np.array_equal(pixels[title + 64 + 5, label + 2 * 64 + 5], (40, 90, 200))  # (1, 3)
    assert _ink(pixels[:title]) > 20, "the title is written"
    for row in range(2):
        assert _ink(pixels[title + row * 64: title + (row + 1) * 64, :label]) > 20


def test_labels_that_do_not_fit_are_cut_inside_their_row(tmp_path):
    endless = "supercalifragilistic" * 10 + " and " + "many more words " * 40
    grid = labelled_grid(_cells(tmp_path, 2, 1), 2, 1, row_labels=[endless, ""])
    pixels = np.asarray(grid)
    assert grid.height == 2 * 64, "no title strip without a title"
    assert _ink(pixels[64:, :grid.width - 64]) == 0, "row 1's label stays out of row 2"


def test_no_labels_no_margins(tmp_path):
    grid = labelled_grid(_cells(tmp_path, 1, 2), 1, 2)
    assert grid.size == (128, 64)
