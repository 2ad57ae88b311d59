"""Fixtures of the Ray-free API tests: the tiny-llava prompt processor and a local HTTP server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn

from tests.deployments.conftest import free_port
from tests.deployments.fakes import FakeEngine, FakeVisionEncoder
from zipvl_ray.api.images import ImageLimits
from zipvl_ray.api.local import LocalBackend
from zipvl_ray.api.server import ServingSettings, build_openai_app
from zipvl_ray.config import EngineConfig
from zipvl_ray.multimodal import PromptProcessor

MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def prompt_processor() -> PromptProcessor:
    from zipvl_ray.models import load_model

    _model, processor = load_model("tiny-llava")
    return PromptProcessor(processor)


@dataclass
class LocalService:
    """A uvicorn server on loopback serving the app over a fake engine and encoder."""

    base_url: str
    engine: FakeEngine
    encoder: FakeVisionEncoder
    settings: ServingSettings


@pytest.fixture(scope="module")
def local_service(prompt_processor) -> Iterator[LocalService]:
    settings = ServingSettings(
        served_model_name="tiny-llava",
        model_source="tiny-llava",
        max_model_len=MAX_MODEL_LEN,
        default_max_tokens=64,
        images=ImageLimits(max_images=4, max_image_bytes=100_000, max_image_pixels=256 * 256),
        max_request_bytes=400_000,
    )
    engine = FakeEngine(engine=EngineConfig(max_model_len=MAX_MODEL_LEN), token_delay_s=0.002)
    encoder = FakeVisionEncoder()
    app = build_openai_app(LocalBackend(engine, encoder), prompt_processor, settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield LocalService(f"http://127.0.0.1:{port}", engine, encoder, settings)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
