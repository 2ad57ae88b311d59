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
from typing import NamedTuple

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


# -- every answerable question of a picture or video, with its evidence -----------------------------


class Turn(NamedTuple):
    """One question about some frames.

    Attributes
    ----------
    task, question, answer : str
    evidence : tuple of (frame, row, col)
        The cells the answer depends on (frame index 0-based): the object asked about, every object
        counted, or the left neighbour of the object named.
    """

    task: str
    question: str
    answer: str
    evidence: tuple[tuple[int, int, int], ...] = ()


def picture_questions(scene: Scene) -> list[Turn]:
    """Every question of the picture tasks that ``scene`` answers unambiguously (counts up to 5)."""
    objs = scene.objects
    turns: list[Turn] = []
    for shape in SHAPES:
        same = [o for o in objs if o.shape == shape]
        if len(same) <= 5:
            cells = tuple((0, o.row, o.col) for o in same)
            turns.append(Turn("count", f"How many {PLURALS[shape]} are there?", str(len(same)), cells))
        if len(same) == 1:
            target = same[0]
            turns.append(
                Turn("colour", f"What colour is the {shape}?", target.colour, ((0, target.row, target.col),))
            )
            left = [o for o in objs if (o.row, o.col) == (target.row, target.col - 1)]
            if left:
                evidence = ((0, target.row, target.col - 1), (0, target.row, target.col))
                turns.append(Turn("left_of", f"What is left of the {shape}?", left[0].shape, evidence))
    for colour in COLOUR_NAMES:
        same = [o for o in objs if o.colour == colour]
        if len(same) == 1:
            target = same[0]
            turns.append(
                Turn(
                    "shape",
                    f"What shape is the {colour} object?",
                    target.shape,
                    ((0, target.row, target.col),),
                )
            )
    return turns


def video_questions(frames: Scenes) -> list[Turn]:
    """Every question of the video tasks that ``frames`` answer unambiguously."""
    turns: list[Turn] = []
    for shape in SHAPES:
        where = [(i, o) for i, frame in enumerate(frames) for o in frame.objects if o.shape == shape]
        if len(where) == 1:
            index, target = where[0]
            evidence = ((index, target.row, target.col),)
            turns.append(Turn("video_colour", f"What colour is the {shape}?", target.colour, evidence))
            turns.append(
                Turn("video_frame", f"In which frame is the {shape}?", str(frames[index].timecode), evidence)
            )
        elif len({i for i, _ in where}) >= 2:
            for index in sorted({i for i, _ in where}):
                here = [o for i, o in where if i == index]
                if len(here) == 1:
                    question = f"What colour is the {shape} in frame {frames[index].timecode}?"
                    evidence = ((index, here[0].row, here[0].col),)
                    turns.append(Turn("frame_colour", question, here[0].colour, evidence))
    return turns


def find_turn(scenes: Scenes, question: str) -> Turn:
    """The :class:`Turn` (with its evidence) of ``question`` about ``scenes``; raises if it is ambiguous."""
    candidates = picture_questions(scenes[0]) if len(scenes) == 1 and scenes[0].timecode is None else []
    candidates = candidates or video_questions(scenes)
    for turn in candidates:
        if turn.question == question:
            return turn
    raise ValueError(f"{question!r} has no unambiguous answer in these frames")


# -- training conversations: several questions about the same picture or video ---------------------


def picture_conversation(rng: np.random.Generator, num_frames: int = 1) -> tuple[Scenes, list[Turn]]:
    """A picture of 3-8 random objects (most with a unique shape beside a left neighbour) and its questions."""
    scene = Scene()
    exclude: tuple[str, ...] = ()
    if rng.random() < 0.7:  # a unique shape with a left neighbour, for left_of questions
        row, col = int(rng.integers(GRID)), int(rng.integers(1, GRID))
        target = _pick(rng, SHAPES)
        scene.objects.append(random_object(rng, target, _pick(rng, COLOUR_NAMES), row, col))
        scene.objects.append(
            random_object(rng, _pick(rng, SHAPES, (target,)), _pick(rng, COLOUR_NAMES), row, col - 1)
        )
        exclude = (target,)
    _fill(rng, scene, int(rng.integers(3, 9)) - len(scene.objects), exclude_shapes=exclude)
    return [scene], picture_questions(scene)


def video_conversation(rng: np.random.Generator, num_frames: int) -> tuple[Scenes, list[Turn]]:
    """A video whose shapes play three roles: 1-2 needles (once in the video), one shape in 2-6 frames
    (once per frame), and 1-2 distractor shapes (anywhere); returns the frames and their questions."""
    shapes = list(rng.permutation(SHAPES))
    needles = shapes[: int(rng.integers(1, 3))]
    repeated = shapes[len(needles)]
    frames = [Scene(timecode=i + 1) for i in range(num_frames)]
    distractors = shapes[len(needles) + 1 :]
    for frame in frames:
        _fill(rng, frame, int(rng.integers(0, 4)), exclude_shapes=(*needles, repeated), video=True)
    copies = int(rng.integers(2, min(6, num_frames) + 1))
    for index in rng.choice(num_frames, size=copies, replace=False):
        _place(rng, frames[int(index)], repeated, _pick(rng, COLOUR_NAMES), video=True)
    for shape in needles:
        _place(rng, frames[int(rng.integers(num_frames))], shape, _pick(rng, COLOUR_NAMES), video=True)
    assert distractors  # five shapes: at most 2 needles + 1 repeated
    return frames, video_questions(frames)


def choose_turns(rng: np.random.Generator, turns: list[Turn], count: int) -> list[Turn]:
    """Up to ``count`` distinct questions, tasks as balanced as the candidates allow."""
    by_task: dict[str, list[Turn]] = {}
    for turn in turns:
        by_task.setdefault(turn[0], []).append(turn)
    pools = [list(rng.permutation(len(v))) for v in by_task.values()]
    chosen: list[Turn] = []
    order = list(rng.permutation(len(by_task)))
    while len(chosen) < count and any(pools):
        for k in order:
            if pools[k] and len(chosen) < count:
                chosen.append(list(by_task.values())[k][int(pools[k].pop())])
    return chosen
