import pytest
import torch

from zipvl_ray.engine.sampler import make_generator, sample
from zipvl_ray.engine.types import RequestError, SamplingParams


def test_greedy_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    tokens, _ = sample(logits, [SamplingParams(), SamplingParams()], [None, None])
    assert tokens == [1, 0]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample(logits, [p], [g])[0][0] for g in [make_generator(7)] for _ in range(20)]
    g = make_generator(7)
    b = [sample(logits, [p], [g])[0][0] for _ in range(20)]
    g2 = make_generator(8)
    c = [sample(logits, [p], [g2])[0][0] for _ in range(20)]
    assert a[0] == b[0] and b != c


@pytest.mark.parametrize(
    ("top_k", "top_p", "allowed"), [(1, 1.0, {2}), (2, 1.0, {1, 2}), (0, 0.5, {2}), (0, 0.8, {1, 2})]
)
def test_top_k_top_p_restrict_the_support(top_k, top_p, allowed):
    logits = torch.log(torch.tensor([[0.05, 0.3, 0.6, 0.05]]))
    p = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    g = make_generator(0)
    seen = {sample(logits, [p], [g])[0][0] for _ in range(200)}
    assert seen <= allowed and len(seen) >= 1


def test_logprobs():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    _, lp = sample(logits, [SamplingParams(logprobs=2)], [None])
    expected = torch.log_softmax(logits[0], -1)
    assert lp[0]["token_id"] == 2 and lp[0]["logprob"] == pytest.approx(expected[2].item())
    assert [t for t, _ in lp[0]["top"]] == [2, 1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -1},
        {"temperature": 3},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"logprobs": 21},
        {"stop": [""]},
        {"temperature": float("nan")},
    ],
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-6])
def test_a_tiny_temperature_is_greedy_instead_of_overflowing(temperature):
    """1 / 1e-40 overflows the logits to inf and softmax to NaN: the API accepts any temperature in
    [0, 2], so these must decode greedily (vLLM's rule), not raise and fail the whole step."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=temperature), SamplingParams(), SamplingParams(temperature=1.0)]
    tokens, _ = sample(logits, params, [make_generator(1), None, make_generator(2)])
    assert tokens[:2] == logits[:2].argmax(dim=-1).tolist()


def test_a_row_whose_distribution_is_not_finite_falls_back_to_its_argmax():
    logits = torch.tensor([[float("inf"), 0.0, -1.0], [0.0, 1.0, 2.0]])
    tokens, _ = sample(logits, [SamplingParams(temperature=1.0)] * 2, [make_generator(0), make_generator(0)])
    assert tokens[0] == 0 and 0 <= tokens[1] < 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logprobs": 2.5}, "logprobs"),  # torch.topk would raise inside the step and fail every request
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": 2**64}, "seed"),  # torch's generator takes [-2**63, 2**64)
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_sampling_params_the_sampler_cannot_use_are_refused_up_front(kwargs, message):
    from zipvl_ray.engine import RequestError

    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_the_whole_seed_range_seeds_a_generator():
    for seed in (-(2**63), 0, 2**64 - 1):
        torch.Generator().manual_seed(SamplingParams(seed=seed, temperature=1.0).seed)
