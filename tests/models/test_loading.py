"""``load_model`` / ``load_processor`` on built-in names, local checkpoint directories and offline hub ids."""

from __future__ import annotations

import json

import pytest
import torch

from zipvl_ray.models import builtin_model_names, load_model, load_processor

PROMPT = "USER: <image>\nwhat colour is the square? ASSISTANT:"


@pytest.fixture(scope="module")
def saved_tiny_llava(tmp_path_factory):
    """``tiny-llava`` written the way a user's checkpoint directory looks (safetensors + processor files)."""
    model, processor = load_model("tiny-llava")
    path = tmp_path_factory.mktemp("tiny-llava-checkpoint")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor, path


def test_builtin_processor_matches_the_models_own():
    _, processor = load_model("tiny-llava")
    assert load_processor("tiny-llava").tokenizer(PROMPT).input_ids == processor.tokenizer(PROMPT).input_ids


def test_a_local_checkpoint_loads_with_the_same_weights_and_processor(saved_tiny_llava):
    model, processor, path = saved_tiny_llava
    loaded, loaded_processor = load_model(str(path))
    assert loaded_processor.tokenizer.padding_side == "left"
    assert loaded_processor.tokenizer(PROMPT).input_ids == processor.tokenizer(PROMPT).input_ids
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The ingress loads the processor alone: same tokens, no weights read.
    alone = load_processor(str(path))
    assert alone.tokenizer(PROMPT).input_ids == processor.tokenizer(PROMPT).input_ids
    assert alone.image_processor.to_dict() == processor.image_processor.to_dict()


def test_unknown_names_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_model, load_processor):
        with pytest.raises(
            FileNotFoundError, match="neither a built-in model .*HF_HUB_OFFLINE forbids the hub"
        ):
            load("no-such-org/no-such-model")
    assert "tiny-llava" in builtin_model_names()


