"""Serving benchmark: load against the running HTTP service, ZipVL on and off, and the serving overhead.

Against a service that is already up (``make serve`` or ``serve run configs/zipvl.yaml``)::

    .venv/bin/python -m benchmarks.serve --url http://127.0.0.1:8000 --concurrency 1 4 16 --image-sizes 112 448

For every (image size, concurrency, ZipVL on/off) point it runs a closed loop: ``concurrency`` workers
each send ``--requests-per-worker`` streamed chat completions (one image of that size, distinct per
request so the encoder cache does not help, ``ignore_eos`` and a fixed ``--max-tokens`` so every
request does the same work) and reports TTFT and TPOT p50/p95, end-to-end latency, output tokens per
second, requests per second and errors. ZipVL off is the per-request ``zipvl.enabled = false``.

``--direct`` also measures the serving overhead: the same requests one at a time through HTTP
(non-streamed) and directly in this process (the same prompt preparation, vision encoder and engine,
no HTTP and no Ray), and reports the p50 difference. A third arm sends them to the same OpenAI app
(FastAPI) over that in-process engine without a socket (``httpx.ASGITransport``), which splits the
overhead into the API layer (``api_layer_p50_ms``) and the rest (``ray_serve_p50_ms``: the client's
socket and Serve's HTTP server, the proxy, the hops between deployments, and whatever differs between
the replicas' engine and this process's, which ``--direct-config`` and ``--direct-threads`` keep to a
minimum). ``--compare-url`` adds a fourth arm: the same service through a second address (for
instance Serve's proxy on port 8000 while ``--url`` is the ingress replica's own port under direct ingress,
docs/performance.md), reported as ``compare_http_p50_ms`` and ``compare_serving_overhead_p50_ms``. The
arms' order rotates from request to request. The in-process engine is built from the same
Serve config as the service (``--direct-config``: its ``zipvl`` and ``engine`` blocks) and runs with
the LLM replica's torch threads (``--direct-threads``, default 1: Ray gives a replica with
``num_cpus: 0`` one OpenMP thread), so that only HTTP and Ray differ.

Before the sweep, each ZipVL arm gets untimed warm-up requests, and the order of the arms alternates
from point to point, so neither arm takes the cold start or always goes first.

``--smoke`` runs a tiny sweep against an in-process server (uvicorn, real tiny engine, no Ray) so the
test suite can check the script does not rot. Results: ``benchmarks/results/serve.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import secrets
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import write_results


def image_url(seed: int, side: int) -> str:
    """A random ``side`` x ``side`` PNG as a data URL (random pixels: no two requests share an encoding)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(
    model: str, seed: int, side: int, max_tokens: int, zipvl_enabled: bool, stream: bool
) -> dict:
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url(seed, side)}},
                    {"type": "text", "text": f"Describe picture {seed} in detail."},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
        "zipvl": {"enabled": zipvl_enabled},
    }


@dataclass
class Sample:
    """One request's timings (seconds)."""

    ok: bool
    latency_s: float = 0.0
    ttft_s: float | None = None
    tpot_s: float | None = None
    output_tokens: int = 0
    error: str | None = None


