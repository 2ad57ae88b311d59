"""The floor of the serving overhead: Ray Serve's own cost for zipvl-ray's request path, with no work.

``benchmarks/serve.py --direct`` measures the serving overhead of the real service (HTTP p50 minus the
same request in-process). How much of it could any code of ours remove? This script deploys, on a fresh
local Ray cluster, an application with the same topology and payloads as ``deployments.app`` but no work
in it, and times one request at a time over HTTP:

* an ingress replica (plain Starlette, no FastAPI: the API layer is ours, measured by ``serve.py``'s
  in-process app arm) that reads the same request body (a chat completion with one image as a data URL);
* a vision replica called with the preprocessed image's tensor (``--pixels``, LLaVA's ``(1, 3, 112, 112)``
  float32 by default) that returns an image-feature tensor (``--features``, zipvl-tiny's ``(64, 128)``);
* an LLM replica called with a streaming handle and the vision call's response passed through (chained,
  as the ingress does), which yields one final output (the non-streamed request's only item);
* the ingress answering JSON.

Every replica has ``num_cpus: 0`` and the handlers return at once, so the HTTP latency *is* the cost of
the path: the client's socket, the proxy and the handle hops. Four arms, rotated request by request,
locate it: ``proxy-unread`` (the ingress answers without reading the body), ``proxy`` (it reads the
body first: Serve's proxy does not send it with the request, the replica fetches it with one more actor
call back into the proxy), ``proxy+vision`` (it also awaits the vision call) and ``full`` (the whole
chain). ``full``'s p50 is the floor the real service's overhead is compared
with; the script also reports each arm and the cost of each step on top of the previous arm.

    .venv/bin/python -m benchmarks.serve_floor --requests 60       # about a minute, a fresh cluster

Run it when nothing else holds the cores (stop ``serve run`` first: this script starts its own cluster),
ideally right before or after ``benchmarks/serve.py --direct`` on the same machine.
``--smoke`` is the test suite's short run. Results: ``benchmarks/results/serve_floor.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx

from benchmarks.common import write_results
from benchmarks.serve import request_body

ARMS = ("proxy-unread", "proxy", "proxy+vision", "full")


def build_floor_app(pixels: tuple[int, ...], features: tuple[int, ...]) -> Any:
    """The no-work application: ingress -> vision -> LLM (chained, streamed), ``num_cpus: 0`` each."""
    import numpy as np
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    options = {"ray_actor_options": {"num_cpus": 0}, "num_replicas": 1}

    @serve.deployment(name="FloorVision", **options)
    class FloorVision:
        def __init__(self) -> None:
            self.features = np.zeros(features, dtype=np.float32)

        async def encode(self, images: list[Any]) -> list[Any]:
            return [self.features for _ in images]

    @serve.deployment(name="FloorLLM", max_ongoing_requests=64, **options)
    class FloorLLM:
        async def generate(self, request: dict, image_features: list[Any] | None = None):
            yield {"request_id": request["request_id"], "text": "ok", "finished": True}

    @serve.deployment(name="FloorIngress", max_ongoing_requests=128, **options)
    class FloorIngress:
        def __init__(self, vision: Any, llm: Any) -> None:
            self.vision, self.llm = vision, llm
            self.pixels = np.zeros(pixels, dtype=np.float32)

        async def __call__(self, request: Request) -> JSONResponse:
            arm = request.query_params.get("arm", "full")
            if arm == "proxy-unread":
                return JSONResponse({"bytes": 0})
            body = await request.body()
            if arm == "proxy":
                return JSONResponse({"bytes": len(body)})
            features = self.vision.encode.remote([self.pixels])
            if arm == "proxy+vision":
                await features
                return JSONResponse({"bytes": len(body)})
            last = None
            async for item in self.llm.options(stream=True).generate.remote(
                {"request_id": "floor", "token_ids": list(range(90))}, features
            ):
                last = item
            return JSONResponse({"bytes": len(body), "text": last["text"]})

    return FloorIngress.bind(FloorVision.bind(), FloorLLM.bind())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, requests: int, warmup: int, side: int) -> dict[str, list[float]]:
    """``requests`` timed requests per arm, one at a time, the arms rotating; milliseconds."""
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for i in range(warmup + requests):
            for k in range(len(ARMS)):
                arm = ARMS[(i + k) % len(ARMS)]
                body = request_body("floor", 10_000 + i, side, 32, True, stream=False)
                start = time.perf_counter()
                response = await client.post("/", params={"arm": arm}, content=json.dumps(body))
                elapsed = (time.perf_counter() - start) * 1e3
                response.raise_for_status()
                if i >= warmup:
                    times[arm].append(elapsed)
    return times


def summarize(times: dict[str, list[float]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = [
        {
            "arm": arm,
            "requests": len(values),
            "p50_ms": statistics.median(values),
            "p95_ms": percentile(values, 0.95),
            "mean_ms": statistics.fmean(values),
        }
        for arm, values in times.items()
    ]
    p50 = {row["arm"]: row["p50_ms"] for row in rows}
    summary = {
        "floor_p50_ms": p50["full"],
        "proxy_p50_ms": p50["proxy"],
        "proxy_unread_p50_ms": p50["proxy-unread"],
        "body_read_p50_ms": p50["proxy"] - p50["proxy-unread"],
        "vision_hop_p50_ms": p50["proxy+vision"] - p50["proxy"],
        "llm_hops_p50_ms": p50["full"] - p50["proxy+vision"],
    }
    return rows, summary


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.lower().split("x"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=60, help="Timed requests per arm.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed requests per arm first.")
    parser.add_argument("--image-size", type=int, default=112, help="Side of the request body's PNG.")
    parser.add_argument(
        "--pixels", default="1x3x112x112", help="Shape of the tensor sent to the vision replica."
    )
    parser.add_argument(
        "--features", default="64x128", help="Shape of the tensor the vision replica returns."
    )
    parser.add_argument("--port", type=int, default=8011, help="HTTP port of the floor cluster's proxy.")
    parser.add_argument("--smoke", action="store_true", help="A few requests (the test suite's run).")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.warmup = 3, 1

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(
            build_floor_app(parse_shape(args.pixels), parse_shape(args.features)),
            name="floor",
            route_prefix="/",
        )
        url = f"http://127.0.0.1:{args.port}"
        times = asyncio.run(measure(url, args.requests, args.warmup, args.image_size))
    finally:
        serve.shutdown()
        ray.shutdown()
    rows, summary = summarize(times)
    summary.update(
        {
            "requests_per_arm": args.requests,
            "image_size": args.image_size,
            "pixels": args.pixels,
            "features": args.features,
        }
    )
    name = "serve_floor-smoke" if args.smoke else "serve_floor"
    write_results(
        name,
        rows,
        summary=summary,
        title="Ray Serve's floor for zipvl-ray's request path (no work in any replica)",
        notes=(
            "One request at a time over HTTP to a no-work application with the service's topology "
            "(proxy -> ingress -> vision -> LLM, chained and streamed, num_cpus 0). `full` p50 is the "
            "least serving overhead any code could reach on this machine; compare with "
            "`serving_overhead_p50_ms` of benchmarks/results/serve.md."
        ),
        out_dir=args.out_dir,
    )
    result = {"rows": rows, "summary": summary}
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
