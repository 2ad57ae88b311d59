"""The CUDA paths, on a GPU (every test here skips without one; CI has none).

The CPU suite proves the invariants on CPU; these run the same invariants where a GPU user runs them:
the sparse kernel the backend picks (flash-attn when it imports, else SDPA) against masked dense
attention in fp16 / bf16 / fp32, the backend choice itself, ``tau = 1`` equals stock attention and
evicted decoding equals masked decoding on every tiny architecture, the paged engine against the
reference path with its KV pool on the device (bytes reported = bytes held, all freed at the end),
and the trained ``zipvl-tiny`` answering its held-out question. ``benchmarks/gpu_session.sh`` runs
this file first.
"""

from __future__ import annotations

import math

import pytest
import torch

from zipvl_ray.cache import ZipVLCache
from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.sparsity import (
    attention_backend,
    flash_attn_available,
    masked_dense_attention,
    sparse_causal_attention,
    zipvl_select,
)

from .conftest import TINY_ARCHS, chat, greedy, make_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
PROMPTS = ["Describe the picture in detail, please.", "Hi", "What colour is the square in the middle?"]


def random_qkv(n: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0):
    """Token-major ``(n, heads, dim)`` query and ``(n, kv_heads, dim)`` key / value on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    return q.to(CUDA, dtype), k.to(CUDA, dtype), v.to(CUDA, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_sparse_attention_equals_masked_dense_attention_on_cuda(dtype):
    n, dim = 1031, 64
    q, k, v = random_qkv(n, 8, 2, dim, dtype)
    gen = torch.Generator().manual_seed(1)
    kept = torch.randperm(n - 1, generator=gen)[:300].sort().values
    kept = torch.cat([kept, torch.tensor([n - 1])]).to(CUDA)
    backend = attention_backend(CUDA, dtype)
    out = sparse_causal_attention(q, k, v, kept, 1 / math.sqrt(dim), backend=backend)
    ref = masked_dense_attention(q.float(), k.float(), v.float(), kept, 1 / math.sqrt(dim))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    dropped = torch.ones(n, dtype=torch.bool, device=CUDA)
    dropped[kept] = False
    assert not out[dropped].any()  # rows of dropped tokens are zero (paper Eq. 9)


def test_backend_is_flash_exactly_when_flash_attn_imports():
    assert attention_backend(CUDA, torch.bfloat16) == ("flash" if flash_attn_available() else "sdpa")
    assert attention_backend(CUDA, torch.float32) == "sdpa"  # flash-attn runs fp16 / bf16 only
    if not flash_attn_available():
        with pytest.raises(RuntimeError, match="flash-attn"):
            attention_backend(CUDA, torch.bfloat16, "flash")


def test_selection_on_cuda_agrees_with_cpu():
    n, dim = 2048, 64
    q, k, _ = random_qkv(n, 8, 2, dim, torch.float32, seed=3)
    config = ZipVLConfig(tau=0.9, seed=5)
    on_gpu = zipvl_select(q.transpose(0, 1), k.transpose(0, 1), config, 1 / math.sqrt(dim), layer_idx=2)
    on_cpu = zipvl_select(
        q.cpu().transpose(0, 1), k.cpu().transpose(0, 1), config, 1 / math.sqrt(dim), layer_idx=2
    )
    # the same probes and scores up to summation order: counts within a token, sets nearly equal
    assert abs(on_gpu.adaptive_count - on_cpu.adaptive_count) <= 1
    shared = len(set(on_gpu.kept.tolist()) & set(on_cpu.kept.tolist()))
    assert shared >= 0.99 * min(on_gpu.num_kept, on_cpu.num_kept)
    assert on_gpu.kept.device.type == "cuda" and int(on_gpu.kept[-1]) == n - 1


@pytest.fixture(scope="module", params=TINY_ARCHS)
def arch(request):
    from zipvl_ray.models import BUILTIN_MODELS, load_model

    model, processor = load_model(request.param, device=CUDA)
    stock, _ = BUILTIN_MODELS[request.param]()
    return request.param, model, stock.to(CUDA).eval(), processor


def cuda_inputs(processor, batch: int, n_images: int = 1):
    texts = [
        processor.apply_chat_template(chat(t, n_images), add_generation_prompt=True, tokenize=False)
        for t in PROMPTS[:batch]
    ]
    images = [make_image(10 * i + j) for i in range(batch) for j in range(n_images)]
    return processor(text=texts, images=images, return_tensors="pt", padding=True).to(CUDA)


def test_tau_one_equals_stock_attention_on_cuda(arch):
    from zipvl_ray.attention import set_zipvl_config

    _, model, stock, processor = arch
    set_zipvl_config(model, ZipVLConfig(tau=1.0))
    inputs = cuda_inputs(processor, 3)
    ref_tokens, ref_logits = greedy(stock, inputs)
    cache = ZipVLCache(model)
    tokens, logits = greedy(model, inputs, cache)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3)
    stats = cache.stats()
    assert stats.kv_bytes == stats.kv_bytes_dense


def test_evicted_decode_equals_masked_decode_on_cuda(arch):
    from zipvl_ray.attention import set_zipvl_config

    _, model, _, processor = arch
    set_zipvl_config(model, ZipVLConfig(tau=0.9, probe_recent=16, probe_random=16, seed=1))
    inputs = cuda_inputs(processor, 3, n_images=2)
    evicted, masked = ZipVLCache(model), ZipVLCache(model, evict=False)
    tokens_e, logits_e = greedy(model, inputs, evicted)
    tokens_m, logits_m = greedy(model, inputs, masked)
    assert torch.equal(tokens_e, tokens_m)
    torch.testing.assert_close(logits_e, logits_m, rtol=1e-3, atol=1e-3)
    assert evicted.stats().kv_bytes < evicted.stats().kv_bytes_dense
    assert evicted.stats().kept_per_layer == masked.stats().kept_per_layer


def test_engine_on_cuda_matches_the_reference_and_frees_its_pool(arch):
    from zipvl_ray.engine import LLM, SamplingParams

    _, model, _, processor = arch
    config = ZipVLConfig(tau=0.9, probe_recent=8, probe_random=8)
    llm = LLM(model, processor=processor, zipvl=config, engine=EngineConfig(kv_cache_bytes=8 << 20))
    prompts = [
        {"messages": chat(PROMPTS[i], k), "images": [make_image(10 * i + j) for j in range(k)]}
        for i, k in enumerate((0, 1, 2))
    ]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        text = processor.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=prompt["images"] or None, return_tensors="pt").to(CUDA)
        with torch.no_grad():
            ref = model.generate(
                **inputs,
                past_key_values=ZipVLCache(model, config),
                max_new_tokens=8,
                min_new_tokens=8,
                do_sample=False,
            )
        assert out.token_ids == ref[0, inputs["input_ids"].shape[1] :].tolist()
    kv = llm.engine.runner.kv
    assert llm.stats().kv_bytes_used == 0
    kv.check_consistency()


def test_zipvl_tiny_answers_its_held_out_question_on_cuda():
    from zipvl_ray.data import make_sample
    from zipvl_ray.engine import LLM, SamplingParams
    from zipvl_ray.models import CHECKPOINT_DIR

    if not (CHECKPOINT_DIR / "zipvl-tiny" / "model.safetensors").exists():
        pytest.skip("zipvl-tiny is not in the tree")
    sample = make_sample("short", "test", 0)
    llm = LLM("zipvl-tiny", device="cuda", zipvl=ZipVLConfig(tau=0.975, max_keep_ratio=0.6))
    prompt = {"messages": sample.messages(), "images": sample.images()}
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
    assert out.text.strip() == sample.answer