def test_a_hub_id_loads_offline_from_the_hugging_face_cache(saved_tiny_llava, tmp_path, monkeypatch):
    """The KubeRay pods run ``HF_HUB_OFFLINE=1`` and serve a hub id the download Job put in the cache on
    the volume: the id resolves to its cached snapshot (laid out as ``snapshot_download`` leaves it)."""
    import shutil

    from huggingface_hub import constants

    model, processor, path = saved_tiny_llava
    revision = "0" * 40
    repo = tmp_path / "models--acme--tiny-llava"
    shutil.copytree(path, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded, loaded_processor = load_model("acme/tiny-llava")
    assert loaded_processor.tokenizer(PROMPT).input_ids == processor.tokenizer(PROMPT).input_ids
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (
        load_processor("acme/tiny-llava").tokenizer(PROMPT).input_ids == processor.tokenizer(PROMPT).input_ids
    )
    with pytest.raises(FileNotFoundError, match=f"nor a hub id cached under {tmp_path}"):
        load_processor("acme/not-downloaded")


def test_an_unsupported_architecture_is_refused(saved_tiny_llava, tmp_path):
    _, _, path = saved_tiny_llava
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("source", ["tiny-llava", "tiny-qwen2-vl", "checkpoint"])
def test_a_reduced_dtype_keeps_the_rotary_frequencies_in_fp32(saved_tiny_llava, source):
    """As ``from_pretrained(dtype=torch.bfloat16)`` does: bf16 frequencies drift the rotary angle with the
    position. Everything else is in the requested dtype."""
    name = str(saved_tiny_llava[2]) if source == "checkpoint" else source
    model, _ = load_model(name, dtype="bf16")
    reference, _ = load_model(name)
    buffers = dict(model.named_buffers())
    rope = {n: b for n, b in buffers.items() if n.endswith("inv_freq")}
    assert rope and all(b.dtype == torch.float32 for b in rope.values())
    for n, b in rope.items():
        torch.testing.assert_close(b, dict(reference.named_buffers())[n], rtol=0, atol=0)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("processor_class", ["as saved", "Qwen2VLProcessor"])
def test_a_saved_qwen2_vl_checkpoint_loads_back_without_torchvision(tmp_path, processor_class):
    """Saved by the image-only class, AutoProcessor returned a bare image processor; with the hub's
    ``Qwen2VLProcessor`` it wants a video processor (torchvision). Both load as the image-only processor
    with the checkpoint's tokenizer and chat template, and answer like the original."""
    from zipvl_ray.engine import LLM, SamplingParams

    model, processor = load_model("tiny-qwen2-vl")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    if processor_class != "as saved":
        config = json.loads((tmp_path / "processor_config.json").read_text())
        config["processor_class"] = processor_class
        (tmp_path / "processor_config.json").write_text(json.dumps(config))
    loaded, loaded_processor = load_model(str(tmp_path))
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what?<|im_end|>\n"
    assert loaded_processor.tokenizer(prompt).input_ids == processor.tokenizer(prompt).input_ids
    assert loaded_processor.chat_template == processor.chat_template
    assert load_processor(str(tmp_path)).tokenizer(prompt).input_ids == processor.tokenizer(prompt).input_ids
    messages = [{"role": "user", "content": "hello"}]
    params = SamplingParams(max_tokens=4, temperature=0)
    expected = LLM("tiny-qwen2-vl").generate([{"messages": messages}], params)[0].token_ids
    assert LLM(str(tmp_path)).generate([{"messages": messages}], params)[0].token_ids == expected


def test_the_hub_layout_of_a_qwen2_vl_checkpoint_loads_without_torchvision(tmp_path):
    """``Qwen/Qwen2-VL-*`` ship ``preprocessor_config.json`` (``processor_class: Qwen2VLProcessor``) and a
    ``chat_template.json``: there ``AutoProcessor`` raises ImportError for the video processor (not the
    OSError of transformers 5's own layout). The image-only processor is used either way."""
    from zipvl_ray.models.builtin import BUILTIN_MODELS

    model, processor = BUILTIN_MODELS["tiny-qwen2-vl"](seed=0)
    model.config.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    image = json.loads(processor.image_processor.to_json_string())
    image.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    loaded = load_processor(str(tmp_path))
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what?<|im_end|>\n"
    assert loaded.tokenizer(prompt).input_ids == processor.tokenizer(prompt).input_ids
    assert loaded.chat_template == processor.chat_template


def test_a_local_directory_named_like_a_built_in_model_is_loaded(tmp_path, monkeypatch):
    """As in transformers, an existing directory wins over any other meaning of the name: a model saved
    to ./tiny-qwen2-vl is that model, not the built-in random one."""
    model, processor = load_model("tiny-qwen2-vl", seed=5)
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "tiny-qwen2-vl")
    processor.save_pretrained(tmp_path / "tiny-qwen2-vl")
    monkeypatch.chdir(tmp_path)
    loaded, _ = load_model("tiny-qwen2-vl")
    assert loaded.dtype == torch.bfloat16
    saved = model.state_dict()
    assert all(torch.equal(saved[name], value) for name, value in loaded.state_dict().items())
    assert load_processor("tiny-qwen2-vl").tokenizer("hi").input_ids == processor.tokenizer("hi").input_ids
    monkeypatch.chdir(tmp_path.parent)  # elsewhere the name is the built-in model again
    assert load_model("tiny-qwen2-vl")[0].dtype == torch.float32


def test_only_a_plain_name_that_shadows_a_built_in_model_is_warned_about(
    saved_tiny_llava, tmp_path, monkeypatch, caplog
):
    """The warning about a local directory shadowing a built-in model is for a plain name; every absolute
    path drew it (the checkpoint directory joined with an absolute path is that path)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="zipvl_ray.models"):
        load_model(str(saved_tiny_llava[2]))
    assert "not the built-in model" not in caplog.text
    model, processor = load_model("tiny-llava")
    model.save_pretrained(tmp_path / "tiny-llava")
    processor.save_pretrained(tmp_path / "tiny-llava")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="zipvl_ray.models"):
        load_model("tiny-llava")
    assert "not the built-in model" in caplog.text
