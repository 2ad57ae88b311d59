"""The paged engine produces exactly what the reference model.generate + ZipVLCache produces."""

import pytest

from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine import LLM, EncodedPrompt, SamplingParams
from zipvl_ray.models import load_model
from zipvl_ray.models.adapters import VLMAdapter
from zipvl_ray.multimodal import PromptProcessor
from zipvl_ray.vision import VisionEncoder

from ..conftest import TINY_ARCHS
from .conftest import mixed_prompts, reference_tokens

CONFIGS = {
    "tau1.0": ZipVLConfig(tau=1.0),
    "tau0.9": ZipVLConfig(tau=0.9, probe_recent=8, probe_random=8),
    "max_keep_ratio0.3": ZipVLConfig(max_keep_ratio=0.3),
}
STEPS = 10


@pytest.fixture(scope="module", params=TINY_ARCHS)
def arch(request):
    model, processor = load_model(request.param)
    return request.param, model, processor


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_engine_matches_reference_on_a_mixed_batch(arch, config_name):
    _, model, processor = arch
    config = CONFIGS[config_name]
    llm = LLM(
        model,
        processor=processor,
        zipvl=config,
        engine=EngineConfig(kv_cache_bytes=8 << 20, max_model_len=4096),
    )
    prompts = mixed_prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=STEPS, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == reference_tokens(model, processor, prompt, config, STEPS)
        assert out.finish_reason == "length"
        assert len(out.metrics.kept_tokens_per_layer) == model.config.get_text_config().num_hidden_layers
    if config_name == "tau1.0":
        assert all(k == out.metrics.prompt_tokens for out in outs for k in out.metrics.kept_tokens_per_layer)
    assert llm.stats().kv_bytes_used == 0
    llm.engine.runner.kv.check_consistency()


def test_precomputed_features_equal_pixels(arch):
    """The LLM stage without a vision tower, fed by a separate VisionEncoder, gives the same tokens."""
    name, model, processor = arch
    config = CONFIGS["tau0.9"]
    prompts = mixed_prompts(n_images=(1, 2, 3))
    with_pixels = LLM(model, processor=processor, zipvl=config, engine=EngineConfig(kv_cache_bytes=8 << 20))
    expected = [
        o.token_ids for o in with_pixels.generate(prompts, SamplingParams(max_tokens=STEPS, ignore_eos=True))
    ]

    encoder = VisionEncoder.from_pretrained(name)
    text_only = LLM(name, zipvl=config, engine=EngineConfig(kv_cache_bytes=8 << 20))

    VLMAdapter(text_only.engine.runner.model).drop_vision_tower()  # the LLM stage has no vision tower
    text_only.engine.vision = None
    pp = PromptProcessor(processor)
    encoded = []
    for p in prompts:
        prepared = pp.prepare(p["messages"], p["images"])
        encoded.append(EncodedPrompt(prepared.token_ids, encoder.encode(prepared.images)))
    got = [
        o.token_ids for o in text_only.generate(encoded, SamplingParams(max_tokens=STEPS, ignore_eos=True))
    ]
    assert got == expected


def test_decode_compression_matches_reference(arch):
    _, model, processor = arch
    config = ZipVLConfig(tau=0.6, probe_recent=8, probe_random=8, decode_compress_interval=4)
    llm = LLM(
        model, processor=processor, zipvl=config, engine=EngineConfig(kv_cache_bytes=8 << 20, block_size=4)
    )
    prompts = mixed_prompts(n_images=(1, 2))
    outs = llm.generate(prompts, SamplingParams(max_tokens=14, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == reference_tokens(model, processor, prompt, config, 14)
    llm.engine.runner.kv.check_consistency()


def test_offline_generate_asks_for_final_outputs_only(tiny_llava):
    """``LLM.generate`` returns finished outputs only, so its requests are ``final_only`` (the engine builds
    nothing per token); the caller's parameters are left as they were, and a ``None`` in the list is the
    default parameters."""
    model, processor = tiny_llava
    llm = LLM(model, processor=processor, engine=EngineConfig(kv_cache_bytes=8 << 20))
    seen, add = [], llm.engine.add_request

    def spy(request_id, prompt, sampling=None, *args, **kwargs):
        seen.append(sampling.output_kind)
        return add(request_id, prompt, sampling, *args, **kwargs)

    llm.engine.add_request = spy
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    prompts = mixed_prompts(n_images=(0, 1))
    outs = llm.generate(prompts, [params, None])
    assert seen == ["final_only", "final_only"] and params.output_kind == "stream"
    assert len(outs[0].token_ids) == 3 and all(o.finished for o in outs)
    streamed = llm.engine
    streamed.add_request = add
    streamed.add_request("s", prompts[0], params)
    per_step = []
    while streamed.has_unfinished():
        per_step += streamed.step()
    assert [o.token_ids for o in per_step][-1] == outs[0].token_ids and len(per_step) == 3


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_greedy_decoding_with_a_penalty_picks_the_best_penalized_token(tiny_llava, penalty):
    """In a batch with an unpenalized request, each token of the penalized one is the argmax of the raw
    log-probabilities (the reported ones) less the penalty of the tokens generated before it, checked over
    the top 20; and the penalty changes some choice (a random model repeats itself)."""
    model, processor = tiny_llava
    llm = LLM(model, processor=processor, engine=EngineConfig(kv_cache_bytes=8 << 20))
    prompts = mixed_prompts(n_images=(1, 0))
    weight = 2.0
    penalized = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=20, **{penalty: weight})
    plain = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=20)
    out, other = llm.generate(prompts, [penalized, plain])
    assert other.token_ids == llm.generate(prompts[1:], [plain])[0].token_ids  # the batch-mate is untouched
    changed = 0
    for t, entry in enumerate(out.logprobs):
        before = out.token_ids[:t]

        def score(token: int, logprob: float, before: list[int] = before) -> float:
            count = before.count(token)
            return logprob - (weight * count if penalty == "frequency_penalty" else weight * (count > 0))

        best = max(score(i, lp) for i, lp in entry["top"])
        assert score(entry["token_id"], entry["logprob"]) >= best - 1e-4, t
        changed += entry["token_id"] != entry["top"][0][0]
    assert changed >= 1
