"""The KV router and the KV autoscaler on a real local Ray cluster: scale up, a packed burst, scale down.

The application of ``configs/zipvl-multi.yaml`` with the real engine (``tiny-llava``, 1 MiB KV pools) and
the real vision encoder, behind ``KVPackingRouter`` and ``KVDemandPolicy`` (1 to 3 LLM replicas, short
delays). The real engine rather than the fake of ``tests/deployments/fakes.py``: the fake has no KV pool
to run out of (no admission, no preemption, a fixed 64 MiB capacity, no decode reservation), so
"packed without exceeding capacity" would hold whatever the router did; the engine's own admission,
block accounting, committed lifetime and kept fractions are what the router must get right.

Three phases, in fixture order (one cluster for the module):

1. *up*: from one replica, a sustained load whose KV demand needs three: ``serve.status()`` shows the
   LLM deployment grow to three running replicas;
2. *burst*: on three idle replicas, eight mixed requests (0-4 pictures) sent 0.2 s apart. Every
   replica's ``record_routing_stats`` is sampled every 0.1 s: KV held plus reserved never exceeds the
   pool, nothing is preempted (the router left room for every request's whole generation), and the
   replicas fill in order: the second gets its first request only once the first is at least half full
   (power-of-two or spreading would use it from the second request on);
3. *down*: idle again, the deployment goes back to one replica, and the survivor is the replica the burst
   filled first (Serve stops the newest replicas, the router leaves exactly those empty).

No request fails in any phase.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.deployments.conftest import free_port, ray_test_env

router_real = pytest.importorskip("benchmarks.router_real")

pytestmark = pytest.mark.ray

SCALING = router_real.Scaling(
    min_replicas=1,
    max_replicas=3,
    initial_replicas=1,
    upscale_delay_s=1.0,
    downscale_delay_s=15.0,
    metrics_interval_s=0.5,
    look_back_period_s=2.0,
    graceful_shutdown_timeout_s=30.0,
)
#: Sustained load of phase 1: requests kept in flight until three replicas run.
UP_IN_FLIGHT = 8
UP_MAX_TOKENS = 128
#: Phase 2: (pictures, max_tokens) of each request, in sending order, and the gap between them. At the
#: engine's kept fraction (~0.83 here) they need about 40-100 of a pool's 256 blocks each, 2.1 pools in
#: all: packing fills two replicas and puts the rest on the third.
BURST = [(1, 128), (2, 128), (0, 128), (4, 128), (1, 128), (2, 128), (3, 128), (1, 128)]
BURST_GAP_S = 0.2
#: The first replica's committed share when the second gets its first request (packing: ~0.5-0.9, a
#: fresh-clone run once saw 0.484; spreading: the first request's share, below 0.3).
FILLED_BEFORE_NEXT = 0.4
#: request_routing_stats_period_s of configs/zipvl-multi.yaml.
STATS_PERIOD_S = 0.5


@pytest.fixture(scope="module")
def service():
    ray = pytest.importorskip("ray")
    from ray import serve

    from deployments.app import AppArgs, build_app
    from zipvl_ray.routing.autoscaling import KVDemandPolicyConfig

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ray_test_env()})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        policy = KVDemandPolicyConfig()  # the defaults
        label = f"pack+{'kvheld' if policy.demand == 'held' else 'kv'}({policy.target_kv_utilization})"
        strategy = router_real.parse_strategy(label)
        args = AppArgs.model_validate(router_real.app_args(strategy, SCALING))
        serve.run(build_app(args), name=router_real.APP_NAME, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "args": args}
    finally:
        serve.shutdown()
        ray.shutdown()


def pictures(count: int, seed: int) -> list[str]:
    import random

    from benchmarks.router_sim import synthetic_pictures

    images = synthetic_pictures(count, random.Random(seed), video=False)
    return [router_real.picture_data_url(image) for image in images]


async def sustained_load(url: str, until, timeout_s: float) -> list:
    """Keep ``UP_IN_FLIGHT`` requests in flight until ``until()``; then let them finish."""
    import httpx

    results, tasks = [], set()
    bodies = [router_real.chat_body(pictures(n, seed=n), UP_MAX_TOKENS) for n in (1, 2, 3, 4)]
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        i = 0
        while time.monotonic() < deadline and not await asyncio.to_thread(until):
            while len(tasks) < UP_IN_FLIGHT:
                result = router_real.RequestResult("image", UP_MAX_TOKENS, time.monotonic())
                results.append(result)
                tasks.add(
                    asyncio.create_task(router_real.stream_chat(client, bodies[i % len(bodies)], result))
                )
                i += 1
            done, tasks = await asyncio.wait(tasks, timeout=0.5)
        if tasks:
            await asyncio.wait(tasks)
    return results


async def burst(url: str) -> list:
    import httpx

    bodies = [router_real.chat_body(pictures(n, seed=100 + i), m) for i, (n, m) in enumerate(BURST)]
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        tasks = []
        for (n, m), body in zip(BURST, bodies, strict=True):
            result = router_real.RequestResult(f"{n} pictures", m, time.monotonic())
            tasks.append(asyncio.create_task(router_real.stream_chat(client, body, result)))
            await asyncio.sleep(BURST_GAP_S)
        return list(await asyncio.gather(*tasks))


@pytest.fixture(scope="module")
def scaled_up(service):
    router_real.wait_for(lambda: router_real.llm_status().running == 1, 120, "one LLM replica")
    start = time.monotonic()
    with router_real.ServeStatusSampler() as status:
        results = asyncio.run(
            sustained_load(service["url"], lambda: router_real.llm_status().running == 3, timeout_s=150)
        )
    print(f"phase up: {time.monotonic() - start:.1f} s, {len(results)} requests")
    return {"results": results, "status": status.samples}


@pytest.fixture(scope="module")
def packed_burst(service, scaled_up):
    router_real.wait_for(lambda: router_real.llm_status().running == 3, 30, "three LLM replicas")
    with router_real.ReplicaStatsSampler(interval_s=0.1) as sampler:
        router_real.wait_for(
            lambda: (
                len(sampler.by_replica()) == 3 and all(not s[-1].busy for s in sampler.by_replica().values())
            ),
            30,
            "three idle replicas reporting",
            interval_s=0.1,
        )
        # The router sees a replica's stats a second or so late: let it see them idle too.
        time.sleep(4 * STATS_PERIOD_S)
        start = time.monotonic()
        results = asyncio.run(burst(service["url"]))
    sampler.poll()  # a last sample of the finished state, taken after the sampler thread stopped
    by_replica = sampler.by_replica(since=start)
    print(f"phase burst: {time.monotonic() - start:.1f} s")
    for replica, samples in by_replica.items():
        busy = [
            (round(s.t - start, 2), s.lifetime_bytes >> 12, s.num_running, s.num_waiting) for s in samples
        ]
        print(f"  {replica}: (t, lifetime blocks, running, waiting) {busy[::3]}")
    return {"results": results, "by_replica": by_replica}


@pytest.fixture(scope="module")
def scaled_down(service, packed_burst):
    with router_real.ServeStatusSampler() as status:
        waited = router_real.wait_for(
            lambda: router_real.llm_status().billed == 1,
            SCALING.downscale_delay_s + 60,
            "back to one replica",
        )
        status.poll()  # the sampler thread's last sample can predate the state wait_for just saw
    survivors = [name.rsplit("#", 1)[-1] for name in router_real.llm_replica_actor_names()]
    print(f"phase down: {waited:.1f} s")
    return {"status": status.samples, "waited_s": waited, "survivors": survivors}


def fill_order(by_replica: dict) -> list[str]:
    """Replicas in the order they got their first request (never-used ones last)."""
    first = {r: next((s.t for s in samples if s.busy), float("inf")) for r, samples in by_replica.items()}
    return sorted(first, key=first.get)


def test_autoscaling_goes_up_under_kv_load(scaled_up):
    counts = [s.running for s in scaled_up["status"]]
    assert counts[0] == 1 and max(counts) == 3
    assert "UPSCALING" in {s.status for s in scaled_up["status"]}


def test_burst_never_exceeds_a_pool_and_preempts_nothing(packed_burst):
    by_replica = packed_burst["by_replica"]
    assert len(by_replica) == 3
    for replica, samples in by_replica.items():
        capacity = samples[0].capacity_bytes
        assert capacity == 1 << 20
        assert max(s.used_bytes + s.reserved_bytes for s in samples) <= capacity, replica
        assert samples[-1].num_preemptions == samples[0].num_preemptions, replica


def test_burst_fills_replicas_in_order(packed_burst):
    by_replica = packed_burst["by_replica"]
    order = fill_order(by_replica)
    first, second = by_replica[order[0]], by_replica[order[1]]
    second_starts = next(s.t for s in second if s.busy)  # the burst needs two pools at least
    capacity = first[0].capacity_bytes
    first_share = max((s.lifetime_bytes for s in first if s.t <= second_starts), default=0) / capacity
    assert first_share >= FILLED_BEFORE_NEXT
    # The first replica ran the most requests. Its overall peak is not compared with the others': which
    # replica holds the burst's late, large requests at their peak is timing (fresh-clone runs saw the
    # first-filled replica at 901,120 and at 671,744 bytes against another's 917,504 of 1 MiB).
    finished = {r: samples[-1].num_finished - samples[0].num_finished for r, samples in by_replica.items()}
    assert finished[order[0]] == max(finished.values()) and sum(finished.values()) == len(BURST)


def test_autoscaling_goes_back_down_to_the_replica_packing_kept_busy(scaled_down, packed_burst):
    counts = [s.billed for s in scaled_down["status"]]
    assert counts[0] == 3 and counts[-1] == 1
    assert "DOWNSCALING" in {s.status for s in scaled_down["status"]}  # Serve scaled it, nothing crashed
    assert scaled_down["survivors"] == [fill_order(packed_burst["by_replica"])[0]]


def test_no_request_failed(scaled_up, packed_burst, scaled_down):
    results = scaled_up["results"] + packed_burst["results"]
    failed = [(r.kind, r.status_code, r.tokens, r.error) for r in results if not r.ok]
    assert failed == [] and len(results) > len(BURST)
