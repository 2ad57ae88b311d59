"""The fidelity benchmark: its FastV baseline is exact where it must be, and its smoke mode runs in seconds."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.fidelity import Method, ReferenceBackend, main
from benchmarks.fidelity_fastv import FastVCache, FastVConfig, matched_visual_keep_ratio
from zipvl_ray.cache import ZipVLCache
from zipvl_ray.config import ZipVLConfig
from zipvl_ray.data import make_sample


@pytest.mark.parametrize(
    ("budget", "layers", "dense", "n", "visual", "expected"),
    [
        (1.0, 8, 2, 1000, 900, 1.0),  # everything kept
        (0.25 + 0.75 * 0.1, 8, 2, 1000, 900, 0.0),  # only the text tokens survive layer 2 on
        (0.25 + 0.75 * (100 + 450) / 1000, 8, 2, 1000, 900, 0.5),
        (0.1, 8, 2, 1000, 900, 0.0),  # below FastV's floor: clamped
        (0.5, 4, 1, 200, 0, 1.0),  # no visual tokens
    ],
)
def test_matched_visual_keep_ratio(budget, layers, dense, n, visual, expected):
    assert matched_visual_keep_ratio(budget, layers, dense, n, visual) == pytest.approx(expected, abs=1e-9)


@pytest.fixture(scope="module")
def tiny():
    from zipvl_ray.models import load_model

    return load_model("tiny-llava", device="cpu")


def prompt_inputs(model_and_processor, sample):
    _, processor = model_and_processor
    prompt = processor.apply_chat_template(sample.messages(), add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], images=sample.images(), return_tensors="pt")


@torch.no_grad()
def test_fastv_keeping_every_visual_token_is_dense(tiny):
    model, processor = tiny
    inputs = prompt_inputs(tiny, make_sample("medium", "test", 1))
    image_mask = inputs["input_ids"][0] == processor.image_token_id
    dense = model(**inputs, past_key_values=ZipVLCache(model, ZipVLConfig(enabled=False))).logits
    fastv = model(**inputs, past_key_values=FastVCache(model, image_mask, FastVConfig(2, 1.0))).logits
    torch.testing.assert_close(fastv, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.0, 0.3])
@torch.no_grad()
def test_fastv_keeps_text_and_the_top_visual_tokens_after_the_dense_layers(tiny, ratio):
    model, processor = tiny
    inputs = prompt_inputs(tiny, make_sample("medium", "test", 2))
    image_mask = inputs["input_ids"][0] == processor.image_token_id
    cache = FastVCache(model, image_mask, FastVConfig(dense_layers=2, visual_keep_ratio=ratio))
    model(**inputs, past_key_values=cache)
    n, visual = image_mask.numel(), int(image_mask.sum())
    kept = [layer[0] for layer in cache.stats().prompt_kept_per_layer]
    assert kept[:2] == [n, n]
    assert set(kept[2:]) == {n - visual + round(ratio * visual)}
    text = torch.nonzero(~image_mask).flatten()
    assert set(text.tolist()) <= set(cache.kept_after.tolist())


def test_reference_backend_reports_what_the_cache_kept(tiny):
    model, processor = tiny
    backend = ReferenceBackend(model, processor, max_new_tokens=3)
    sample = make_sample("short", "test", 0)
    dense = backend.answer(sample, Method("dense", "dense", ZipVLConfig(enabled=False)))
    assert dense.kept_per_layer == [dense.prompt_tokens] * len(dense.kept_per_layer)
    assert dense.flops_reduction == 0.0
    fixed = backend.answer(
        sample, Method("fixed", "fixed", ZipVLConfig(min_keep_ratio=0.25, max_keep_ratio=0.25))
    )
    assert set(fixed.kept_per_layer) == {-(-dense.prompt_tokens // 4)}
    assert fixed.mean_kept_ratio == pytest.approx(0.25, abs=1 / dense.prompt_tokens)


@pytest.fixture
def one_thread():
    """The smoke run sets torch to one thread (shared CI cores); restore the setting afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_smoke_mode_writes_results(tmp_path, one_thread):
    out = main(["--smoke", "--model", "tiny-llava", "--threads", "1", "--out-dir", str(tmp_path)])
    payload = json.loads((tmp_path / "fidelity_smoke.json").read_text())
    families = {row["family"] for row in payload["rows"]}
    assert {"dense", "zipvl", "fixed", "fastv", "random"} <= families
    assert {row["split"] for row in payload["rows"]} == {"short", "medium"}
    assert (tmp_path / "fidelity_smoke.md").exists()
    dense = [row for row in payload["rows"] if row["family"] == "dense"]
    assert all(row["kept_ratio"] == 1.0 for row in dense)
    assert out["summary"]


def test_dense_layers_benchmark_smoke_and_all_dense_equals_dense(tmp_path):
    from benchmarks import fidelity_dense_layers

    rows = fidelity_dense_layers.main(["--smoke", "--model", "tiny-llava", "--out-dir", str(tmp_path)])
    assert [r["dense_layers"] for r in rows] == [None, [], [0]]
    assert json.loads((tmp_path / "fidelity_dense_layers.json").read_text())["rows"] == rows
    assert "| short |" in (tmp_path / "fidelity_dense_layers.md").read_text()
    # Every layer dense: no selection anywhere, so the answers and kept ratio are the dense ones.
    every = tuple(range(4))  # tiny-llava has 4 decoder layers
    dense, all_dense = fidelity_dense_layers.run(
        "tiny-llava", {"short": 2}, (0.9,), (every,), log=lambda _: None
    )
    assert all_dense["kept_ratio"] == 1.0 and all_dense["accuracy"] == dense["accuracy"]
