"""Image grids a person can read: each row carries its label (a prompt, a checkpoint) at its
left, and the grid may carry a title (the step, the model) on top.

A bare grid of 64 px cells says nothing about which prompt made which row; sampled grids,
validation grids and checkpoint comparisons all go through `labelled_grid`.
"""

from __future__ import annotations

from pathlib import Path

LABEL_FONT_SIZE = 14
PADDING = 6


def labelled_grid(cells: dict[tuple[int, int], Path], rows: int, cols: int, *,
                  row_labels: list[str] | None = None, title: str | None = None):
    """One image: cell (row, col) (0-based row, 1-based col) at its place, blanks left white,
    `row_labels[row]` wrapped in a column at the left, `title` in a strip on top."""
    from PIL import Image, ImageDraw

    opened = {k: Image.open(p) for k, p in cells.items()}
    width, height = next(iter(opened.values())).size
    font = _font()
    label_width = _label_width(width) if row_labels else 0
    title_lines = _wrap(title, font, label_width + cols * width - 2 * PADDING) if title else []
    title_height = _text_height(title_lines, font)
    grid = Image.new("RGB", (label_width + cols * width, title_height + rows * height), "white")
    draw = ImageDraw.Draw(grid)
    if title_lines:
        draw.multiline_text((PADDING, PADDING), "\n".join(title_lines), fill="black", font=font)
    for (row, col), image in opened.items():
        grid.paste(image.convert("RGB"), (label_width + (col - 1) * width,
                                          title_height + row * height))
        image.close()
    for row, label in enumerate(row_labels or []):
        lines = _wrap(label, font, label_width - 2 * PADDING)
        # Only as many lines as the row is tall; a cut label ends in an ellipsis.
        fit = max(1, (height - PADDING) // _line_height(font))
        if len(lines) > fit:
            lines = lines[:fit - 1] + [lines[fit - 1].rstrip() + "…"]
        draw.multiline_text((PADDING, title_height + row * height + PADDING), "\n".join(lines),
                            fill="black", font=font)
    return grid


def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=LABEL_FONT_SIZE)


def _label_width(cell_width: int) -> int:
    # Wide enough for a few words per line at any cell size, never wider than a large cell.
    return min(max(160, cell_width), 400)


def _line_height(font) -> int:
    return font.getbbox("Hg")[3] + 4


def _text_height(lines: list[str], font) -> int:
    return len(lines) * _line_height(font) + 2 * PADDING if lines else 0


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than a line is cut by characters."""
    lines: list[str] = []
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:  # one very long word
            cut = next((i for i in range(len(word) - 1, 0, -1)
                        if font.getlength(word[:i]) <= width), 1)
            lines.append(word[:cut])
            word = word[cut:]
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]
