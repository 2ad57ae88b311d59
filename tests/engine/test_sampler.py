import pytest
import torch

from zipvl_ray.engine.sampler import apply_penalties, make_generator, sample
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
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": 11.0}, "repetition_penalty"),
    ],
)
def test_sampling_params_the_sampler_cannot_use_are_refused_up_front(kwargs, message):
    from zipvl_ray.engine import RequestError

    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_the_whole_seed_range_seeds_a_generator():
    for seed in (-(2**63), 0, 2**64 - 1):
        torch.Generator().manual_seed(SamplingParams(seed=seed, temperature=1.0).seed)


def test_penalties_follow_the_formulas_of_openai_and_transformers():
    """Repetition (prompt and output tokens; positive logits divided, negative multiplied), then frequency
    (x the count in the output) and presence (once), subtracted."""
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.1)
    got = apply_penalties(logits, p, prompt_ids=[1], output_ids=[3, 3, 2])
    assert got.tolist() == pytest.approx([2.0, -2.0, 0.25 - 0.5 - 0.1, 1.5 - 1.0 - 0.1])
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # a new tensor
    # Frequency and presence look at the output only; repetition at the prompt too.
    assert apply_penalties(logits, SamplingParams(frequency_penalty=1.0), [0], []).tolist() == logits.tolist()
    assert apply_penalties(logits, SamplingParams(repetition_penalty=2.0), [0], [])[0].item() == 1.0
    # The engine passes the prompt's distinct ids as a tensor, computed once per request.
    as_tensor = apply_penalties(logits, p, prompt_ids=torch.tensor([1, 1]), output_ids=[3, 3, 2])
    assert as_tensor.tolist() == got.tolist()


def test_a_penalty_changes_the_choice_and_not_the_reported_logprobs():
    logits = torch.tensor([[0.0, 5.0, 4.9], [0.0, 5.0, 4.9]])
    params = [SamplingParams(frequency_penalty=0.5, logprobs=1), SamplingParams(logprobs=1)]
    tokens, logprobs = sample(logits, params, [None, None], histories=[([], [1]), ([], [1])])
    assert tokens == [2, 1]  # the penalized row only
    raw = torch.log_softmax(logits[0], -1)
    assert logprobs[0]["logprob"] == pytest.approx(raw[2].item()) and logprobs[0]["top"][0][0] == 1
    # Sampled rows draw from the penalized distribution: a large penalty removes a token.
    p = SamplingParams(temperature=1.0, presence_penalty=2.0, seed=0)
    g = make_generator(0)
    big = torch.tensor([[0.0, 3.0, 3.0]])
    drawn = [sample(big, [p], [g], histories=[([], [1])])[0][0] for _ in range(400)]
    assert drawn.count(1) < 0.3 * drawn.count(2)  # e^-2 = 0.14 as likely; unpenalized, as likely
    with pytest.raises(ValueError, match="histories"):
        sample(logits[:1], params[:1], [None])
