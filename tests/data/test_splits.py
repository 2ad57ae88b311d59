"""Splits and tasks: deterministic, disjoint streams, and every answer is what the picture shows."""

from __future__ import annotations

import numpy as np
import pytest

from zipvl_ray.data import SPLITS, TASKS, make_sample, make_split
from zipvl_ray.data.scenes import COLOURS, PLURALS, SHAPES, Scene


def fingerprint(sample) -> tuple:
    """Question, answer and every frame's content (objects and timecode): equal samples render equally."""
    return (sample.question, sample.answer, tuple((s.timecode, tuple(s.objects)) for s in sample.scenes))


def objects(scenes: list[Scene]):
    return [(frame.timecode, obj) for frame in scenes for obj in frame.objects]


def check_colour(scenes, question, answer):
    shape = question.removeprefix("What colour is the ").removesuffix("?")
    found = [o for _, o in objects(scenes) if o.shape == shape]
    assert len(found) == 1 and found[0].colour == answer


def check_shape(scenes, question, answer):
    colour = question.removeprefix("What shape is the ").removesuffix(" object?")
    found = [o for _, o in objects(scenes) if o.colour == colour]
    assert len(found) == 1 and found[0].shape == answer


def check_count(scenes, question, answer):
    plural = question.removeprefix("How many ").removesuffix(" are there?")
    shape = next(s for s, p in PLURALS.items() if p == plural)
    assert sum(o.shape == shape for _, o in objects(scenes)) == int(answer)


def check_left_of(scenes, question, answer):
    shape = question.removeprefix("What is left of the ").removesuffix("?")
    (target,) = [o for _, o in objects(scenes) if o.shape == shape]
    (left,) = [o for _, o in objects(scenes) if (o.row, o.col) == (target.row, target.col - 1)]
    assert left.shape == answer


def check_video_colour(scenes, question, answer):
    check_colour(scenes, question, answer)


def check_video_frame(scenes, question, answer):
    shape = question.removeprefix("In which frame is the ").removesuffix("?")
    (timecode,) = [t for t, o in objects(scenes) if o.shape == shape]
    assert str(timecode) == answer


def check_frame_colour(scenes, question, answer):
    shape, frame = question.removeprefix("What colour is the ").removesuffix("?").split(" in frame ")
    found = [(t, o) for t, o in objects(scenes) if o.shape == shape]
    assert len(found) >= 2
    (asked,) = [o for t, o in found if t == int(frame)]
    assert asked.colour == answer


CHECKS = {
    "colour": check_colour,
    "shape": check_shape,
    "count": check_count,
    "left_of": check_left_of,
    "video_colour": check_video_colour,
    "video_frame": check_video_frame,
    "frame_colour": check_frame_colour,
}


def test_every_task_has_a_check():
    assert set(CHECKS) == set(TASKS)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_answers_match_the_pictures(split):
    spec = SPLITS[split]
    for index in range(6 * len(spec.tasks)):
        sample = make_sample(split, "test", index)
        assert sample.task == spec.tasks[index % len(spec.tasks)]
        assert spec.min_frames <= sample.num_frames <= spec.max_frames
        CHECKS[sample.task](sample.scenes, sample.question, sample.answer)
        if sample.num_frames > 1:
            assert [s.timecode for s in sample.scenes] == list(range(1, sample.num_frames + 1))
            assert all((o.row, o.col) != (0, 0) for _, o in objects(sample.scenes))


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_samples_are_deterministic(split):
    first = make_split(split, "test", 3)
    again = make_split(split, "test", 3)
    assert [fingerprint(s) for s in first] == [fingerprint(s) for s in again]
    assert all(np.array_equal(a.pixels(), b.pixels()) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_test_partition_is_disjoint_from_training(split):
    test = {fingerprint(s) for s in make_split(split, "test", 24)}
    train = {fingerprint(s) for s in make_split(split, "train", 24)}
    train |= {fingerprint(s) for s in make_split(split, "train", 24, seed=1)}
    assert not test & train
    assert make_sample(split, "test", 0).question != "" and len(test) == 24


def test_answers_are_short_words_or_numbers():
    vocabulary = set(COLOURS) | set(SHAPES) | {str(i) for i in range(65)}
    for split in SPLITS:
        assert {s.answer for s in make_split(split, "test", 30)} <= vocabulary


@pytest.mark.parametrize(("split", "frames"), [("medium", 2), ("medium", 15), ("long", 16), ("long", 64)])
def test_num_frames_can_be_forced_within_the_split_range(split, frames):
    assert make_sample(split, "train", 3, num_frames=frames).num_frames == frames


@pytest.mark.parametrize(("split", "frames"), [("short", 2), ("medium", 16), ("long", 8)])
def test_num_frames_outside_the_range_is_refused(split, frames):
    with pytest.raises(ValueError, match="frames"):
        make_sample(split, "train", 0, num_frames=frames)


def test_unknown_partition_is_refused():
    with pytest.raises(ValueError, match="partition"):
        make_sample("short", "dev", 0)


def test_long_split_has_thousands_of_visual_tokens():
    frames = [s.num_frames for s in make_split("long", "test", 32)]
    assert min(frames) >= 16 and max(frames) <= 64
    assert np.mean(frames) * 64 > 1500
