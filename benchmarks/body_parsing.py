"""What a large request body does to the ingress's event loop: parsed on the loop (FastAPI's way, until
2026-12-08) vs in a worker thread (``zipvl_ray.api.server.chat_request_body``), side by side.

Two copies of the OpenAI app run in child processes on loopback, one per arm (the loop arm with
``INLINE_BODY_BYTES`` set past any body, so every body is parsed where FastAPI parses it); each freezes
its startup heap out of the garbage collector's reach once the app is built, as Serve 2.60 does for every
replica (``--no-gc-freeze``: not). For each
conversation size, the arms take turns: a client thread pings ``GET /v1/models`` every 5 ms while
another posts one chat body of that many one-word messages, under ``max_request_containers`` (the
preparer then refuses it as longer than ``max_model_len``, after the parse and validation this measures).
Reported per arm: the large request's latency, and the pings answered while it ran, with their p50, p99
and maximum latency (a stall of the loop shows as a ping that waited for it). Medians over ``--trials``.

    python -m benchmarks.body_parsing            # 50,000 / 100,000 / 199,000 messages (about a minute)
    python -m benchmarks.body_parsing --smoke    # for the test suite

Results: ``benchmarks/results/body_parsing.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import statistics
import threading
import time

import httpx

from benchmarks.common import write_results

ARMS = {"on the event loop": 1 << 62, "worker thread": None}


class _NoInference:
    """A backend for requests that never reach inference (every body here is refused after parsing)."""

    async def generate(self, *args, **kwargs):  # pragma: no cover - never called
        raise AssertionError("the benchmark's bodies never reach inference")
        yield

    async def health(self):
        return {}

    async def stats(self):
        return {}


def _serve(port: int, inline_bytes: int | None, freeze_gc: bool) -> None:
    import gc

    import uvicorn

    from zipvl_ray.api import server as server_module
    from zipvl_ray.models import load_processor
    from zipvl_ray.multimodal import PromptProcessor

    if inline_bytes is not None:
        server_module.INLINE_BODY_BYTES = inline_bytes
    settings = server_module.ServingSettings(
        served_model_name="tiny-llava", model_source="tiny-llava", max_model_len=512
    )
    app = server_module.build_openai_app(
        _NoInference(), PromptProcessor(load_processor("tiny-llava")), settings
    )
    if freeze_gc:  # as Serve 2.60 does at the end of every replica's start (RAY_SERVE_FREEZE_GC_ON_STARTUP)
        gc.collect()
        gc.freeze()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, process, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError("the server process exited")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def one_trial(url: str, body: bytes) -> dict:
    """Post ``body`` while pinging; the request's latency and the pings' latencies meanwhile."""
    pings: list[tuple[float, float]] = []  # (start, seconds)
    stop = threading.Event()

    def ping() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                start = time.perf_counter()
                client.get("/v1/models")
                pings.append((start, time.perf_counter() - start))
                time.sleep(0.005)

    pinger = threading.Thread(target=ping)
    pinger.start()
    time.sleep(0.2)
    start = time.perf_counter()
    response = httpx.post(
        url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=120
    )
    end = time.perf_counter()
    time.sleep(0.1)
    stop.set()
    pinger.join()
    during = sorted(s for t, s in pings if t + s >= start and t <= end)
    return {
        "status": response.status_code,
        "request_s": end - start,
        "pings": len(during),
        "ping_p50_ms": 1e3 * during[len(during) // 2] if during else 0.0,
        "ping_p99_ms": 1e3 * during[min(len(during) - 1, int(0.99 * len(during)))] if during else 0.0,
        "ping_max_ms": 1e3 * during[-1] if during else 0.0,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, nargs="+", default=[50_000, 100_000, 199_000])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the servers' startup heap to the collector (Serve freezes it; without, a full collection "
        "walks it: about 200 ms here, set off by a large body's allocations)",
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.messages, args.trials = [3_000], 1
    context = multiprocessing.get_context("spawn")
    servers = {}
    try:
        for arm, inline_bytes in ARMS.items():
            port = _free_port()
            process = context.Process(
                target=_serve, args=(port, inline_bytes, not args.no_gc_freeze), daemon=True
            )
            process.start()
            servers[arm] = (f"http://127.0.0.1:{port}", process)
        for url, process in servers.values():
            _wait_until_up(url, process)
        rows = []
        for messages in args.messages:
            body = json.dumps(
                {"model": "tiny-llava", "messages": [{"role": "user", "content": "a"}] * messages}
            ).encode()
            trials: dict[str, list[dict]] = {arm: [] for arm in ARMS}
            for t in range(args.trials):
                order = list(ARMS) if t % 2 == 0 else list(ARMS)[::-1]
                for arm in order:
                    trials[arm].append(one_trial(servers[arm][0], body))
            for arm, results in trials.items():
                row = {"messages": messages, "body_mb": round(len(body) / 1e6, 2), "arm": arm}
                row["statuses"] = sorted({r["status"] for r in results})
                for key in ("request_s", "pings", "ping_p50_ms", "ping_p99_ms", "ping_max_ms"):
                    row[key] = round(statistics.median(r[key] for r in results), 3)
                rows.append(row)
    finally:
        for _url, process in servers.values():
            process.kill()
            process.join(timeout=10)
    worst = {arm: max(r["ping_max_ms"] for r in rows if r["arm"] == arm) for arm in ARMS}
    summary = {
        "trials": args.trials,
        "gc_frozen_after_start": not args.no_gc_freeze,
        "worst_ping_ms_on_the_loop": worst["on the event loop"],
        "worst_ping_ms_worker_thread": worst["worker thread"],
    }
    name = "body_parsing-smoke" if args.smoke else "body_parsing"
    write_results(
        name,
        rows,
        summary=summary,
        title="Large request bodies: parsed on the event loop vs in a worker thread",
        notes=__doc__.split("\n\n")[1],
        out_dir=args.out_dir,
    )
    for row in rows:
        print(
            f"{row['messages']:>7} msgs {row['arm']:>18}: request {row['request_s']:.2f} s, {row['pings']} pings, "
            f"p50 {row['ping_p50_ms']:.1f} ms, max {row['ping_max_ms']:.0f} ms"
        )
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
