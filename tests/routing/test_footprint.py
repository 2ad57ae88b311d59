"""The batched footprint prediction equals the scalar one exactly, whatever the profiles and overrides."""

from __future__ import annotations

import random

import pytest

from zipvl_ray.routing.footprint import (
    KVProfile,
    RoutingHints,
    predict_request_bytes,
    predict_request_bytes_many,
)


def random_profile(rng: random.Random) -> KVProfile:
    layers = rng.choice([1, 4, 32, 80])
    fractions = (
        []
        if rng.random() < 0.15
        else [rng.choice([0.0, 0.07, 0.28, 0.55, 1.0, rng.random()]) for _ in range(layers)]
    )
    return KVProfile(
        capacity_bytes=1 << 30,
        block_size=rng.choice([1, 16, 256]),
        block_bytes=rng.choice([4096, 256 << 10]),
        num_layers=layers,
        kept_fraction_per_layer=fractions,
        zipvl_tau=rng.choice([None, 0.9, 0.975, 1.0]),
        zipvl_max_keep_ratio=rng.choice([None, 0.3, 0.6, 1.0]),
        zipvl_dense_layers=tuple(rng.sample(range(layers + 2), k=rng.choice([0, 0, 1, 2]))),
    )


def random_hints(rng: random.Random) -> RoutingHints:
    return RoutingHints(
        prompt_tokens=rng.choice([0, 1, 10, 15, 16, 17, 100, 999, 32768, rng.randrange(200_000)]),
        image_tokens=0,
        max_tokens=rng.choice([0, 1, 16, 2048]),
        tau=rng.choice([None, None, 0.5, 0.95, 0.975, 0.99, 1.0]),
        max_keep_ratio=rng.choice([None, None, 0.0, 0.2, 0.6, 0.9]),
        zipvl_enabled=rng.choice([None, None, True, False]),
    )


@pytest.mark.parametrize("seed", range(8))
def test_many_equals_one_at_a_time(seed):
    rng = random.Random(seed)
    for _ in range(50):
        profiles = [random_profile(rng) for _ in range(rng.randrange(1, 12))]
        hints = random_hints(rng)
        assert predict_request_bytes_many(hints, profiles) == [
            predict_request_bytes(hints, p) for p in profiles
        ]


def test_a_snapshot_converted_once_still_reads_its_own_fractions():
    """The per-snapshot array cache is keyed by the list object: a new list (a new snapshot) with other
    values is never answered from an old one's array."""
    hints = RoutingHints(prompt_tokens=1000, image_tokens=0, max_tokens=0)
    first = KVProfile(
        capacity_bytes=1 << 30, block_size=1, block_bytes=1, num_layers=2, kept_fraction_per_layer=[0.5, 0.5]
    )
    assert predict_request_bytes_many(hints, [first]) == [1000]
    second = KVProfile(
        capacity_bytes=1 << 30, block_size=1, block_bytes=1, num_layers=2, kept_fraction_per_layer=[0.1, 0.1]
    )
    assert predict_request_bytes_many(hints, [second, first]) == [200, 1000]


def test_absurd_counts_fall_back_to_python_integers():
    hints = RoutingHints(prompt_tokens=10**30, image_tokens=0, max_tokens=10**20)
    profile = KVProfile(
        capacity_bytes=1 << 30,
        block_size=16,
        block_bytes=4096,
        num_layers=2,
        kept_fraction_per_layer=[0.5, 1.0],
    )
    assert predict_request_bytes_many(hints, [profile]) == [predict_request_bytes(hints, profile)]


@pytest.mark.parametrize("block_bytes", [10**16, 2**64])
def test_a_geometry_past_int64_is_predicted_with_python_integers(block_bytes):
    """One bogus report (a huge ``block_bytes``) must neither wrap around (a full replica would look empty)
    nor raise inside the router: that geometry falls back to the scalar path."""
    hints = RoutingHints(prompt_tokens=5000, image_tokens=0, max_tokens=100)
    sane = KVProfile(
        capacity_bytes=1 << 30,
        block_size=16,
        block_bytes=4096,
        num_layers=80,
        kept_fraction_per_layer=[0.5] * 80,
    )
    bogus = KVProfile(
        capacity_bytes=1 << 30,
        block_size=16,
        block_bytes=block_bytes,
        num_layers=80,
        kept_fraction_per_layer=[0.5] * 80,
    )
    got = predict_request_bytes_many(hints, [sane, bogus])
    assert got == [predict_request_bytes(hints, sane), predict_request_bytes(hints, bogus)]
    assert got[1] > 1 << 63
