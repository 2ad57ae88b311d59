"""The KV router's cost per routing decision: the per-replica footprint prediction, one replica at a time
(as until 2026-12-07) vs batched over the replicas (``predict_request_bytes_many``), side by side.

A decision (``KVPackingRouter.choose_replicas``) builds one view per replica (its parsed snapshot plus this
router's holds) and ranks them (``rank_replicas``), which predicts the request's post-pruning bytes on
every replica from that replica's per-layer kept fractions. This script times exactly that pair of
calls, on synthetic snapshots of ``--layers`` layers and ``--holds-per-replica`` holds each, for each
replica count, with both predictions in one process (alternating, the median over ``--repeats``
batches), and checks that both give the same ranking and predictions.

    python -m benchmarks.router_cost                 # 8 / 64 / 128 replicas of 80 layers (seconds)
    python -m benchmarks.router_cost --smoke         # for the test suite

Results: ``benchmarks/results/router_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from unittest import mock

from benchmarks.common import write_results
from zipvl_ray.routing import router as router_module
from zipvl_ray.routing.footprint import KVProfile, RoutingHints, predict_request_bytes
from zipvl_ray.routing.router import HoldTable, KVRouterConfig, build_view, rank_replicas


def one_at_a_time(hints, profiles):
    return [predict_request_bytes(hints, p) for p in profiles]


def cluster(replicas: int, layers: int, holds_per_replica: int, seed: int):
    rng = random.Random(seed)
    profiles = [
        KVProfile(
            capacity_bytes=40 << 30,
            used_bytes=rng.randrange(30 << 30),
            block_size=16,
            block_bytes=256 << 10,
            num_layers=layers,
            kept_fraction_per_layer=[rng.uniform(0.05, 0.9) for _ in range(layers)],
            zipvl_tau=0.975,
            zipvl_max_keep_ratio=0.6,
        )
        for _ in range(replicas)
    ]
    holds = HoldTable()
    now = time.time()
    for r in range(replicas):
        for h in range(holds_per_replica):
            holds.place(f"r{r}-{h}", r, rng.randrange(1 << 30), now - rng.uniform(0, 2))
    return profiles, holds, now


def decide(profiles, holds, now, hints, config):
    views = [build_view(i, p, now - 0.5, holds, config, now, i) for i, p in enumerate(profiles)]
    return rank_replicas(views, hints, config)


def time_decisions(profiles, holds, now, requests, config, batched: bool) -> tuple[float, list]:
    patch = (
        mock.patch.object(
            router_module, "predict_request_bytes_many", router_module.predict_request_bytes_many
        )
        if batched
        else mock.patch.object(router_module, "predict_request_bytes_many", one_at_a_time)
    )
    with patch:
        started = time.perf_counter()
        rankings = [decide(profiles, holds, now, hints, config) for hints in requests]
        elapsed = time.perf_counter() - started
    return elapsed / len(requests), rankings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--holds-per-replica", type=int, default=33, help="2,100 holds at 64 replicas")
    parser.add_argument("--requests", type=int, default=100, help="decisions per timed batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.replicas, args.layers, args.requests, args.repeats = [4], 8, 5, 1
    config = KVRouterConfig()
    rng = random.Random(1)
    requests = [
        RoutingHints(
            prompt_tokens=rng.randrange(100, 40_000),
            image_tokens=0,
            max_tokens=rng.randrange(16, 2048),
            tau=rng.choice([None, None, None, 0.9, 0.99]),
        )
        for _ in range(args.requests)
    ]
    rows = []
    identical = True
    for replicas in args.replicas:
        profiles, holds, now = cluster(replicas, args.layers, args.holds_per_replica, seed=replicas)
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.repeats):
            for batched in (r % 2 == 0, r % 2 != 0):
                seconds, rankings = time_decisions(profiles, holds, now, requests, config, batched)
                times[batched].append(seconds)
                if batched:
                    batched_rankings = rankings
                else:
                    scalar_rankings = rankings
        identical &= all(
            a.order == b.order and a.predicted_bytes == b.predicted_bytes
            for a, b in zip(scalar_rankings, batched_rankings, strict=True)
        )
        before, after = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
        rows.append(
            {
                "replicas": replicas,
                "layers": args.layers,
                "holds": replicas * args.holds_per_replica,
                "one_at_a_time_ms": round(before, 3),
                "batched_ms": round(after, 3),
                "speedup_x": round(before / after, 2),
            }
        )
    summary = {"identical_rankings": identical, "requests_per_batch": args.requests, "repeats": args.repeats}
    name = "router_cost-smoke" if args.smoke else "router_cost"
    write_results(
        name,
        rows,
        summary=summary,
        title="KV router: cost per routing decision (views + ranking)",
        notes=__doc__.split("\n\n")[0],
        out_dir=args.out_dir,
    )
    for row in rows:
        print(row)
    print(summary)
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
