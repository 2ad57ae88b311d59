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
    # every matched baseline gets a paired comparison with ZipVL at its tau, on the same samples
    for split in ("short", "medium"):
        for family in ("fixed", "fastv", "random"):
            paired = out["summary"][f"{split}: tau=0.975, answers only ZipVL / only {family} got right"]
            assert "McNemar p" in paired


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


@pytest.mark.parametrize(
    ("budget", "layers", "dense", "ratio"),
    [
        (0.3, 8, (), 0.3),  # no dense layer: the budget itself
        (0.3, 8, (0,), (8 * 0.3 - 1) / 7),  # layer 0 at 1.0, the other seven share the rest
        (0.2, 8, (0, 1), 0.0),  # two dense layers already exceed the budget: clamped
        (1.0, 8, (0,), 1.0),
    ],
)
def test_fixed_ratio_config_matches_the_mean_budget(budget, layers, dense, ratio):
    from benchmarks.fidelity import fixed_ratio_config

    config = fixed_ratio_config(0.975, budget, layers, dense)
    assert config.dense_layers == list(dense)
    assert config.min_keep_ratio == config.max_keep_ratio == pytest.approx(ratio)
    if ratio > 0:
        assert (len(dense) + (layers - len(dense)) * ratio) / layers == pytest.approx(budget)


def test_load_base_reads_the_served_setting(tmp_path):
    from benchmarks.fidelity import DEFAULT_SERVE_CONFIG, load_base

    served = load_base(DEFAULT_SERVE_CONFIG)
    assert "tau" not in served
    ZipVLConfig(**served)
    assert load_base("none") == {} and load_base(None) == {}
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - args:\n      zipvl: {tau: 0.9, min_keep_ratio: 2.0}\n")
    with pytest.raises(ValueError):
        load_base(bad)


def test_smoke_mode_with_a_served_setting_keeps_its_dense_layer(tmp_path, one_thread):
    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - args:\n      zipvl: {tau: 0.975, dense_layers: [0]}\n")
    out = main(
        ["--smoke", "--model", "tiny-llava", "--threads", "1", "--out-dir", str(tmp_path)]
        + ["--zipvl-config", str(config)]
    )
    payload = json.loads((tmp_path / "fidelity_smoke.json").read_text())
    zipvl = [row for row in payload["rows"] if row["family"] in ("zipvl", "fixed", "random")]
    assert zipvl and all(row["layer_kept_ratio"][0] == 1.0 for row in zipvl)
    assert json.loads(out["summary"]["ZipVL setting (besides tau)"]) == {"dense_layers": [0]}


def test_select_chooses_on_val_by_its_written_rules(tmp_path):
    from benchmarks import fidelity_select

    def row(candidate, split, setting, accuracy, vs, kept):
        return dict(
            candidate=candidate,
            split=split,
            setting=setting,
            overrides={"s": setting},
            samples=10,
            accuracy=accuracy,
            vs_dense=vs,
            kept_ratio=kept,
        )

    rows = [
        row("a", "long", "dense", 0.3, None, 1.0),
        row("a", "short", "dense", 0.5, None, 1.0),
        row("b", "long", "dense", 0.5, None, 1.0),
        row("b", "short", "dense", 0.6, None, 1.0),
        row("b", "long", "x", 0.5, 1.0, 0.5),  # best fidelity but over the long budget
        row("b", "short", "x", 0.6, 1.0, 0.9),
        row("b", "long", "y", 0.45, 0.9, 0.3),
        row("b", "short", "y", 0.6, 1.0, 0.8),
        row("b", "long", "z", 0.4, 0.8, 0.2),
        row("b", "short", "z", 0.6, 1.0, 0.7),
    ]
    choice = fidelity_select.choose(rows, max_long_kept=0.37)
    assert choice["checkpoint"] == "b" and choice["setting"] == "y" and choice["overrides"] == {"s": "y"}
    assert "x" not in choice["setting_scores"]
    record = fidelity_select.main(
        ["--smoke", "--candidates", "tiny=tiny-llava", "--threads", "1", "--out-dir", str(tmp_path)]
    )
    assert {r["setting"] for r in record["rows"]} == {"dense", "plain", "dense_layers=[0]"}
    assert {r["split"] for r in record["rows"]} == {"long"}
    assert record["choice"]["checkpoint"] == "tiny"
    assert (tmp_path / "fidelity_select_smoke.md").exists()


