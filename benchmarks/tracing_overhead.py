"""What tracing costs on the request path: in-process app latency with tracing off and on.

Four modes, each in its own process (OpenTelemetry lets a process install its tracer provider once),
run in alternating rounds so that machine noise hits every mode alike:

- ``baseline``: the plain HTTP app (``build_openai_app`` over ``LocalBackend``), no telemetry code;
- ``off``: the ingress app of ``deployments/ingress.py`` (request id middleware, preparation hooks)
  over ``RayServeBackend`` with in-process stand-ins for the Serve handles, calling the vision and LLM
  deployment classes themselves: every line of telemetry code of the three stages runs, no tracer
  provider is installed (what a replica runs with tracing off);
- ``sampled_0``: the same with a tracer provider sampling 0 % of new traces (Serve's
  ``ParentBasedTraceIdRatio(0.0)``), spans batched to an in-memory exporter;
- ``sampled_1``: sampling 100 %: every request is traced (FastAPI's server span is the root
  in-process; the ingress, vision and LLM spans hang below it).

The same real engine and encoder (the built-in ``tiny-llava`` by default) serve every request:
one image (from a rotation of four, so mostly encoder-cache hits), greedy, ``max_tokens`` tokens.
Requests go through the ASGI app in process (``httpx.ASGITransport``), one at a time.

    python -m benchmarks.tracing_overhead                   # about 2 minutes on 2 CPU cores
    python -m benchmarks.tracing_overhead --smoke           # seconds, for the test suite

Writes ``benchmarks/results/tracing_overhead.{json,md}`` (``tracing_overhead_smoke`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import write_results

MODES = ("baseline", "off", "sampled_0", "sampled_1")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ child


class _Loaded:
    """An ``engine_cls`` / ``encoder_cls`` whose ``from_pretrained`` returns an object already loaded."""

    def __init__(self, obj: Any):
        self.obj = obj

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        return self.obj


class _End:
    """End of a :class:`_Stream`, with the exception that ended it if any."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class _Stream:
    """In-process stand-in for a streaming ``DeploymentResponseGenerator``.

    Like a Serve replica, the method runs in its own task (created with the caller's context, so the
    caller's current span is its parent); the caller iterates the items or ``cancel()`` s the task.
    """

    def __init__(self, method, args, kwargs):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(method, args, kwargs))

    async def _pump(self, method, args, kwargs):
        error = None
        try:
            # Serve resolves a chained DeploymentResponse argument before calling the replica.
            args = [await a if asyncio.isfuture(a) else a for a in args]
            async for item in method(*args, **kwargs):
                self._queue.put_nowait(item)
        except Exception as exc:
            error = exc
        finally:
            self._queue.put_nowait(_End(error))

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if isinstance(item, _End):
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    def cancel(self) -> None:
        self._task.cancel()


class _Method:
    def __init__(self, handle: _Handle, name: str):
        self.handle, self.name = handle, name

    def remote(self, *args, **kwargs):
        method = getattr(self.handle.target, self.name)
        if self.handle.stream:
            return _Stream(method, args, kwargs)
        return asyncio.ensure_future(method(*args, **kwargs))


class _Handle:
    """In-process stand-in for a ``DeploymentHandle`` over a deployment class instance."""

    def __init__(self, target: Any, stream: bool = False):
        self.target, self.stream = target, stream

    def options(self, stream: bool = False, **_: Any) -> _Handle:
        return _Handle(self.target, stream)

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


