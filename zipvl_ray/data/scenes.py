"""Seeded synthetic pictures: flat-coloured shapes on a black grid, and "video" frames with a timecode.

A picture is ``GRID x GRID`` cells of ``CELL`` pixels (8 x 8 cells of 14 px = 112 px, the LLaVA
vision tower's input side), so each cell is exactly one vision patch and one object lies inside one
patch. Video frames reserve the top-left cell for a burned-in two-digit timecode (the frame number,
1-based, drawn with a 3 x 5 bitmap font), the way real footage shows its time: the vision tower can
read the frame number from the pixels, so no text has to be interleaved with the frames.

Everything is numpy; :meth:`Scene.render` returns ``uint8 (112, 112, 3)`` and :meth:`Scene.to_pil` a
PIL image for the processor or the HTTP API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

#: Cells per side of a picture.
GRID = 8
#: Pixels per cell side (the vision tower's patch size).
CELL = 14
#: Picture side in pixels.
IMAGE_SIZE = GRID * CELL

#: Object colours and their RGB values (distinct in every channel combination).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 220),
    "white": (240, 240, 240),
}
#: Object shapes, drawn by :func:`shape_mask`.
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross", "diamond")
#: Plural of each shape (for counting questions).
PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
#: Colour of the timecode digits (not an object colour).
TIMECODE_RGB = (150, 150, 150)

# 3 x 5 bitmap digits, row-major, "1" = ink.
_DIGITS = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}


@lru_cache(maxsize=64)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean mask ``(size, size)`` of ``shape`` filling a ``size``-pixel box."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        mask = (xx - c) ** 2 + (yy - c) ** 2 <= (size / 2.0) ** 2
    elif shape == "triangle":  # apex up: half-width grows linearly from the top row
        mask = np.abs(xx - c) <= (yy + 1) / 2.0
    elif shape == "cross":
        arm = max(1.0, size / 6.0)
        mask = (np.abs(xx - c) <= arm) | (np.abs(yy - c) <= arm)
    elif shape == "diamond":
        mask = np.abs(xx - c) + np.abs(yy - c) <= size / 2.0
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return mask


@lru_cache(maxsize=128)
def timecode_mask(number: int) -> np.ndarray:
    """Boolean mask ``(CELL, CELL)`` of the two-digit ``number`` (00-99), each digit 6 x 10 px."""
    if not 0 <= number <= 99:
        raise ValueError(f"timecode {number} is outside 0-99")
    mask = np.zeros((CELL, CELL), dtype=bool)
    for slot, digit in enumerate(f"{number:02d}"):
        glyph = np.array([[ch == "1" for ch in row] for row in _DIGITS[digit]], dtype=bool)
        big = np.kron(glyph, np.ones((2, 2), dtype=bool))  # (10, 6)
        x0 = 0 if slot == 0 else 7
        mask[2:12, x0 : x0 + 6] = big
    return mask


@dataclass(frozen=True, slots=True)
class SceneObject:
    """One object in one cell.

    Attributes
    ----------
    shape, colour : str
        Names from :data:`SHAPES` and :data:`COLOURS`.
    row, col : int
        Cell coordinates, ``0 <= row, col < GRID``.
    size : int
        Side of the object's box in pixels (8-12).
    dx, dy : int
        Offset of the box inside the cell (the box stays inside it).
    """

    shape: str
    colour: str
    row: int
    col: int
    size: int = 11
    dx: int = 1
    dy: int = 1


@dataclass(slots=True)
class Scene:
    """One picture (or one video frame).

    Attributes
    ----------
    objects : list[SceneObject]
        At most one object per cell.
    timecode : int or None
        Frame number drawn in cell (0, 0), or None for a still picture.
    """

    objects: list[SceneObject] = field(default_factory=list)
    timecode: int | None = None

    def render(self) -> np.ndarray:
        """Pixels, ``uint8 (IMAGE_SIZE, IMAGE_SIZE, 3)``."""
        pixels = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        if self.timecode is not None:
            pixels[:CELL, :CELL][timecode_mask(self.timecode)] = TIMECODE_RGB
        for obj in self.objects:
            y0 = obj.row * CELL + obj.dy
            x0 = obj.col * CELL + obj.dx
            box = pixels[y0 : y0 + obj.size, x0 : x0 + obj.size]
            box[shape_mask(obj.shape, obj.size)] = COLOURS[obj.colour]
        return pixels

    def to_pil(self) -> Image.Image:
        """The rendered picture as an RGB PIL image."""
        return Image.fromarray(self.render(), mode="RGB")

    def occupied(self) -> set[tuple[int, int]]:
        """Cells holding an object or the timecode."""
        cells = {(o.row, o.col) for o in self.objects}
        if self.timecode is not None:
            cells.add((0, 0))
        return cells


def random_object(rng: np.random.Generator, shape: str, colour: str, row: int, col: int) -> SceneObject:
    """An object of ``shape`` and ``colour`` in cell ``(row, col)`` with a random size and offset."""
    size = int(rng.integers(9, 13))
    slack = CELL - size
    return SceneObject(
        shape=shape,
        colour=colour,
        row=row,
        col=col,
        size=size,
        dx=int(rng.integers(0, slack + 1)),
        dy=int(rng.integers(0, slack + 1)),
    )


def free_cells(scene: Scene, *, reserve_timecode: bool) -> list[tuple[int, int]]:
    """Empty cells of ``scene`` in raster order (cell (0, 0) excluded when ``reserve_timecode``)."""
    used = scene.occupied()
    if reserve_timecode:
        used.add((0, 0))
    return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]


#: Columns of :func:`patch_labels` and their number of classes (class 0 = nothing there).
PATCH_LABELS: dict[str, int] = {
    "shape": len(SHAPES) + 1,
    "colour": len(COLOURS) + 1,
    "left_shape": len(SHAPES) + 1,
    "timecode_tens": 11,
    "timecode_units": 11,
}


def patch_labels(scene: Scene) -> np.ndarray:
    """What each vision patch of ``scene`` shows, for supervising the vision tower.

    Returns
    -------
    numpy.ndarray
        ``int64 (GRID * GRID, len(PATCH_LABELS))`` in raster (patch) order; columns follow
        :data:`PATCH_LABELS`: the shape and colour in the cell, the shape in the cell to its left
        (``1 + index``, 0 for none), and the frame's timecode digits (``1 + digit``, 0 for a still
        picture) repeated on every patch of the frame.
    """
    labels = np.zeros((GRID * GRID, len(PATCH_LABELS)), dtype=np.int64)
    colour_index = {name: i for i, name in enumerate(COLOURS)}
    shape_at = {}
    for obj in scene.objects:
        cell = obj.row * GRID + obj.col
        labels[cell, 0] = SHAPES.index(obj.shape) + 1
        labels[cell, 1] = colour_index[obj.colour] + 1
        shape_at[(obj.row, obj.col)] = SHAPES.index(obj.shape) + 1
    for (row, col), shape in shape_at.items():
        if col + 1 < GRID:
            labels[row * GRID + col + 1, 2] = shape
    if scene.timecode is not None:
        labels[:, 3] = scene.timecode // 10 + 1
        labels[:, 4] = scene.timecode % 10 + 1
    return labels