async def streamed_request(client: httpx.AsyncClient, body: dict) -> Sample:
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Sample(ok=False, error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                # The first chunk (the assistant role) leaves once the first token exists; its text may
                # come later (the engine holds back a partial UTF-8 character or a possible stop string).
                if first is None and not line.startswith('data: {"error"'):
                    first = time.perf_counter()
                if '"usage":{' in line and '"choices":[]' in line:
                    tokens = int(line.split('"completion_tokens":')[1].split(",")[0].split("}")[0])
                if line.startswith('data: {"error"'):
                    return Sample(ok=False, error=line[6:200])
    except httpx.HTTPError as exc:
        return Sample(ok=False, error=type(exc).__name__)
    end = time.perf_counter()
    first = first or end
    tpot = (end - first) / (tokens - 1) if tokens > 1 else None
    return Sample(ok=True, latency_s=end - start, ttft_s=first - start, tpot_s=tpot, output_tokens=tokens)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass
class Point:
    """One point of the sweep."""

    image_side: int
    concurrency: int
    zipvl: bool
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0

    def row(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.ok]
        ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
        tpot = [s.tpot_s for s in ok if s.tpot_s is not None]
        tokens = sum(s.output_tokens for s in ok)
        return {
            "image": self.image_side,
            "concurrency": self.concurrency,
            "zipvl": "on" if self.zipvl else "off",
            "requests": len(self.samples),
            "errors": len(self.samples) - len(ok),
            "ttft_p50_ms": _ms(percentile(ttft, 50)),
            "ttft_p95_ms": _ms(percentile(ttft, 95)),
            "tpot_p50_ms": _ms(percentile(tpot, 50)),
            "tpot_p95_ms": _ms(percentile(tpot, 95)),
            "latency_p50_ms": _ms(percentile([s.latency_s for s in ok], 50)),
            "output_tok_per_s": tokens / self.wall_s if self.wall_s else 0.0,
            "requests_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


async def run_point(url: str, model: str, point: Point, per_worker: int, max_tokens: int, seed0: int) -> None:
    limits = httpx.Limits(max_connections=point.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(w: int) -> None:
            for i in range(per_worker):
                seed = seed0 + w * per_worker + i
                body = request_body(model, seed, point.image_side, max_tokens, point.zipvl, stream=True)
                point.samples.append(await streamed_request(client, body))

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(point.concurrency)))
        point.wall_s = time.perf_counter() - start


async def sweep(args) -> list[dict[str, Any]]:
    rows, seed = [], args.seed + 1_000_000
    async with httpx.AsyncClient(base_url=args.url, timeout=600) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        for zipvl in (True, False):  # warm-up, untimed: both arms, every image size
            for i, side in enumerate(args.image_sizes * args.warmup_requests):
                body = request_body(model, args.seed + 900_000 + i, side, args.max_tokens, zipvl, stream=True)
                await streamed_request(client, body)
    points = 0
    for side in args.image_sizes:
        for concurrency in args.concurrency:
            arms = (True, False) if points % 2 == 0 else (False, True)
            points += 1
            for zipvl in arms:
                point = Point(side, concurrency, zipvl)
                await run_point(args.url, model, point, args.requests_per_worker, args.max_tokens, seed)
                seed += concurrency * args.requests_per_worker
                rows.append(point.row())
                print(rows[-1], flush=True)
    return rows


async def serving_overhead(args, model_source: str, n: int) -> dict[str, Any]:
    """p50 latency of one request at a time through HTTP vs directly on an in-process engine.

    The three paths (HTTP, in-process engine, in-process app) take turns request by request, the order
    rotating, so background load on the machine hits them alike.
    """
    import torch
    import yaml

    from deployments.app import AppArgs
    from deployments.ingress import load_processor
    from zipvl_ray.api.local import LocalBackend
    from zipvl_ray.api.schemas import ChatCompletionRequest
    from zipvl_ray.api.server import ChatPreparer, ServingSettings, build_openai_app
    from zipvl_ray.engine import AsyncLLMEngine, EncodedPrompt
    from zipvl_ray.multimodal import PromptProcessor
    from zipvl_ray.vision import VisionEncoder

    if args.direct_config == "none":  # the library's defaults (the --smoke server's)
        app_args = AppArgs(model=model_source)
    else:
        with open(args.direct_config) as file:
            app_args = AppArgs.model_validate(yaml.safe_load(file)["applications"][0]["args"])
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.direct_threads)
    engine = AsyncLLMEngine.from_pretrained(
        model_source, device=args.device, load_vision=False, zipvl=app_args.zipvl, engine=app_args.engine
    )
    encoder = VisionEncoder.from_pretrained(model_source, device=args.device)

    async def direct(card: dict, body: dict, preparer: ChatPreparer) -> float:
        start = time.perf_counter()
        chat = await preparer.prepare(ChatCompletionRequest.model_validate(body))
        features = await asyncio.to_thread(encoder.encode, chat.prompt.images)
        prompt = EncodedPrompt(token_ids=chat.prompt.token_ids, image_features=features)
        async for output in engine.generate(chat.request_id, prompt, chat.sampling, chat.zipvl):
            if output.finished:
                break
        return time.perf_counter() - start

    async def post(client: httpx.AsyncClient, body: dict) -> float:
        start = time.perf_counter()
        response = await client.post("/v1/chat/completions", json=body)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        return elapsed

    via_http, in_process, via_app, via_compare = [], [], [], []
    hits_before = await asyncio.to_thread(encoder_cache_hits, args.url)
    try:
        async with (
            httpx.AsyncClient(base_url=args.url, timeout=600) as client,
            httpx.AsyncClient(base_url=args.compare_url or args.url, timeout=600) as other,
        ):
            card = (await client.get("/v1/models")).json()["data"][0]
            settings = ServingSettings(
                served_model_name=card["id"],
                model_source=model_source,
                max_model_len=card["max_model_len"],
                zipvl=app_args.zipvl,
            )
            processor = PromptProcessor(load_processor(model_source))
            preparer = ChatPreparer(processor, settings)
            # The third arm: the same OpenAI app (FastAPI, validation, JSON) over the same in-process engine
            # and encoder, called without a socket: what the HTTP API layer costs without Ray.
            app = build_openai_app(LocalBackend(engine, encoder), processor, settings)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=600) as local:
                for i in range(n + 1):  # the first round warms every path up and is not counted
                    side, tokens = args.image_sizes[0], args.max_tokens
                    arms = [
                        (via_http, lambda b: post(client, b)),
                        (in_process, lambda b: direct(card, b, preparer)),
                        (via_app, lambda b: post(local, b)),
                    ]
                    if args.compare_url:
                        arms.append((via_compare, lambda b: post(other, b)))
                    bodies = [
                        request_body(card["id"], args.seed + base + i, side, tokens, True, stream=False)
                        for base in (2_000_000, 3_000_000, 4_000_000, 5_000_000)[: len(arms)]
                    ]
                    shift = i % len(arms)  # the order rotates: no arm always runs first
                    for (samples, call), body in zip(arms[shift:] + arms[:shift], bodies, strict=True):
                        elapsed = await call(body)
                        if i > 0:
                            samples.append(elapsed)
    finally:
        engine.shutdown()
        torch.set_num_threads(previous_threads)
    hits_after = await asyncio.to_thread(encoder_cache_hits, args.url)
    http_p50, direct_p50 = statistics.median(via_http), statistics.median(in_process)
    app_p50 = statistics.median(via_app)
    compare: dict[str, Any] = {}
    if via_compare:
        compare_p50 = statistics.median(via_compare)
        compare = {
            "compare_url": args.compare_url,
            "compare_http_p50_ms": compare_p50 * 1000,
            "compare_serving_overhead_p50_ms": (compare_p50 - direct_p50) * 1000,
            # Per round, this address minus --url: the two HTTP paths compared pairwise (drift cancels).
            "compare_minus_url_paired_p50_ms": statistics.median(
                (b - a) * 1000 for a, b in zip(via_http, via_compare, strict=True)
            ),
        }
    return {
        "overhead_requests": n,
        # Must be 0: a cached image skips the encode on the service while the in-process arm pays it.
        "encoder_cache_hits_during_overhead": None
        if hits_before is None or hits_after is None
        else hits_after - hits_before,
        "direct_config": str(args.direct_config),
        "direct_torch_threads": args.direct_threads,
        "http_p50_ms": http_p50 * 1000,
        "direct_p50_ms": direct_p50 * 1000,
        "serving_overhead_p50_ms": (http_p50 - direct_p50) * 1000,
        # The median over rounds of (HTTP - in-process) within each round: slow drift of the machine cancels.
        "serving_overhead_paired_p50_ms": statistics.median(
            (h - d) * 1000 for h, d in zip(via_http, in_process, strict=True)
        ),
        # The split of that overhead: the OpenAI app in this process, and the rest (socket, proxy, Ray hops).
        "in_process_app_p50_ms": app_p50 * 1000,
        "api_layer_p50_ms": (app_p50 - direct_p50) * 1000,
        "ray_serve_p50_ms": (http_p50 - app_p50) * 1000,
        **compare,
    }