def _install_provider(mode: str):
    """The process's tracer provider of ``mode`` (None when tracing is off); returns its exporter."""
    if mode not in ("sampled_0", "sampled_1"):
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(1.0 if mode == "sampled_1" else 0.0))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def _build_app(mode: str, model: str, max_model_len: int):
    from deployments.app import AppArgs
    from deployments.ingress import RayServeBackend, build_ingress_app
    from deployments.llm import LLMServer
    from deployments.vision import VisionEncoderServer
    from zipvl_ray.api.local import LocalBackend
    from zipvl_ray.api.server import build_openai_app
    from zipvl_ray.config import EngineConfig
    from zipvl_ray.engine import AsyncLLMEngine
    from zipvl_ray.models import load_model
    from zipvl_ray.multimodal import PromptProcessor
    from zipvl_ray.vision import VisionEncoder

    args = AppArgs(model=model, dtype="float32", device="cpu", engine={"max_model_len": max_model_len})
    engine = AsyncLLMEngine.from_pretrained(
        model,
        dtype="float32",
        device="cpu",
        zipvl=args.zipvl,
        engine=EngineConfig(max_model_len=max_model_len),
    )
    vlm, hf_processor = load_model(model, dtype="float32", device="cpu")
    encoder = VisionEncoder(vlm)
    processor = PromptProcessor(hf_processor)
    if mode == "baseline":
        return build_openai_app(LocalBackend(engine, encoder), processor, args.serving_settings()), engine
    vision = VisionEncoderServer.func_or_class(_Loaded(encoder), model)  # its batcher runs without Serve
    llm = LLMServer.func_or_class(_Loaded(engine), model)
    backend = RayServeBackend(_Handle(vision), _Handle(llm))
    app = build_ingress_app(backend, processor, args.serving_settings(), behind_serve_proxy=False)
    return app, engine


