"""ZipVL inside real transformers VLMs: the invariants of the reference path, on all four tiny architectures."""

import math

import pytest
import torch

from zipvl_ray.attention import set_zipvl_config
from zipvl_ray.cache import ZipVLCache
from zipvl_ray.config import ZipVLConfig
from zipvl_ray.models import BUILTIN_MODELS, load_model

from .conftest import TINY_ARCHS, chat, greedy, make_image

PROMPTS = ["Describe the picture in detail, please.", "Hi", "What colour is the square in the middle?"]


@pytest.fixture(scope="module", params=TINY_ARCHS)
def arch(request):
    name = request.param
    model, processor = load_model(name)
    stock, _ = BUILTIN_MODELS[name]()  # same weights, stock SDPA everywhere
    return name, model, stock, processor


def batch_inputs(processor, batch: int, n_images: int = 1):
    texts = [
        processor.apply_chat_template(chat(t, n_images), add_generation_prompt=True, tokenize=False)
        for t in PROMPTS[:batch]
    ]
    images = [make_image(10 * i + j) for i in range(batch) for j in range(n_images)]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("batch", [1, 3])
def test_tau_one_equals_stock_sdpa(arch, batch):
    _, model, stock, processor = arch
    set_zipvl_config(model, ZipVLConfig(tau=1.0))
    inputs = batch_inputs(processor, batch)
    ref_tokens, ref_logits = greedy(stock, inputs)
    cache = ZipVLCache(model)
    tokens, logits = greedy(model, inputs, cache)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    stats = cache.stats()
    assert stats.kv_bytes == stats.kv_bytes_dense  # nothing evicted
    assert stats.logical_length == inputs["input_ids"].shape[1] + 15  # the last token is never fed back


@pytest.mark.parametrize(
    "config",
    [
        ZipVLConfig(tau=0.9, probe_recent=16, probe_random=16, seed=1),
        ZipVLConfig(tau=0.999, max_keep_ratio=0.3),
        ZipVLConfig(tau=0.9, normalize="causal_length", dense_layers=[1]),
    ],
    ids=["tau0.9", "max_keep_ratio0.3", "causal_length+dense_layer"],
)
def test_evicted_decode_equals_masked_decode(arch, config):
    _, model, _, processor = arch
    set_zipvl_config(model, config)
    inputs = batch_inputs(processor, 3, n_images=2)
    evicted = ZipVLCache(model)
    masked = ZipVLCache(model, evict=False)
    tokens_e, logits_e = greedy(model, inputs, evicted)
    tokens_m, logits_m = greedy(model, inputs, masked)
    assert torch.equal(tokens_e, tokens_m)
    torch.testing.assert_close(logits_e, logits_m, rtol=1e-4, atol=1e-4)
    stats = evicted.stats()
    assert stats.kv_bytes < stats.kv_bytes_dense  # really evicted
    assert stats.kept_per_layer == masked.stats().kept_per_layer


def test_max_keep_ratio_budget_and_byte_accounting(arch):
    _, model, _, processor = arch
    set_zipvl_config(model, ZipVLConfig(max_keep_ratio=0.3))
    inputs = batch_inputs(processor, 1, n_images=2)
    cache = ZipVLCache(model)
    greedy(model, inputs, cache, steps=4)
    stats = cache.stats()
    n = stats.prompt_tokens[0]
    text_cfg = model.config.get_text_config(decoder=True)
    per_token = 2 * text_cfg.num_key_value_heads * text_cfg.head_dim * 4  # fp32
    for layer in stats.prompt_kept_per_layer:
        assert 1 <= layer[0] <= math.ceil(0.3 * n)
    held = sum(layer[0] for layer in stats.kept_per_layer)
    assert held == sum(layer[0] + 3 for layer in stats.prompt_kept_per_layer)  # 3 decode steps fed back
    assert stats.kv_bytes == held * per_token
    assert stats.kv_bytes_allocated == stats.kv_bytes  # batch of one: no padding
    assert stats.kv_bytes_dense == (n + 3) * per_token * text_cfg.num_hidden_layers


