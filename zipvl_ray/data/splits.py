"""Seeded splits: short context (one picture), medium and long context (videos), train / val / test.

A sample is fully determined by ``(split, partition, seed, index)``: its random generator is
``numpy.random.default_rng([PARTITION_IDS[partition], SPLIT_IDS[split], seed, index])``, so the
``test`` partition draws from streams the ``train`` partition never touches (training only ever asks
for ``partition="train"``). Nothing is stored on disk; a 64-frame sample renders in a few ms.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from zipvl_ray.data.scenes import Scene
from zipvl_ray.data.tasks import (
    PICTURE_TASKS,
    TASKS,
    VIDEO_TASKS,
    Turn,
    choose_turns,
    find_turn,
    picture_conversation,
    video_conversation,
)

PARTITION_IDS = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class SplitSpec:
    """Which tasks and how many frames a split holds.

    Attributes
    ----------
    name : str
        ``short``, ``medium`` or ``long``.
    tasks : tuple[str, ...]
        Task names (keys of :data:`~zipvl_ray.data.tasks.TASKS`); sample ``i`` gets ``tasks[i % len]``.
    min_frames, max_frames : int
        Frames per sample, drawn uniformly in ``[min_frames, max_frames]`` (1 = one still picture).
    split_id : int
        Part of every sample's seed.
    """

    name: str
    tasks: tuple[str, ...]
    min_frames: int
    max_frames: int
    split_id: int


SPLITS: dict[str, SplitSpec] = {
    "short": SplitSpec("short", PICTURE_TASKS, 1, 1, split_id=11),
    "medium": SplitSpec("medium", VIDEO_TASKS, 2, 15, split_id=12),
    "long": SplitSpec("long", VIDEO_TASKS, 16, 64, split_id=13),
}


@dataclass
class Sample:
    """One question about one picture or video, with its answer.

    Attributes
    ----------
    split, partition, task : str
        Where it comes from and which task generated it.
    index : int
        Position in its split stream.
    scenes : list[Scene]
        One scene per frame (one for a picture).
    question, answer : str
        The question text and the expected answer (a word or a number).
    evidence : tuple of (frame, row, col)
        The cells the answer depends on (see :class:`~zipvl_ray.data.tasks.Turn`).
    followups : list of Turn
        More questions about the same frames, asked in later turns (training conversations only).
    """

    split: str
    partition: str
    task: str
    index: int
    scenes: list[Scene] = field(repr=False)
    question: str = ""
    answer: str = ""
    evidence: tuple[tuple[int, int, int], ...] = ()
    followups: list[Turn] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.scenes)

    def pixels(self) -> np.ndarray:
        """All frames, ``uint8 (num_frames, 112, 112, 3)``."""
        return np.stack([scene.render() for scene in self.scenes])

    def images(self) -> list[Image.Image]:
        """All frames as PIL images (one ``<image>`` placeholder each)."""
        return [scene.to_pil() for scene in self.scenes]

    def messages(self) -> list[dict]:
        """A one-turn chat: every frame as an image part, then the question."""
        content = [{"type": "image"} for _ in self.scenes] + [{"type": "text", "text": self.question}]
        return [{"role": "user", "content": content}]

    def turns(self) -> list[Turn]:
        """The first and every follow-up question."""
        return [Turn(self.task, self.question, self.answer, self.evidence), *self.followups]


def sample_rng(split: str, partition: str, index: int, seed: int = 0) -> np.random.Generator:
    """The generator of sample ``index`` of ``split`` / ``partition``."""
    if partition not in PARTITION_IDS:
        raise ValueError(f"unknown partition {partition!r}; use one of {sorted(PARTITION_IDS)}")
    return np.random.default_rng([PARTITION_IDS[partition], SPLITS[split].split_id, seed, index])


def make_sample(
    split: str,
    partition: str,
    index: int,
    *,
    seed: int = 0,
    task: str | None = None,
    num_frames: int | None = None,
) -> Sample:
    """Generate sample ``index`` of a split (deterministic).

    Parameters
    ----------
    split : {"short", "medium", "long"}
    partition : {"train", "val", "test"}
    index : int
        Position in the stream; the task is ``tasks[index % len(tasks)]`` unless ``task`` is given.
    seed : int
        Stream seed (training runs may use another; test splits use 0).
    task : str, optional
        Force a task of the split.
    num_frames : int, optional
        Force the number of frames (training batches samples of equal length); it must lie in the
        split's range.
    """
    spec = SPLITS[split]
    name = task or spec.tasks[index % len(spec.tasks)]
    if name not in spec.tasks:
        raise ValueError(f"task {name!r} is not part of split {split!r} ({', '.join(spec.tasks)})")
    rng = sample_rng(split, partition, index, seed)
    frames = int(rng.integers(spec.min_frames, spec.max_frames + 1))
    if num_frames is not None:
        if not spec.min_frames <= num_frames <= spec.max_frames:
            raise ValueError(
                f"split {split!r} holds {spec.min_frames}-{spec.max_frames} frames, not {num_frames}"
            )
        frames = num_frames
    scenes, question, answer = TASKS[name](rng, frames)
    turn = find_turn(scenes, question)
    if turn.answer != answer or turn.task != name:
        raise AssertionError(f"task {name} generated {question!r} -> {answer!r} but the frames say {turn}")
    return Sample(split, partition, name, index, scenes, question, answer, turn.evidence)


def make_split(split: str, partition: str, size: int, *, seed: int = 0, start: int = 0) -> list[Sample]:
    """``size`` consecutive samples of a split, tasks balanced (round-robin)."""
    return [make_sample(split, partition, start + i, seed=seed) for i in range(size)]


def iterate_split(split: str, partition: str, *, seed: int = 0, start: int = 0) -> Iterator[Sample]:
    """An endless stream of samples (training)."""
    index = start
    while True:
        yield make_sample(split, partition, index, seed=seed)
        index += 1


def make_conversation(
    split: str,
    partition: str,
    index: int,
    *,
    seed: int = 0,
    num_frames: int | None = None,
    max_turns: int = 6,
) -> Sample:
    """A training sample asking up to ``max_turns`` questions about the same frames (multi-turn chat).

    The frames are random (not built around one question) and the questions are every unambiguous
    question of the split's tasks, so one long video supervises several answers.
    """
    spec = SPLITS[split]
    rng = np.random.default_rng([PARTITION_IDS[partition], spec.split_id, seed, index, 99])
    frames = num_frames or int(rng.integers(spec.min_frames, spec.max_frames + 1))
    make = picture_conversation if spec.max_frames == 1 else video_conversation
    scenes, candidates = make(rng, frames)
    first, *followups = choose_turns(rng, [t for t in candidates if t.task in spec.tasks], max_turns)
    return Sample(
        split, partition, first.task, index, scenes, first.question, first.answer, first.evidence, followups
    )
