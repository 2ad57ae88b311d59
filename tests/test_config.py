import pytest
from pydantic import ValidationError

from zipvl_ray.config import EngineConfig, ZipVLConfig, ratio_ceil


def test_defaults_match_the_spec():
    c = ZipVLConfig()
    assert (c.tau, c.probe_recent, c.probe_random, c.normalize) == (0.975, 64, 64, "probe_count")
    assert c.keep_last and c.enabled and c.dense_layers == [] and c.seed is None
    assert (c.min_keep_ratio, c.max_keep_ratio, c.decode_compress_interval) == (0.0, None, 0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": 1.5}, "tau"),
        ({"tau": -0.1}, "tau"),
        ({"probe_recent": -1}, "probe_recent"),
        ({"probe_random": -5}, "probe_random"),
        ({"min_keep_ratio": -0.1}, "min_keep_ratio"),
        ({"min_keep_ratio": 1.1}, "min_keep_ratio"),
        ({"max_keep_ratio": 2.0}, "max_keep_ratio"),
        ({"min_keep_ratio": 0.6, "max_keep_ratio": 0.5}, "min_keep_ratio"),
        ({"normalize": "softmax"}, "normalize"),
        ({"decode_compress_interval": -1}, "decode_compress_interval"),
        ({"probe_recent": 0, "probe_random": 0}, "probe_recent"),
        ({"dense_layers": [-1]}, "dense_layers"),
        ({"taux": 0.9}, "taux"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        ZipVLConfig(**kwargs)
    assert field in str(info.value)


def test_overrides_revalidate():
    c = ZipVLConfig().with_overrides(tau=0.9, max_keep_ratio=None)
    assert c.tau == 0.9 and c.max_keep_ratio is None
    with pytest.raises(ValidationError, match="tau"):
        ZipVLConfig().with_overrides(tau=2.0)
    assert ZipVLConfig().with_overrides() == ZipVLConfig()


@pytest.mark.parametrize(
    ("ratio", "n", "expected"), [(0.3, 10, 3), (0.3, 11, 4), (0.1, 100, 10), (1.0, 7, 7), (0.0, 5, 0)]
)
def test_ratio_ceil_ignores_float_noise(ratio, n, expected):
    assert ratio_ceil(ratio, n) == expected


def test_token_bounds():
    assert ZipVLConfig(max_keep_ratio=0.3).token_bounds(10) == (1, 3)
    assert ZipVLConfig(min_keep_ratio=0.5).token_bounds(10) == (5, 10)
    assert ZipVLConfig(max_keep_ratio=0.0).token_bounds(10) == (1, 1)


def test_engine_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)
