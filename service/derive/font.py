"""A 5x7 bitmap font for burning short text into overlay images, in numpy.

Why our own font: the worker images carry no font files (and Pillow's
default bitmap font is not guaranteed across versions), burned-in text must
look the same on every installation, and a few dozen glyphs cover what the
overlay prints (upper-case letters, digits and ``-.,:/()<>=%+_'?!*#``).
Lower-case text is drawn in upper case; any other character as ``?``.

Each glyph is 7 rows of 5 columns in a 6x8 cell (one column and one row of
spacing).  :func:`draw_text` scales cells by an integer factor, so text stays
crisp (no interpolation) at any size.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

__all__ = ["CELL_HEIGHT", "CELL_WIDTH", "GLYPHS", "draw_text", "glyph", "text_width", "wrap"]

log = logging.getLogger(__name__)

#: Cell size in unscaled pixels: 5x7 glyph plus one column and one row of spacing.
CELL_WIDTH, CELL_HEIGHT = 6, 8

_FONT = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    " ": (".....",) * 7,
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    ",": (".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."),
    ":": (".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."),
    "/": (".....", "....#", "...#.", "..#..", ".#...", "#....", "....."),
    "(": ("...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."),
    ")": (".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."),
    "<": ("...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."),
    ">": (".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."),
    "=": (".....", ".....", "#####", ".....", "#####", ".....", "....."),
    "%": ("##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"),
    "+": (".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."),
    "_": (".....", ".....", ".....", ".....", ".....", ".....", "#####"),
    "'": ("..#..", "..#..", ".#...", ".....", ".....", ".....", "....."),
    "?": (".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."),
    "!": ("..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#.."),
    "*": (".....", "..#..", "#.#.#", ".###.", "#.#.#", "..#..", "....."),
    "#": (".#.#.", ".#.#.", "#####", ".#.#.", "#####", ".#.#.", ".#.#."),
}


def _bitmap(rows: tuple[str, ...]) -> npt.NDArray[np.bool_]:
    cell = np.zeros((CELL_HEIGHT, CELL_WIDTH), dtype=bool)
    cell[:7, :5] = np.array([[ch == "#" for ch in row] for row in rows], dtype=bool)
    cell.setflags(write=False)
    return cell


#: Character -> (CELL_HEIGHT, CELL_WIDTH) boolean cell, read-only.
GLYPHS: dict[str, npt.NDArray[np.bool_]] = {ch: _bitmap(rows) for ch, rows in _FONT.items()}


def glyph(ch: str) -> npt.NDArray[np.bool_]:
    """The cell drawn for ``ch`` (upper-cased; unknown characters as ``?``)."""
    return GLYPHS.get(ch.upper(), GLYPHS["?"])


def text_width(text: str, scale: int = 1) -> int:
    """Width in pixels of ``text`` drawn at ``scale``."""
    return len(text) * CELL_WIDTH * scale


def wrap(text: str, max_chars: int) -> list[str]:
    """``text`` broken into lines of at most ``max_chars``, at spaces where possible."""
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    lines: list[str] = []
    current = ""
    for word in text.split():
        while len(word) > max_chars:  # a word longer than a line is cut
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:max_chars])
            word = word[max_chars:]
        if not current:
            current = word
        elif len(current) + 1 + len(word) <= max_chars:
            current = f"{current} {word}"
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def draw_text(
    image: npt.NDArray[np.uint8],
    text: str,
    top: int,
    left: int,
    *,
    scale: int = 1,
    rgb: tuple[int, int, int] = (255, 255, 255),
) -> None:
    """Draw ``text`` into an (H, W, 3) uint8 ``image`` in place; clipped at the edges.

    Only the glyphs' set pixels are written, so the background shows through.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("image must be an (H, W, 3) uint8 array")
    if scale < 1:
        raise ValueError("scale must be >= 1")
    height, width = image.shape[:2]
    colour = np.asarray(rgb, dtype=np.uint8)
    for k, ch in enumerate(text):
        cell = np.kron(glyph(ch), np.ones((scale, scale), dtype=bool))
        y0, x0 = top, left + k * CELL_WIDTH * scale
        if x0 >= width or y0 >= height:
            break
        y1, x1 = min(y0 + cell.shape[0], height), min(x0 + cell.shape[1], width)
        if y1 <= max(y0, 0) or x1 <= max(x0, 0):
            continue
        part = cell[max(0, -y0) : y1 - y0, max(0, -x0) : x1 - x0]
        region = image[max(y0, 0) : y1, max(x0, 0) : x1]
        region[part] = colour
