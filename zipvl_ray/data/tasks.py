"""Questions whose answer needs one region of one picture, or one frame of a long video.

Each task is a function ``(rng, num_frames) -> (scenes, question, answer)``. Answers are one word or
one number (a few byte-level tokens). Picture tasks (one still image, 3-8 objects):

=============  =======================================  ==========================================
task           question                                 what the model must look at
=============  =======================================  ==========================================
``colour``     "What colour is the triangle?"           the one triangle
``shape``      "What shape is the blue object?"         the one blue object
``count``      "How many circles are there?"            every circle (0-5 of them)
``left_of``    "What is left of the square?"            the square and the cell left of it
=============  =======================================  ==========================================

Video tasks (``num_frames`` frames with a burned-in timecode, 0-3 distractor objects per frame):

================  ==========================================  ======================================
task              question                                    what the model must look at
================  ==========================================  ======================================
``video_colour``  "What colour is the cross?"                 the one cross in the whole video
``video_frame``   "In which frame is the cross?"              the one cross (its frame's timecode)
``frame_colour``  "What colour is the cross in frame 7?"      the cross of frame 7 among 2-6 crosses
================  ==========================================  ======================================
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from zipvl_ray.data.scenes import COLOURS, GRID, PLURALS, SHAPES, Scene, free_cells, random_object

Scenes = list[Scene]
TaskFn = Callable[[np.random.Generator, int], tuple[Scenes, str, str]]

COLOUR_NAMES = tuple(COLOURS)


def _pick(rng: np.random.Generator, items, exclude=()) -> str:
    pool = [x for x in items if x not in exclude]
    return pool[int(rng.integers(len(pool)))]


def _place(rng: np.random.Generator, scene: Scene, shape: str, colour: str, *, video: bool) -> None:
    cells = free_cells(scene, reserve_timecode=video)
    row, col = cells[int(rng.integers(len(cells)))]
    scene.objects.append(random_object(rng, shape, colour, row, col))


def _fill(
    rng: np.random.Generator, scene: Scene, count: int, exclude_shapes=(), exclude_colours=(), video=False
):
    """Add ``count`` random objects whose shape / colour avoid the excluded ones."""
    for _ in range(count):
        _place(
            rng,
            scene,
            _pick(rng, SHAPES, exclude_shapes),
            _pick(rng, COLOUR_NAMES, exclude_colours),
            video=video,
        )


# -- picture tasks ---------------------------------------------------------------------------------


def task_colour(rng: np.random.Generator, num_frames: int = 1) -> tuple[Scenes, str, str]:
    """The colour of the only object of a shape."""
    scene = Scene()
    target, colour = _pick(rng, SHAPES), _pick(rng, COLOUR_NAMES)
    _place(rng, scene, target, colour, video=False)
    _fill(rng, scene, int(rng.integers(2, 8)), exclude_shapes=(target,))
    return [scene], f"What colour is the {target}?", colour


def task_shape(rng: np.random.Generator, num_frames: int = 1) -> tuple[Scenes, str, str]:
    """The shape of the only object of a colour."""
    scene = Scene()
    colour, target = _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)
    _place(rng, scene, target, colour, video=False)
    _fill(rng, scene, int(rng.integers(2, 8)), exclude_colours=(colour,))
    return [scene], f"What shape is the {colour} object?", target


def task_count(rng: np.random.Generator, num_frames: int = 1) -> tuple[Scenes, str, str]:
    """How many objects of a shape (0-5) among 1-5 others."""
    scene = Scene()
    target, count = _pick(rng, SHAPES), int(rng.integers(0, 6))
    for _ in range(count):
        _place(rng, scene, target, _pick(rng, COLOUR_NAMES), video=False)
    _fill(rng, scene, int(rng.integers(1, 6)), exclude_shapes=(target,))
    return [scene], f"How many {PLURALS[target]} are there?", str(count)


def task_left_of(rng: np.random.Generator, num_frames: int = 1) -> tuple[Scenes, str, str]:
    """The shape in the cell left of the only object of a shape (its right neighbour, if any, differs)."""
    scene = Scene()
    target = _pick(rng, SHAPES)
    row, col = int(rng.integers(GRID)), int(rng.integers(1, GRID))
    left = _pick(rng, SHAPES, (target,))
    scene.objects.append(random_object(rng, target, _pick(rng, COLOUR_NAMES), row, col))
    scene.objects.append(random_object(rng, left, _pick(rng, COLOUR_NAMES), row, col - 1))
    if col + 1 < GRID and rng.random() < 0.5:
        right = _pick(rng, SHAPES, (target, left))
        scene.objects.append(random_object(rng, right, _pick(rng, COLOUR_NAMES), row, col + 1))
    _fill(rng, scene, int(rng.integers(1, 6)), exclude_shapes=(target,))
    return [scene], f"What is left of the {target}?", left


# -- video tasks -----------------------------------------------------------------------------------


def _video(rng: np.random.Generator, num_frames: int, target: str) -> Scenes:
    """Frames with timecodes 1..num_frames and 0-3 distractors each, none of shape ``target``."""
    frames = [Scene(timecode=i + 1) for i in range(num_frames)]
    for frame in frames:
        _fill(rng, frame, int(rng.integers(0, 4)), exclude_shapes=(target,), video=True)
    return frames


def _needle(rng: np.random.Generator, num_frames: int) -> tuple[Scenes, str, str, int]:
    target, colour = _pick(rng, SHAPES), _pick(rng, COLOUR_NAMES)
    frames = _video(rng, num_frames, target)
    frame = int(rng.integers(num_frames))
    _place(rng, frames[frame], target, colour, video=True)
    return frames, target, colour, frame + 1


def task_video_colour(rng: np.random.Generator, num_frames: int) -> tuple[Scenes, str, str]:
    """The colour of the only object of a shape in the whole video."""
    frames, target, colour, _ = _needle(rng, num_frames)
    return frames, f"What colour is the {target}?", colour


def task_video_frame(rng: np.random.Generator, num_frames: int) -> tuple[Scenes, str, str]:
    """The frame number (its timecode) of the only object of a shape in the whole video."""
    frames, target, _, number = _needle(rng, num_frames)
    return frames, f"In which frame is the {target}?", str(number)


def task_frame_colour(rng: np.random.Generator, num_frames: int) -> tuple[Scenes, str, str]:
    """The colour of a shape in a given frame, the shape appearing in 2-6 frames with various colours."""
    target = _pick(rng, SHAPES)
    frames = _video(rng, num_frames, target)
    copies = int(rng.integers(2, min(6, num_frames) + 1))
    chosen = rng.choice(num_frames, size=copies, replace=False)
    colours = [_pick(rng, COLOUR_NAMES) for _ in chosen]
    for index, colour in zip(chosen, colours, strict=True):
        _place(rng, frames[int(index)], target, colour, video=True)
    asked = int(rng.integers(copies))
    return frames, f"What colour is the {target} in frame {int(chosen[asked]) + 1}?", colours[asked]


TASKS: dict[str, TaskFn] = {
    "colour": task_colour,
    "shape": task_shape,
    "count": task_count,
    "left_of": task_left_of,
    "video_colour": task_video_colour,
    "video_frame": task_video_frame,
    "frame_colour": task_frame_colour,
}
PICTURE_TASKS = ("colour", "shape", "count", "left_of")
VIDEO_TASKS = ("video_colour", "video_frame", "frame_colour")
