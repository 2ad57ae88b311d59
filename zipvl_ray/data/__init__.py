"""Seeded synthetic pictures, videos and questions for training and evaluating ``zipvl-tiny``.

The answer to every question depends on a few visual tokens among many (one object in one cell of
one frame), so a trained model's attention is sparse for a reason ZipVL can exploit. See
:mod:`zipvl_ray.data.tasks` for the tasks and :mod:`zipvl_ray.data.splits` for the splits.
"""

from zipvl_ray.data.scenes import CELL, COLOURS, GRID, IMAGE_SIZE, SHAPES, Scene, SceneObject
from zipvl_ray.data.splits import (
    PARTITION_IDS,
    SPLITS,
    Sample,
    SplitSpec,
    iterate_split,
    make_sample,
    make_split,
)
from zipvl_ray.data.tasks import PICTURE_TASKS, TASKS, VIDEO_TASKS

__all__ = [
    "CELL",
    "COLOURS",
    "GRID",
    "IMAGE_SIZE",
    "PARTITION_IDS",
    "PICTURE_TASKS",
    "SHAPES",
    "SPLITS",
    "TASKS",
    "VIDEO_TASKS",
    "Sample",
    "Scene",
    "SceneObject",
    "SplitSpec",
    "iterate_split",
    "make_sample",
    "make_split",
]
