"""The vision stage's batching: ``BusyBatcher`` (the stage's) vs Ray Serve's ``@serve.batch``, side by side.

On one local Ray cluster, two vision deployments with the same encoder (``zipvl-tiny``'s tower and
projector, real weights), the same batch body (``VisionEncoderServer._encode_batch``) and the same
``max_batch_size``; they differ only in how requests become batches:

* ``busy``: ``deployments.batching.BusyBatcher`` with no wait (the stage's default): an idle encoder
  starts on a request at once, what arrives while a forward runs forms the next batch;
* ``window``: the previous design, ``@serve.batch`` with a ``--window-ms`` wait (5 ms in the configs
  until 2026-12-07): a batch is what arrives within the window after its first request.

Each load point sends the same requests (one distinct image each, so the encoder cache never answers)
through a handle from this process, the two arms taking turns point by point and round by round:
``sequential`` (one at a time), open-loop Poisson arrivals at ``--rates`` requests/s, and a ``burst``
of ``--burst`` requests at once. Reported per arm and point: latency p50 / p95 of the handle call, and
the mean requests per forward (from the replica's counters).

    python -m benchmarks.vision_batching                  # about two minutes on 2 CPU cores
    python -m benchmarks.vision_batching --smoke          # seconds of load (the test suite's run)

Results: ``benchmarks/results/vision_batching.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.common import write_results

ARMS = ("busy", "window")


def build_app(model: str, max_batch_size: int, window_s: float) -> Any:
    """An application with both vision deployments (under a root that only holds their handles)."""
    from ray import serve

    from deployments.vision import VisionEncoderServer
    from zipvl_ray.vision import VisionEncoder

    base = VisionEncoderServer.func_or_class

    class WindowBatched(base):
        """The same stage with Serve's time-window batching in front of the same batch body."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._batcher = self  # ``encode`` awaits ``self._batcher.submit(images)``

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=window_s)
        async def submit(self, requests):
            return await self._encode_batch(requests)

    options = {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 4 * max_batch_size}
    common = dict(cache_size=0, max_batch_size=max_batch_size)
    busy = serve.deployment(base, name="VisionBusy", **options).bind(VisionEncoder, model, **common)
    window = serve.deployment(WindowBatched, name="VisionWindow", **options).bind(
        VisionEncoder, model, **common
    )

    @serve.deployment(name="Both", ray_actor_options={"num_cpus": 0})
    class Both:  # the application's root; the benchmark calls each vision deployment's own handle
        def __init__(self, busy, window):
            self.handles = (busy, window)

    return Both.bind(busy, window)


def images_for(count: int, seed: int, side: int = 112) -> list[Any]:
    """``count`` distinct preprocessed images (random pixels, unique cache keys)."""
    import torch

    from zipvl_ray.multimodal import ImageInput

    rng = np.random.default_rng(seed)
    return [
        ImageInput(
            pixel_values=torch.from_numpy(rng.standard_normal((1, 3, side, side), dtype=np.float32)),
            extra={},
            num_tokens=(side // 14) ** 2,
            content_hash=f"bench-{seed}-{i}",
        )
        for i in range(count)
    ]


async def run_point(handle: Any, point: str, images: list[Any], rate: float, seed: int) -> list[float]:
    """Latencies (ms) of one request per image under the load ``point``."""

    async def one(image: Any, delay: float) -> float:
        await asyncio.sleep(delay)
        start = time.perf_counter()
        await handle.encode.remote([image])
        return (time.perf_counter() - start) * 1e3

    if point == "sequential":
        return [await one(image, 0.0) for image in images]
    if point.startswith("burst"):
        delays = [0.0] * len(images)
    else:  # open-loop Poisson arrivals
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(images))
        delays = list(np.cumsum(gaps) - gaps[0])
    return list(await asyncio.gather(*(one(image, d) for image, d in zip(images, delays, strict=True))))


