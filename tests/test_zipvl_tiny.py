"""The committed ``zipvl-tiny`` checkpoint, end to end: it loads offline by name, and the paged engine
(``LLM.generate``) and the HTTP service (uvicorn over the real engine and vision encoder, no Ray;
``tests/deployments/test_serve_run.py`` asks over ``serve run configs/zipvl.yaml``) give the reference
``model.generate`` answers to held-out questions.

The checkpoint reads its pictures (docs/fidelity.md: well above chance on every split, best on single
pictures). ``CORRECT`` is a held-out picture question it answers right, densely and with the ZipVL
setting ``configs/zipvl.yaml`` serves it with (tau = 0.975, at most 60% kept per layer): "What colour is the
triangle?" needs the triangle's cell among 64.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from zipvl_ray.config import ZipVLConfig
from zipvl_ray.data import make_sample
from zipvl_ray.models import CHECKPOINT_DIR, builtin_model_names
from zipvl_ray.models.zipvl_tiny import ZIPVL_TINY_NAME

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / ZIPVL_TINY_NAME / "model.safetensors").exists(),
    reason="zipvl-tiny has not been trained yet (python -m zipvl_ray.train)",
)

#: Held-out questions (test partition, never trained on): a picture and a 2-frame video.
HELD_OUT = [("short", 3), ("medium", 1)]
#: A held-out question (one picture) the checkpoint answers correctly, densely and with the served setting.
CORRECT = ("short", 0)
SERVE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "zipvl.yaml"


def served_zipvl_config() -> ZipVLConfig:
    """The ZipVL setting ``configs/zipvl.yaml`` (``make serve``) serves zipvl-tiny with."""
    app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    assert app["args"]["model"] == ZIPVL_TINY_NAME
    return ZipVLConfig(**app["args"]["zipvl"])


def held_out_chat(sample) -> list[dict]:
    """The sample as OpenAI chat messages with PNG data-URL images (frames in order, then the question)."""
    import base64
    import io

    parts = []
    for image in sample.images():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": [*parts, {"type": "text", "text": sample.question}]}]


def test_zipvl_tiny_is_a_builtin_name_loaded_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from zipvl_ray.models import load_model

    assert ZIPVL_TINY_NAME in builtin_model_names()
    model, processor = load_model(ZIPVL_TINY_NAME, device="cpu")
    assert model.config.model_type == "llava"
    assert not model.training
    assert processor.tokenizer.convert_tokens_to_ids("triangle") != processor.tokenizer.unk_token_id


def test_the_checkpoint_loads_with_transformers_auto_classes_and_pads_on_the_left(tmp_path):
    """Outside the project's loader (which sets left padding itself), a user's ``AutoProcessor`` must pad a
    batch on the left too: right padding puts pad tokens between the prompt and the answer of a
    decoder-only model, and batched greedy answers came out empty. The shipped processor files are what
    the code writes."""
    from transformers import AutoProcessor

    from zipvl_ray.models.zipvl_tiny import build_untrained_zipvl_tiny

    directory = CHECKPOINT_DIR / ZIPVL_TINY_NAME
    assert AutoProcessor.from_pretrained(directory).tokenizer.padding_side == "left"
    _, processor = build_untrained_zipvl_tiny()
    processor.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((directory / name).read_text()), name
    assert (tmp_path / "chat_template.jinja").read_text() == (directory / "chat_template.jinja").read_text()


@pytest.fixture(scope="module")
def llm():
    from zipvl_ray.engine import LLM

    return LLM(ZIPVL_TINY_NAME, device="cpu", dtype="float32", zipvl=served_zipvl_config())


@pytest.fixture(scope="module")
def reference():
    """Greedy answers of transformers' own ``generate`` (dense and the served ZipVL setting) per sample."""
    import torch

    from zipvl_ray import ZipVLCache
    from zipvl_ray.models import load_model

    model, processor = load_model(ZIPVL_TINY_NAME, device="cpu")
    answers = {}
    for split, index in [*HELD_OUT, CORRECT]:
        sample = make_sample(split, "test", index)
        prompt = processor.apply_chat_template(sample.messages(), add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=sample.images(), return_tensors="pt")
        for config in (ZipVLConfig(enabled=False), served_zipvl_config()):
            with torch.no_grad():
                out = model.generate(
                    **inputs, past_key_values=ZipVLCache(model, config), max_new_tokens=8, do_sample=False
                )
            text = processor.tokenizer.decode(
                out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            answers[(split, index, config.enabled)] = text.strip()
    return answers


@pytest.mark.parametrize(("split", "index"), [*HELD_OUT, CORRECT])
def test_llm_generate_gives_the_reference_answers(llm, reference, split, index):
    from zipvl_ray.engine import SamplingParams

    sample = make_sample(split, "test", index)
    prompt = {"messages": sample.messages(), "images": sample.images()}
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    # A request's knobs merge onto the engine's defaults (the served setting).
    for enabled, zipvl in ((False, {"enabled": False}), (True, {"tau": 0.975})):
        (out,) = llm.generate([prompt], greedy, zipvl=zipvl)
        assert out.text.strip() == reference[(split, index, enabled)], (zipvl, sample.question)
    assert 0 < out.metrics.mean_kept_ratio < 1  # ZipVL pruned something


def test_llm_generate_answers_a_held_out_question_correctly(llm):
    from zipvl_ray.engine import SamplingParams

    split, index = CORRECT
    sample = make_sample(split, "test", index)
    prompt = {"messages": sample.messages(), "images": sample.images()}
    for zipvl in ({"enabled": False}, {"tau": 0.975}):
        (out,) = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0), zipvl=zipvl)
        assert out.text.strip() == sample.answer


@pytest.fixture(scope="module")
def local_http():
    from benchmarks.serve import start_local_server

    base_url, stop = start_local_server(ZIPVL_TINY_NAME, "cpu", zipvl=served_zipvl_config())
    yield base_url
    stop()


@pytest.mark.parametrize(("split", "index"), [*HELD_OUT, CORRECT])
def test_http_service_gives_the_reference_answers(local_http, reference, split, index):
    sample = make_sample(split, "test", index)
    body = {
        "model": ZIPVL_TINY_NAME,
        "messages": held_out_chat(sample),
        "max_tokens": 8,
        "temperature": 0,
        "zipvl": {"tau": served_zipvl_config().tau},
    }
    response = httpx.post(f"{local_http}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["choices"][0]["message"]["content"].strip() == reference[(split, index, True)]
    if (split, index) == CORRECT:
        assert reply["choices"][0]["message"]["content"].strip() == sample.answer
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert 0 < reply["zipvl"]["mean_kept_ratio"] < 1