def test_multi_turn_continuation_equals_masked(arch):
    """A second turn (q_len > 1 on a non-empty cache) is dense over the new chunk and never re-admits
    evicted tokens: the evicted cache must equal the masked oracle through both turns."""
    _, model, _, processor = arch
    set_zipvl_config(model, ZipVLConfig(tau=0.9, probe_recent=8, probe_random=8))
    inputs = batch_inputs(processor, 1)
    follow = processor.tokenizer("\nUSER: and the colours?\nASSISTANT:", return_tensors="pt")["input_ids"]
    results = []
    for evict in (True, False):
        cache = ZipVLCache(model, evict=evict)
        tokens, _ = greedy(model, inputs, cache, steps=4)
        ids = torch.cat([tokens, follow], dim=1)
        mask = torch.ones_like(ids)
        # The images are in the cache already: the second turn passes no pixels.
        extra = {k: v for k, v in inputs.items() if k in ("image_grid_thw", "mm_token_type_ids")}
        if "mm_token_type_ids" in extra:
            extra["mm_token_type_ids"] = torch.cat(
                [
                    extra["mm_token_type_ids"],
                    torch.zeros(1, ids.shape[1] - extra["mm_token_type_ids"].shape[1], dtype=torch.long),
                ],
                1,
            )
        tokens2, logits2 = greedy(model, {"input_ids": ids, "attention_mask": mask, **extra}, cache, steps=4)
        results.append((tokens2, logits2, cache.stats()))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)
    assert results[0][2].kv_bytes < results[0][2].kv_bytes_dense


def test_stateless_forward_equals_cached_prefill(arch):
    _, model, _, processor = arch
    set_zipvl_config(model, ZipVLConfig(tau=0.9, probe_recent=8, probe_random=8))
    inputs = batch_inputs(processor, 3)
    with torch.no_grad():
        a = model(**inputs, use_cache=False).logits
        b = model(**inputs, past_key_values=ZipVLCache(model)).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(a[mask], b[mask], rtol=1e-5, atol=1e-5)


def test_decode_with_a_foreign_cache_is_refused(arch):
    _, model, _, processor = arch
    set_zipvl_config(model, ZipVLConfig())
    inputs = batch_inputs(processor, 1)
    with pytest.raises(TypeError, match="ZipVLCache"), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_decode_compress_interval_equals_masked(arch):
    _, model, _, processor = arch
    set_zipvl_config(model, ZipVLConfig(tau=0.6, decode_compress_interval=4, probe_recent=8, probe_random=8))
    inputs = batch_inputs(processor, 2)
    evicted, masked = ZipVLCache(model), ZipVLCache(model, evict=False)
    tokens_e, logits_e = greedy(model, inputs, evicted, steps=12)
    tokens_m, logits_m = greedy(model, inputs, masked, steps=12)
    assert torch.equal(tokens_e, tokens_m)
    torch.testing.assert_close(logits_e, logits_m, rtol=1e-4, atol=1e-4)
    stats = evicted.stats()
    generated_held = [
        kept[0] - prompt[0]
        for kept, prompt in zip(stats.kept_per_layer, stats.prompt_kept_per_layer, strict=True)
    ]
    assert min(generated_held) < 11  # 11 fed back; some generated tokens were evicted


def test_decode_compression_frees_what_it_evicts(arch):
    """Bytes reported = bytes held after decode-time compression: the compaction really shrinks the
    tensors (reported bytes come from the live slots, allocated bytes from the tensors themselves)."""
    _, model, _, processor = arch
    set_zipvl_config(model, ZipVLConfig(tau=0.6, decode_compress_interval=4, probe_recent=8, probe_random=8))
    inputs = batch_inputs(processor, 1)
    cache = ZipVLCache(model)
    greedy(model, inputs, cache, steps=12)
    stats = cache.stats()
    held = [kept[0] for kept in stats.kept_per_layer]
    fed = [prompt[0] + 11 for prompt in stats.prompt_kept_per_layer]  # 11 generated tokens fed back
    assert max(f - h for f, h in zip(fed, held, strict=True)) > 0  # some generated tokens were evicted
    assert stats.kv_bytes_allocated == stats.kv_bytes  # batch of one: no padding, nothing left behind


def test_decode_compress_never_evicts_a_later_turns_prompt():
    """``decode_compress_interval`` scores the last N *generated* tokens: a later turn's prompt chunk restarts
    the count, so its tokens are never taken for generated ones and evicted."""
    torch.manual_seed(0)
    heads, dim = 2, 8
    config = ZipVLConfig(tau=0.3, decode_compress_interval=4, probe_recent=4, probe_random=4)
    cache = ZipVLCache(1, config)

    def feed(q_len):
        q, k, v = (torch.randn(1, heads, q_len, dim) * s for s in (3, 3, 1))
        cache.zipvl_attention(0, q, k, v, None, dim**-0.5, config)

    layer = cache.layers[0]
    feed(10)  # turn 1: prompt, columns 0..9
    for _ in range(6):  # columns 10..15; the window 10..13 is compressed after 4 steps
        feed(1)
    assert set(range(10, 14)) - set(layer.slots[0].tolist())  # tau 0.3 evicts some generated tokens
    feed(5)  # turn 2: prompt, columns 16..20
    for _ in range(4):  # columns 21..24: compressed as one window of 4 generated tokens
        feed(1)
    held = set(layer.slots[0].tolist())
    assert set(range(16, 21)) <= held  # the second prompt is whole
    assert set(range(21, 25)) - held  # and its generated window was compressed