def summarize(samples: dict[tuple[str, str], list[float]], batches: dict[tuple[str, str], tuple[int, int]]):
    rows = []
    for (arm, point), values in samples.items():
        forwards, requests = batches[(arm, point)]
        rows.append(
            {
                "point": point,
                "arm": arm,
                "requests": len(values),
                "p50_ms": statistics.median(values),
                "p95_ms": float(np.percentile(values, 95)),
                "mean_ms": statistics.fmean(values),
                "requests_per_forward": requests / forwards if forwards else 0.0,
            }
        )
    rows.sort(key=lambda r: (r["point"], ARMS.index(r["arm"])))
    summary: dict[str, Any] = {}
    for point in dict.fromkeys(r["point"] for r in rows):
        by_arm = {r["arm"]: r for r in rows if r["point"] == point}
        if set(by_arm) == set(ARMS):
            key = point.replace(" ", "").replace("/", "_per_")
            summary[f"{key}_p50_window_minus_busy_ms"] = by_arm["window"]["p50_ms"] - by_arm["busy"]["p50_ms"]
    return rows, summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="zipvl-tiny")
    parser.add_argument("--requests", type=int, default=48, help="Requests per arm and load point per round.")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[50.0, 200.0], help="Poisson arrivals (/s)."
    )
    parser.add_argument("--burst", type=int, default=32, help="Requests sent at once in the burst point.")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument(
        "--window-ms", type=float, default=5.0, help="@serve.batch's batch_wait_timeout_s (ms)."
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.rates, args.burst, args.rounds = 4, [100.0], 4, 1

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    samples: dict[tuple[str, str], list[float]] = {}
    batches: dict[tuple[str, str], tuple[int, int]] = {}
    try:
        serve.start(proxy_location="Disabled")
        serve.run(
            build_app(args.model, args.max_batch_size, args.window_ms / 1e3), name="vb", route_prefix=None
        )
        handles = {arm: serve.get_deployment_handle(f"Vision{arm.title()}", app_name="vb") for arm in ARMS}
        points = ["sequential", *(f"poisson {rate:g}/s" for rate in args.rates), f"burst {args.burst}"]

        async def drive() -> None:
            for arm in ARMS:  # warm-up: the tower's first forwards
                await run_point(handles[arm], "sequential", images_for(3, 999), 0.0, 0)
            for r in range(args.rounds):
                for p, point in enumerate(points):
                    order = ARMS if (r + p) % 2 == 0 else ARMS[::-1]
                    for arm in order:
                        before = await handles[arm].stats.remote()
                        count = args.burst if point.startswith("burst") else args.requests
                        rate = float(point.split()[1].rstrip("/s")) if point.startswith("poisson") else 0.0
                        seed = 10_000 * r + 100 * p + ARMS.index(arm)
                        lat = await run_point(handles[arm], point, images_for(count, seed), rate, seed)
                        after = await handles[arm].stats.remote()
                        samples.setdefault((arm, point), []).extend(lat)
                        f0, q0 = batches.get((arm, point), (0, 0))
                        batches[(arm, point)] = (
                            f0 + after["batches"] - before["batches"],
                            q0 + after["requests"] - before["requests"],
                        )

        asyncio.run(drive())
    finally:
        serve.shutdown()
        ray.shutdown()
    rows, summary = summarize(samples, batches)
    summary.update(
        {
            "model": args.model,
            "max_batch_size": args.max_batch_size,
            "window_ms": args.window_ms,
            "rounds": args.rounds,
            "requests_per_point": args.requests,
        }
    )
    name = "vision_batching-smoke" if args.smoke else "vision_batching"
    write_results(
        name,
        rows,
        summary=summary,
        title="Vision stage batching: BusyBatcher vs Ray Serve's @serve.batch",
        notes=(
            "Two vision deployments on one local cluster, the same encoder and batch body, differing only in "
            "batching: `busy` (an idle encoder starts at once, arrivals during a forward form the next batch) "
            "and `window` (@serve.batch with a wait window). Latency of the handle call, one distinct image "
            "per request; requests_per_forward from the replicas' counters."
        ),
        out_dir=args.out_dir,
    )
    for row in rows:
        print(
            f"{row['point']:>16} {row['arm']:>6}: p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f} ms  "
            f"{row['requests_per_forward']:.2f} requests/forward"
        )
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