def encoder_cache_hits(url: str) -> int | None:
    """Encoder-cache hits summed over the service's vision replicas (``GET /v1/stats``); None if unknown."""
    try:
        stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
        return sum(int(replica.get("hits", 0)) for replica in stats.get("vision", []))
    except Exception:
        return None


def start_local_server(model: str, device: str, zipvl: Any = None) -> tuple[str, Any]:
    """An in-process server (uvicorn, real engine and encoder, no Ray) for ``--smoke``.

    ``zipvl``: the server's ZipVL defaults (a :class:`~zipvl_ray.config.ZipVLConfig`; None: the library's).
    """
    import socket

    import uvicorn

    from deployments.ingress import load_processor
    from zipvl_ray.api.local import LocalBackend
    from zipvl_ray.api.server import ServingSettings, build_openai_app
    from zipvl_ray.config import EngineConfig
    from zipvl_ray.engine import AsyncLLMEngine
    from zipvl_ray.multimodal import PromptProcessor
    from zipvl_ray.vision import VisionEncoder

    engine_config = EngineConfig(max_model_len=2048, kv_cache_bytes=32 << 20)
    from zipvl_ray.config import ZipVLConfig

    zipvl = zipvl if zipvl is not None else ZipVLConfig()
    engine = AsyncLLMEngine.from_pretrained(model, device=device, engine=engine_config, zipvl=zipvl)
    encoder = VisionEncoder.from_pretrained(model, device=device)
    settings = ServingSettings(
        served_model_name=model, model_source=model, max_model_len=engine_config.max_model_len, zipvl=zipvl
    )
    app = build_openai_app(LocalBackend(engine, encoder), PromptProcessor(load_processor(model)), settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()

    return f"http://127.0.0.1:{port}", stop


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="Base URL of the running service.")
    parser.add_argument("--model", default=None, help="Served model name (default: the first of /v1/models).")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--image-sizes", type=int, nargs="+", default=[112, 448], help="Image sides, in pixels."
    )
    parser.add_argument("--requests-per-worker", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--direct", action="store_true", help="Also measure HTTP vs in-process engine latency."
    )
    parser.add_argument(
        "--direct-model", default=None, help="Model the in-process engine loads (default: /v1/models root)."
    )
    parser.add_argument("--direct-requests", type=int, default=10)
    parser.add_argument(
        "--compare-url",
        default=None,
        help="With --direct: also time the same requests through this second base URL of the service "
        "(e.g. the proxy, http://127.0.0.1:8000, when --url is the ingress replica's direct port).",
    )
    parser.add_argument(
        "--direct-config",
        default="configs/zipvl.yaml",
        help="Serve config whose zipvl / engine blocks the in-process engine uses (the service's own; "
        "'none': the library's defaults).",
    )
    parser.add_argument(
        "--direct-threads",
        type=int,
        default=1,
        help="torch threads of the in-process engine (the replica's).",
    )
    parser.add_argument(
        "--warmup-requests", type=int, default=2, help="Untimed requests per arm and image size."
    )
    parser.add_argument("--device", default=None, help="Device of the in-process engine for --direct.")
    parser.add_argument(
        "--smoke", action="store_true", help="Tiny sweep against an in-process tiny-llava server."
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Base of the pictures' seeds (default: random per run). A rerun with the same pictures against "
        "the same service would be answered from its encoder cache: the HTTP arms would skip the encode the "
        "in-process arm pays, and the overhead would read low.",
    )
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = secrets.randbelow(10**6) * 10**7
    stop = None
    if args.smoke:
        args.url, stop = start_local_server("tiny-llava", args.device or "cpu")
        args.concurrency, args.image_sizes, args.requests_per_worker, args.max_tokens = [1, 2], [64], 1, 4
        args.direct, args.direct_requests, args.direct_model = True, 2, "tiny-llava"
        args.warmup_requests, args.direct_config = 1, "none"
        args.compare_url = args.compare_url or args.url  # the fourth arm runs too (same server)
    try:
        rows = asyncio.run(sweep(args))
        summary: dict[str, Any] = {
            "url": args.url,
            "max_tokens": args.max_tokens,
            "picture_seed_base": args.seed,
        }
        if args.direct:
            with httpx.Client(base_url=args.url, timeout=30) as client:
                root = client.get("/v1/models").json()["data"][0].get("root")
            summary.update(
                asyncio.run(serving_overhead(args, args.direct_model or root, args.direct_requests))
            )
    finally:
        if stop is not None:
            stop()
    json_path, md_path = write_results(
        "serve" if not args.smoke else "serve-smoke",
        rows,
        summary=summary,
        title="Serving: load sweep, ZipVL on vs off" + (" (smoke)" if args.smoke else ""),
        notes=(
            "Closed-loop load against the OpenAI-compatible HTTP API: each worker sends streamed requests one "
            "after another (one image, ignore_eos, fixed max_tokens). TTFT = first chunk (the role chunk, sent once the first token exists); TPOT = "
            "(last - first) / (tokens - 1). ZipVL off = per-request zipvl.enabled=false on the same service."
        ),
        out_dir=args.out_dir,
    )
    print(f"wrote {json_path} and {md_path}")
    return {"rows": rows, "summary": summary, "json": str(json_path)}


if __name__ == "__main__":
    main()