def _result(correct: list[bool]):
    from benchmarks.fidelity import Answer, MethodResult

    answers = [Answer("colour", "red", "red" if c else "blue", c, 10, [10]) for c in correct]
    return MethodResult("long", Method("m", "zipvl", ZipVLConfig()), answers)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # 7 discordant samples all one way: p = 2 / 2**7
        ([True] * 7 + [False] * 3, [False] * 10, (7, 0, 2 / 128)),
        # 1 vs 0 discordant: no evidence
        ([True, True, False], [False, True, False], (1, 0, 1.0)),
        # 3 vs 1: p = 2 * (1 + 4) / 16
        ([True, True, True, False, True], [False, False, False, True, True], (3, 1, 0.625)),
        ([True, False], [True, False], (0, 0, 1.0)),  # no discordant sample
    ],
)
def test_paired_comparison_is_an_exact_mcnemar_test(a, b, expected):
    from benchmarks.fidelity import paired_comparison

    a_only, b_only, p = paired_comparison(_result(a), _result(b))
    assert (a_only, b_only) == expected[:2]
    assert p == pytest.approx(expected[2])
    assert paired_comparison(_result(b), _result(a)) == (b_only, a_only, pytest.approx(p))
    with pytest.raises(ValueError):
        paired_comparison(_result(a), _result(a[:-1]))


def test_layer_sensitivity_smoke_prunes_only_the_named_layer(tmp_path):
    from benchmarks import fidelity_layer_sensitivity

    rows = fidelity_layer_sensitivity.main(["--smoke", "--model", "tiny-llava", "--out-dir", str(tmp_path)])
    one_layer = [r for r in rows if r["pruned_layer"] is not None]
    assert {(r["method"], r["pruned_layer"]) for r in one_layer} == {
        (m, layer) for m in ("zipvl", "fixed 0.05") for layer in (0, 1)
    }
    whole = {r["method"]: r for r in rows if r["pruned_layer"] is None}
    assert set(whole) == {"dense", "zipvl", "fixed 0.05"}
    # the fixed ratio keeps its ratio in every pruned layer, and one pruned layer costs 1 / L of the savings
    assert all(abs(k - 0.05) < 0.03 for k in whole["fixed 0.05"]["layer_kept"])
    for r in one_layer:
        if r["method"] == "fixed 0.05":
            assert abs(r["layer_kept"] - 0.05) < 0.03
            others = (len(whole["zipvl"]["layer_kept"]) - 1 + r["layer_kept"]) / len(
                whole["zipvl"]["layer_kept"]
            )
            assert r["kept_ratio"] == pytest.approx(others, abs=1e-3)  # layer_kept is rounded
    saved = json.loads((tmp_path / "fidelity_layer_sensitivity.json").read_text())
    assert saved["rows"] == rows
    assert "| layer 1 only |" in (tmp_path / "fidelity_layer_sensitivity.md").read_text()


def test_attention_mass_smoke_splits_every_layers_mass(tmp_path):
    from benchmarks import fidelity_attention_mass as mass

    rows = mass.main(["--smoke", "--model", "tiny-llava", "--out-dir", str(tmp_path)])
    assert [r["layer"] for r in rows] == list(range(len(rows))) and rows[0]["samples"] == 2
    for r in rows:
        assert abs(r["sink"] + r["image"] + r["text"] - 1) < 1e-5
        assert (
            0 < r["count_all"] <= 1 and 0 < r["count_image_only"] <= 1 and 0 <= r["image_in_count_all"] <= 1
        )
    assert (tmp_path / "fidelity_attention_mass-smoke.md").exists()


def test_fewest_covering_takes_the_largest_first():
    import numpy as np

    from benchmarks.fidelity_attention_mass import fewest_covering, layer_figures

    mass = np.array([0.05, 0.6, 0.1, 0.25])
    assert list(fewest_covering(mass, 0.8)) == [1, 3] and list(fewest_covering(mass, 0.9)) == [1, 3, 2]
    assert list(fewest_covering(mass * 10, 0.6)) == [1]  # any total
    image = np.array([False, True, True, False])
    f = layer_figures(mass, image, evidence=[2], tau=0.8)
    assert f["sink"] == 0.05 and abs(f["image"] - 0.7) < 1e-9 and abs(f["text"] - 0.25) < 1e-9
    assert f["count_all"] == 0.5 and f["image_in_count_all"] == 0.5  # keys 1 and 3: one of two image tokens
    assert f["count_image_only"] == 0.5  # 0.6 of the image tokens' 0.7 is 0.86 >= 0.8: one of two
    assert f["evidence"] == 0.1 and abs(f["evidence_rank"] - 2 / 3) < 1e-9  # third of four keys
