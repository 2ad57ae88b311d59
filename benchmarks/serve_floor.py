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
``--direct-ingress`` starts the cluster with Serve's direct ingress (as ``make serve`` does): the ingress
replica then also listens on its own port (``--direct-port``), and every arm is timed through both
addresses on the same cluster, rotated, so the proxy hop and the body fetch it saves show side by side
(summary keys ``direct_*``; ``make serve`` serves the API on such a port, 8001).

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
    return (await measure_paths({"proxy": url}, requests, warmup, side))["proxy"]


async def measure_paths(
    urls: dict[str, str], requests: int, warmup: int, side: int
) -> dict[str, dict[str, list[float]]]:
    """Every arm through every address (``{path name: base URL}``), one request at a time, the
    (path, arm) pairs rotating; milliseconds per path and arm."""
    pairs = [(path, arm) for path in urls for arm in ARMS]
    times: dict[str, dict[str, list[float]]] = {path: {arm: [] for arm in ARMS} for path in urls}
    clients = {path: httpx.AsyncClient(base_url=url, timeout=60) for path, url in urls.items()}
    try:
        for i in range(warmup + requests):
            for k in range(len(pairs)):
                path, arm = pairs[(i + k) % len(pairs)]
                body = request_body("floor", 10_000 + i, side, 32, True, stream=False)
                start = time.perf_counter()
                response = await clients[path].post("/", params={"arm": arm}, content=json.dumps(body))
                elapsed = (time.perf_counter() - start) * 1e3
                response.raise_for_status()
                if i >= warmup:
                    times[path][arm].append(elapsed)
    finally:
        for client in clients.values():
            await client.aclose()
    return times


def find_direct_port(first: int, last: int, timeout_s: float = 30.0) -> int:
    """The port in ``[first, last]`` where the ingress replica answers Serve's ``/-/routes`` (direct ingress)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for port in range(first, last + 1):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/routes", timeout=2).status_code == 200:
                    return port
            except httpx.HTTPError:
                continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"no direct-ingress HTTP server answered on ports {first}-{last}")
        time.sleep(0.5)


def summarize(
    times: dict[str, list[float]], prefix: str = "", path: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows per arm and the floor's split; ``prefix`` names the summary keys of a second path."""
    rows = [
        {
            **({"path": path} if path else {}),
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
    return rows, {f"{prefix}{key}": value for key, value in summary.items()}


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
    parser.add_argument(
        "--direct-ingress",
        action="store_true",
        help="Turn on Serve's direct ingress and time every arm through the ingress replica's own port too.",
    )
    parser.add_argument(
        "--direct-port",
        type=int,
        default=8012,
        help="First port of the direct-ingress range (ten ports) for the ingress replica's HTTP server.",
    )
    parser.add_argument("--smoke", action="store_true", help="A few requests (the test suite's run).")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.warmup = 3, 1

    import os

    if args.direct_ingress:  # read by Serve's controller and replicas at start: before the cluster exists
        os.environ.update(
            {
                "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(args.direct_port),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(args.direct_port + 9),
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
            }
        )

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
        urls = {"proxy": f"http://127.0.0.1:{args.port}"}
        if args.direct_ingress:
            port = find_direct_port(args.direct_port, args.direct_port + 9)
            urls["direct ingress"] = f"http://127.0.0.1:{port}"
        times = asyncio.run(measure_paths(urls, args.requests, args.warmup, args.image_size))
    finally:
        serve.shutdown()
        ray.shutdown()
    rows, summary = summarize(times["proxy"], path="proxy" if args.direct_ingress else None)
    if args.direct_ingress:
        direct_rows, direct_summary = summarize(times["direct ingress"], "direct_", path="direct ingress")
        rows += direct_rows
        summary.update(direct_summary)
        summary["direct_ingress_saves_p50_ms"] = summary["floor_p50_ms"] - summary["direct_floor_p50_ms"]
        summary["direct_port"] = int(urls["direct ingress"].rsplit(":", 1)[1])
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
            "`serving_overhead_p50_ms` of benchmarks/results/serve.md. With --direct-ingress every arm also "
            "goes to the ingress replica's own port (path `direct ingress`: no proxy hop, no body fetch "
            "back from the proxy); the `direct_*` summary keys split that path's floor the same way."
        ),
        out_dir=args.out_dir,
    )
    result = {"rows": rows, "summary": summary}
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
