"""Pictures: every object lies inside its own vision patch, shapes and timecodes are distinguishable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from zipvl_ray.data.scenes import (
    CELL,
    COLOURS,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    TIMECODE_RGB,
    Scene,
    SceneObject,
    shape_mask,
    timecode_mask,
)


def cell_of(pixels: np.ndarray, row: int, col: int) -> np.ndarray:
    return pixels[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]


@pytest.mark.parametrize("size", [9, 10, 11, 12])
def test_shapes_have_distinct_masks_at_every_size(size):
    masks = {shape: shape_mask(shape, size) for shape in SHAPES}
    for a, b in itertools.combinations(SHAPES, 2):
        assert (masks[a] != masks[b]).sum() >= 4, f"{a} and {b} look alike at size {size}"
    assert all(mask.any() for mask in masks.values())


def test_timecodes_are_all_distinct():
    masks = {n: timecode_mask(n) for n in range(100)}
    assert len({mask.tobytes() for mask in masks.values()}) == 100
    assert masks[7].shape == (CELL, CELL)


@pytest.mark.parametrize(
    ("obj", "colour"),
    [
        (SceneObject("square", "red", 0, 0, size=12, dx=2, dy=2), "red"),
        (SceneObject("circle", "blue", 3, 5, size=9, dx=0, dy=5), "blue"),
        (SceneObject("triangle", "yellow", 7, 7, size=11, dx=3, dy=1), "yellow"),
    ],
)
def test_an_object_paints_only_its_cell(obj, colour):
    pixels = Scene(objects=[obj]).render()
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and pixels.dtype == np.uint8
    inside = cell_of(pixels, obj.row, obj.col)
    assert (inside.reshape(-1, 3) == COLOURS[colour]).all(axis=1).sum() == shape_mask(
        obj.shape, obj.size
    ).sum()
    outside = pixels.copy()
    cell_of(outside, obj.row, obj.col)[:] = 0
    assert not outside.any()


def test_timecode_is_drawn_in_the_top_left_cell():
    pixels = Scene(timecode=42).render()
    corner = cell_of(pixels, 0, 0)
    assert (corner.reshape(-1, 3) == TIMECODE_RGB).all(axis=1).sum() == timecode_mask(42).sum()
    assert not pixels[CELL:].any() and not pixels[:, CELL:].any()


def test_to_pil_round_trips_the_pixels():
    scene = Scene(objects=[SceneObject("cross", "green", GRID - 1, 2)], timecode=3)
    assert np.array_equal(np.asarray(scene.to_pil()), scene.render())


def test_patch_labels_describe_each_patch():
    from zipvl_ray.data.scenes import PATCH_LABELS, patch_labels

    scene = Scene(
        objects=[SceneObject("circle", "blue", 2, 3), SceneObject("square", "red", 2, 4)], timecode=37
    )
    labels = patch_labels(scene)
    assert labels.shape == (GRID * GRID, len(PATCH_LABELS))
    circle, square = 2 * GRID + 3, 2 * GRID + 4
    assert labels[circle, :2].tolist() == [SHAPES.index("circle") + 1, list(COLOURS).index("blue") + 1]
    assert labels[square, :3].tolist() == [
        SHAPES.index("square") + 1,
        list(COLOURS).index("red") + 1,
        SHAPES.index("circle") + 1,
    ]
    assert labels[square + 1, 2] == SHAPES.index("square") + 1 and labels[square + 1, 0] == 0
    assert (labels[:, 3] == 4).all() and (labels[:, 4] == 8).all()
    assert labels[:, :2].astype(bool).sum() == 4
    assert not patch_labels(Scene(objects=[SceneObject("cross", "white", 0, 0)]))[:, 3:].any()
    for column, classes in enumerate(PATCH_LABELS.values()):
        assert labels[:, column].max() < classes