def _request_body(model: str, image: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": "What is in the picture?"},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def _images(count: int) -> list[str]:
    import base64
    import io

    import numpy as np
    from PIL import Image

    out = []
    for seed in range(count):
        pixels = np.random.default_rng(seed).integers(0, 255, (56, 56, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return out


async def _drive(app, model: str, requests: int, warmup: int, max_tokens: int) -> list[float]:
    import httpx

    images = _images(4)
    latencies = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:
        for i in range(warmup + requests):
            body = _request_body(model, images[i % len(images)], max_tokens)
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"request failed: {response.status_code} {response.text[:200]}")
            if i >= warmup:
                latencies.append(elapsed)
    return latencies


def telemetry_calls_when_off_us(output_tokens: int, repeat: int = 20000) -> float:
    """Microseconds the telemetry calls of one request take without a tracer provider.

    The calls the three stages make per request with tracing off: a span attempt, a recording check,
    ``use_span`` and ``end_span`` for the ingress, vision and LLM spans, one ``RequestTiming.observe``
    per output, the engine-span builder and the request id binding.
    """
    from zipvl_ray import telemetry
    from zipvl_ray.engine.types import RequestOutput

    if telemetry.tracing_active():
        raise RuntimeError("measure the off path in a process without a tracer provider")
    outputs = [RequestOutput(request_id="r", finished=i == output_tokens - 1) for i in range(output_tokens)]
    started = time.perf_counter()
    for _ in range(repeat):
        with telemetry.bind_request_id("request-id"):
            for name in ("zipvl.ingress.generate", "zipvl.vision.encode", "zipvl.llm.generate"):
                span = telemetry.start_span(name)
                telemetry.recording(span)
                with telemetry.use_span(span):
                    pass
                telemetry.end_span(span)
            timing = telemetry.RequestTiming()
            for output in outputs:
                timing.observe(output)
            telemetry.record_engine_spans(None, outputs[-1], timing)
    return (time.perf_counter() - started) / repeat * 1e6


def run_child(mode: str, model: str, requests: int, warmup: int, max_tokens: int, max_model_len: int) -> dict:
    """One mode in this process: build the app, drive it, report latencies (seconds) and spans."""
    import torch

    torch.set_num_threads(1)  # steadier timings on a shared machine
    exporter = _install_provider(mode)
    app, engine = _build_app(mode, model, max_model_len)
    try:
        latencies = asyncio.run(_drive(app, model, requests, warmup, max_tokens))
    finally:
        engine.shutdown()
    spans = 0
    if exporter is not None:
        from opentelemetry import trace

        trace.get_tracer_provider().force_flush()
        spans = len(exporter.get_finished_spans())
    off_path_us = telemetry_calls_when_off_us(max_tokens) if exporter is None else None
    return {
        "mode": mode,
        "latencies_s": latencies,
        "spans": spans,
        "requests": requests + warmup,
        "off_path_us": off_path_us,
    }


# ------------------------------------------------------------------------------------------ parent


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _spawn(mode: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [
        sys.executable,
        "-m",
        "benchmarks.tracing_overhead",
        "--child",
        mode,
        "--child-out",
        str(out),
        "--model",
        args.model,
        "--requests",
        str(args.requests),
        "--warmup",
        str(args.warmup),
        "--max-tokens",
        str(args.max_tokens),
        "--max-model-len",
        str(args.max_model_len),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    # The tracing variables of a Serve node must not leak into the child: its mode decides.
    for name in ("RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        env.pop(name, None)
    subprocess.run(command, check=True, cwd=REPO_ROOT, env=env)
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--requests", type=int, default=60, help="Timed requests per mode and round.")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds; every round runs every mode once.")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--smoke", action="store_true", help="A few requests, one round.")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_child(
            args.child, args.model, args.requests, args.warmup, args.max_tokens, args.max_model_len
        )
        Path(args.child_out).write_text(json.dumps(result))
        return result
    if args.smoke:
        args.requests, args.warmup, args.rounds, args.max_tokens = 4, 1, 1, 4

    per_mode: dict[str, list[float]] = {mode: [] for mode in args.modes}
    round_p50: dict[str, list[float]] = {mode: [] for mode in args.modes}
    spans: dict[str, int] = dict.fromkeys(args.modes, 0)
    handled: dict[str, int] = dict.fromkeys(args.modes, 0)
    off_path_us: list[float] = []
    started = time.perf_counter()
    for round_index in range(args.rounds):
        # Rotate the order so no mode always runs first (or last) in a round.
        order = args.modes[round_index % len(args.modes) :] + args.modes[: round_index % len(args.modes)]
        for mode in order:
            result = _spawn(mode, args)
            per_mode[mode] += result["latencies_s"]
            round_p50[mode].append(statistics.median(result["latencies_s"]))
            spans[mode] += result["spans"]
            handled[mode] += result["requests"]
            if mode == "off":
                off_path_us.append(result["off_path_us"])

    reference = "baseline" if "baseline" in per_mode else args.modes[0]
    base_p50 = statistics.median(per_mode[reference])
    off_p50 = statistics.median(per_mode["off"]) if "off" in per_mode else None
    rows = []
    for mode in args.modes:
        values = per_mode[mode]
        p50 = statistics.median(values)
        rows.append(
            {
                "mode": mode,
                "requests": len(values),
                "p50_ms": p50 * 1e3,
                "p90_ms": _percentile(values, 0.9) * 1e3,
                "mean_ms": statistics.fmean(values) * 1e3,
                "round_p50_min_ms": min(round_p50[mode]) * 1e3,
                "round_p50_max_ms": max(round_p50[mode]) * 1e3,
                "p50_vs_baseline": p50 / base_p50,
                "p50_vs_off": p50 / off_p50 if off_p50 else None,
                "spans_per_request": spans[mode] / handled[mode] if handled[mode] else 0.0,
            }
        )
    by_mode = {row["mode"]: row for row in rows}
    summary: dict[str, Any] = {
        "model": args.model,
        "rounds": args.rounds,
        "requests_per_mode": len(per_mode[reference]),
        "max_tokens": args.max_tokens,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if "off" in by_mode and "baseline" in by_mode:
        summary["off_minus_baseline_p50_ms"] = by_mode["off"]["p50_ms"] - by_mode["baseline"]["p50_ms"]
    if off_path_us:
        summary["telemetry_calls_when_off_us"] = statistics.median(off_path_us)
        summary["telemetry_calls_when_off_share_of_p50"] = (
            summary["telemetry_calls_when_off_us"] / 1e6 / (by_mode["off"]["p50_ms"] / 1e3)
        )
    for mode in ("sampled_0", "sampled_1"):
        if mode in by_mode and "off" in by_mode:
            summary[f"{mode}_minus_off_p50_ms"] = by_mode[mode]["p50_ms"] - by_mode["off"]["p50_ms"]
    name = "tracing_overhead_smoke" if args.smoke else "tracing_overhead"
    notes = (
        "Latency of one chat completion with an image through the in-process ASGI app, one request at a "
        f"time; {args.rounds} rounds, every mode in its own process per round. baseline: the plain app, no "
        "telemetry code; off: the instrumented ingress, vision and LLM stages without a tracer provider; "
        "sampled_0 / sampled_1: a provider sampling 0 / 100 % of traces (spans batched to an in-memory "
        "exporter). p50_vs_*: ratio of medians."
    )
    json_path, md_path = write_results(
        name,
        rows,
        summary=summary,
        title="Tracing overhead on the request path",
        notes=notes,
        out_dir=args.out_dir,
    )
    return {"rows": rows, "summary": summary, "json": str(json_path), "md": str(md_path)}


if __name__ == "__main__":
    main()
