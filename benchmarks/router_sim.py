"""Discrete-event simulation: KV packing + KV-demand autoscaling vs Ray's power-of-two router, on GPU replicas.

A seeded, bursty trace of mixed image / video requests is replayed against N GPU replicas, each a model
of the paged engine (``zipvl_ray.engine.scheduler``): admission by predicted post-pruning footprint with
``decode_headroom_tokens`` of growth reserved, prefill-first steps, decode in chunks of tokens, the
newest sequence preempted when the pool runs out. Every request keeps a per-layer fraction of its prompt
drawn from a retention model. Routers and autoscalers run the project's own code:

- ``pow2``: Ray Serve's default (two random replicas under ``max_ongoing_requests``, the shorter queue
  wins), scaled by Ray's default ``replica_queue_length_autoscaling_policy`` at a ``target_ongoing_requests``.
- ``spread``: :func:`zipvl_ray.routing.router.rank_replicas` with ``strategy="spread"`` (least KV used).
- ``pack``: the same with ``strategy="pack"`` (best fit), select-and-reserve through
  :class:`~zipvl_ray.routing.router.HoldTable`, replica stats from
  :func:`~zipvl_ray.routing.replica_stats.routing_stats` delivered late, scaled by
  :class:`~zipvl_ray.routing.autoscaling.KVDemandPolicy` fed with
  :func:`~zipvl_ray.routing.replica_stats.autoscaling_stats`.

Serve's delays, bounds and downscale order (pending replicas, then newest) and graceful draining are
modelled; cost is replica-seconds from the scale-up decision to the end of draining.

Default model (documented in ``docs/routing.md``): LLaVA-NeXT-7B geometry (32 layers, 32 KV heads of
128, fp16: 512 KiB per dense token), a 40 GiB KV pool per H100-class replica, prefill 16k tokens/s,
decode step ``12 ms + 0.12 ms x batch + KV bytes / 2.4 TB/s``. Retention: a request's mean kept fraction
``m ~ Beta(mean, concentration=20)`` with mean 0.50 for images (the paper's LLaVA-NeXT-7B at tau 0.975) and
0.42 for video (LongVA), per layer ``m x shape_l x LogNormal(0, 0.10)`` with the first two layers
keeping 1.6x as much (shape renormalised to mean 1), clipped to [0.02, 1]. ``--retention-json`` replaces it
with measured figures.

Run::

    .venv/bin/python benchmarks/router_sim.py            # the full comparison (about 4 minutes)
    .venv/bin/python benchmarks/router_sim.py --smoke    # seconds; what tests/benchmarks runs
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import re
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy  # noqa: E402
from ray.serve.config import AutoscalingConfig, AutoscalingContext  # noqa: E402

from benchmarks.common import RESULTS_DIR, write_results  # noqa: E402
from zipvl_ray.engine.types import EngineStats  # noqa: E402
from zipvl_ray.routing.autoscaling import KVDemandPolicy  # noqa: E402
from zipvl_ray.routing.footprint import KVProfile, RoutingHints, predict_bytes  # noqa: E402
from zipvl_ray.routing.replica_stats import autoscaling_stats, profile_from_routing_stats, routing_stats  # noqa: E402
from zipvl_ray.routing.router import (  # noqa: E402
    HoldTable,
    KVRouterConfig,
    build_view,
    conservative_profile,
    rank_replicas,
)

GIB = 1 << 30


# ----------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ReplicaModel:
    """One GPU replica: KV geometry, engine limits and speed.

    Attributes
    ----------
    num_layers, kv_heads, head_dim, dtype_bytes, block_size : int
        Geometry; one block of one layer holds ``block_size`` tokens of keys and values.
    kv_pool_gib : float
        KV pool per replica.
    max_num_seqs, max_num_batched_tokens, decode_headroom_tokens : int
        Engine limits (``EngineConfig``).
    keep_fraction_ema : float
        Weight of the newest prefill in the engine's running mean kept fraction.
    prefill_tokens_per_s, prefill_overhead_s : float
        Prefill speed (ZipVL's sparse prefill included) and fixed cost per prefill step.
    decode_base_s, decode_per_seq_s, hbm_bytes_per_s : float
        Decode step time ``base + per_seq x batch + KV bytes / hbm``.
    decode_chunk : int
        Tokens simulated per decode event (all running sequences advance together).
    max_ongoing_requests : int
        Serve's per-replica concurrency limit (running + waiting in the engine).
    readmit_counts_generated : bool
        Admission of a preempted sequence also counts the tokens it already generated (it re-feeds them),
        as ``zipvl_ray.engine.scheduler`` does since f57acc6. False models the engine before that fix,
        which predicted it like a new request; under KV pressure such a sequence was readmitted, did not
        fit and was preempted again (thrashing).
    prefill_failure_preempts : bool
        A prefill that did not fit while sequences ran preempted the newest running one and was retried,
        as ``LLMEngine._prefill_did_not_fit`` did before 2026-12-07. False (today's engine): the batch
        goes back to the front of the queue and preempts nothing, and its sequences are sized dense
        (an upper bound) until a prefill of them fits; a sequence prefilled before is sized by what
        that prefill kept (``LLMEngine._predict_seq_bytes``).
    """

    num_layers: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    dtype_bytes: int = 2
    block_size: int = 16
    kv_pool_gib: float = 40.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 16384
    decode_headroom_tokens: int = 64
    keep_fraction_ema: float = 0.2
    prefill_tokens_per_s: float = 16000.0
    prefill_overhead_s: float = 0.02
    decode_base_s: float = 0.012
    decode_per_seq_s: float = 0.00012
    hbm_bytes_per_s: float = 2.4e12
    decode_chunk: int = 8
    max_ongoing_requests: int = 64
    readmit_counts_generated: bool = True
    prefill_failure_preempts: bool = False

    @property
    def block_bytes(self) -> int:
        return self.block_size * 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def capacity_blocks(self) -> int:
        return int(self.kv_pool_gib * GIB) // self.block_bytes


@dataclass(frozen=True)
class ScalingModel:
    """Serve autoscaling and replica lifecycle.

    Attributes
    ----------
    min_replicas, max_replicas : int
    upscale_delay_s, downscale_delay_s : float
        How long a decision must persist before Serve acts (``autoscaling_config``).
    look_back_period_s, metrics_interval_s : float
        Metrics are sampled every interval and averaged over the look-back window.
    startup_s : float
        From the scale-up decision to a ready replica (GPU node warm; model load).
    drain_timeout_s : float
        ``graceful_shutdown_timeout_s``: requests still on a stopping replica after this fail. The configs
        set it to ``http_options.request_timeout_s`` (600 s).
    stats_period_s, stats_delay_s : float
        ``request_routing_stats_period_s`` and the extra delay before routers see a snapshot.
    """

    min_replicas: int = 2
    max_replicas: int = 16
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 10.0
    metrics_interval_s: float = 1.0
    startup_s: float = 30.0
    drain_timeout_s: float = 600.0
    stats_period_s: float = 1.0
    stats_delay_s: float = 0.3


@dataclass(frozen=True)
class TraceModel:
    """A bursty arrival process of mixed requests whose mix shifts between bursts.

    Quiet and burst phases alternate (a Markov-modulated Poisson process). Quiet phases draw kinds from
    the base mix; each burst is, with equal odds, video-heavy (a batch of clips submitted at once) or
    image-heavy, unless ``stationary_mix``.

    Attributes
    ----------
    duration_s : float
    low_rate, high_rate : float
        Requests per second in quiet and burst phases.
    ramp_s : float
        A burst's rate climbs linearly from ``low_rate`` to ``high_rate`` over this long (0: a step).
    mean_low_s, mean_high_s : float
        Mean phase lengths (exponential).
    base_mix, video_burst_mix, image_burst_mix : tuple of float
        Shares of (video, long video, multi-image); the rest are single images. Video: 16-64 pooled
        frames of 144 tokens; long video: 128-256 frames; multi-image: 2-4 images of 576 or 2,880 tokens;
        image: 576 or (3 in 4) 2,880 tokens (LLaVA-NeXT anyres). Plus 40-400 text tokens.
    max_tokens_median : float
        Median generation budget (log-normal, sigma 0.6, clipped to [32, 2048]); videos ask for 1.5x.
    stationary_mix : bool
        Every phase uses ``base_mix`` (a sensitivity check: the mix no longer shifts).
    """

    duration_s: float = 1800.0
    low_rate: float = 2.0
    high_rate: float = 7.0
    ramp_s: float = 60.0
    mean_low_s: float = 150.0
    mean_high_s: float = 75.0
    base_mix: tuple[float, float, float] = (0.25, 0.03, 0.15)
    video_burst_mix: tuple[float, float, float] = (0.6, 0.1, 0.1)
    image_burst_mix: tuple[float, float, float] = (0.05, 0.0, 0.15)
    max_tokens_median: float = 320.0
    stationary_mix: bool = False


def resample_layers(values: list[float], num_layers: int) -> list[float]:
    """Per-layer values measured on a model with ``len(values)`` layers, mapped onto ``num_layers`` layers
    by relative depth (linear interpolation: the first and last layers keep their own values)."""
    n = len(values)
    if n == num_layers or n == 0:
        return [float(v) for v in values]
    if n == 1 or num_layers == 1:
        return [float(values[0])] * num_layers
    out = []
    for i in range(num_layers):
        x = i * (n - 1) / (num_layers - 1)
        lo = min(int(x), n - 2)
        w = x - lo
        out.append(float(values[lo]) * (1 - w) + float(values[lo + 1]) * w)
    return out


class RetentionModel:
    """Per-request, per-layer kept fractions: the default parametric model or measured samples.

    Measured figures from a model with another number of layers (``tiny-llava`` has 4, the simulated
    replica 32) are mapped onto the replica's layers by relative depth (:func:`resample_layers`), so the
    simulated geometry (bytes per token, pool size) stays the GPU model's.

    Parameters
    ----------
    num_layers : int
        Layers of the simulated model (what :meth:`draw` returns).
    samples : dict[str, list[list[float]]] or None
        Measured per-layer kept fractions by request kind (``"image"``, ``"multi_image"``, ``"video"``,
        ``"long_video"``) or under ``"all"``; a request draws one sample of its kind at random.
    mean_profile : list[float] or None
        A measured mean kept fraction per layer (``EngineStats.kept_fraction_per_layer``): its shape
        replaces the default layer shape and its mean the default means.
    mean_kept : float or None
        One mean kept fraction for every request kind (e.g. 0.8 for a Qwen2.5-VL-like model).
    """

    DEFAULT_MEANS = {"image": 0.50, "multi_image": 0.46, "video": 0.42, "long_video": 0.40}
    CONCENTRATION = 20.0
    LAYER_NOISE = 0.10

    def __init__(
        self,
        num_layers: int,
        samples: dict[str, list[list[float]]] | None = None,
        mean_profile: list[float] | None = None,
        mean_kept: float | None = None,
    ):
        self.num_layers = num_layers
        self.samples = (
            {kind: [resample_layers(s, num_layers) for s in group] for kind, group in samples.items()}
            if samples is not None
            else None
        )
        if mean_profile:
            profile = resample_layers(mean_profile, num_layers)
            mean = sum(profile) / len(profile)
            self.shape = [f / mean for f in profile]
            self.means = dict.fromkeys(self.DEFAULT_MEANS, mean)
        else:
            shape = [1.6 if layer < 2 else 1.0 for layer in range(num_layers)]
            norm = sum(shape) / num_layers
            self.shape = [s / norm for s in shape]
            self.means = dict(self.DEFAULT_MEANS)
        if mean_kept is not None:
            self.means = dict.fromkeys(self.DEFAULT_MEANS, mean_kept)

    @classmethod
    def from_json(cls, path: str | Path, num_layers: int) -> RetentionModel:
        """Read ``--retention-json``: ``{"kept_fraction_per_layer": [...]}`` (a mean profile), or
        ``{"image": [[...], ...], "video": [[...], ...]}`` / ``{"samples": [[...], ...]}`` (per-request
        samples, e.g. ``RequestMetrics.kept_ratio_per_layer`` of engine runs, as ``--measure-retention``
        writes them; other keys such as ``"meta"`` are ignored). Every sample is mapped onto
        ``num_layers`` layers."""
        data = json.loads(Path(path).read_text())
        if "kept_fraction_per_layer" in data:
            profile = [float(f) for f in data["kept_fraction_per_layer"]]
            return cls(num_layers, mean_profile=profile)
        if "samples" in data:
            samples = {"all": data["samples"]}
        else:
            samples = {k: v for k, v in data.items() if isinstance(v, list) and v}
        lengths = {len(s) for group in samples.values() for s in group}
        if len(lengths) != 1:
            raise ValueError(f"every sample needs the same number of layers, got {sorted(lengths)}")
        return cls(num_layers, samples=samples)

    def mean_kept(self) -> dict[str, float]:
        """Mean kept fraction per request kind (over the samples, or the parametric means)."""
        if self.samples is None:
            return dict(self.means)
        return {
            kind: sum(sum(s) / len(s) for s in group) / len(group) for kind, group in self.samples.items()
        }

    def draw(self, kind: str, rng: random.Random) -> list[float]:
        if self.samples is not None:
            group = (
                self.samples.get(kind)
                or self.samples.get("video" if "video" in kind else "image")
                or self.samples.get("all")
                or next(iter(self.samples.values()))
            )
            return [min(1.0, max(0.0, float(f))) for f in rng.choice(group)]
        mean = self.means[kind]
        m = rng.betavariate(mean * self.CONCENTRATION, (1 - mean) * self.CONCENTRATION)
        return [min(1.0, max(0.02, m * s * rng.lognormvariate(0.0, self.LAYER_NOISE))) for s in self.shape]


@dataclass
class Request:
    """One request of the trace and what happened to it."""

    rid: int
    arrival: float
    kind: str
    prompt_tokens: int
    image_tokens: int
    max_tokens: int
    kept: list[float]
    routed: float | None = None
    replica: int | None = None
    ttft: float | None = None
    finish: float | None = None
    failed: str | None = None
    preemptions: int = 0

    @property
    def hints(self) -> RoutingHints:
        return RoutingHints(self.prompt_tokens, self.image_tokens, self.max_tokens)


def make_trace(trace: TraceModel, retention: RetentionModel, seed: int) -> list[Request]:
    """A seeded bursty trace (see :class:`TraceModel`).

    Retention draws use their own random stream, so every retention model sees the same arrivals,
    kinds and lengths for a given seed.
    """
    rng = random.Random(seed)
    kept_rng = random.Random(f"retention-{seed}")
    requests: list[Request] = []
    t, high, mix, phase_start = 0.0, False, trace.base_mix, 0.0
    phase_end = rng.expovariate(1 / trace.mean_low_s)
    while t < trace.duration_s:
        t += rng.expovariate(trace.high_rate if high else trace.low_rate)
        if t >= phase_end:
            t, high, phase_start = phase_end, not high, phase_end
            phase_end = t + rng.expovariate(1 / (trace.mean_high_s if high else trace.mean_low_s))
            mix = trace.base_mix
            if high and not trace.stationary_mix:
                mix = trace.video_burst_mix if rng.random() < 0.5 else trace.image_burst_mix
            continue
        if t >= trace.duration_s:
            break
        if high and trace.ramp_s > 0:  # thinning: keep an arrival with probability rate(t) / high_rate
            ramp = min(1.0, (t - phase_start) / trace.ramp_s)
            rate = trace.low_rate + (trace.high_rate - trace.low_rate) * ramp
            if rng.random() > rate / trace.high_rate:
                continue
        video, long_video, multi = mix
        u = rng.random()
        if u < video:
            kind, image = "video", rng.choice([16, 24, 32, 48, 64]) * 144
        elif u < video + long_video:
            kind, image = "long_video", rng.choice([128, 192, 256]) * 144
        elif u < video + long_video + multi:
            kind, image = "multi_image", sum(rng.choice([576, 2880]) for _ in range(rng.randint(2, 4)))
        else:
            kind, image = "image", rng.choice([576, 2880, 2880, 2880])
        text = int(rng.uniform(40, 400))
        median = trace.max_tokens_median * (1.5 if "video" in kind else 1.0)
        max_tokens = int(min(2048, max(32, rng.lognormvariate(math.log(median), 0.6))))
        kept = retention.draw(kind, kept_rng)
        requests.append(Request(len(requests), t, kind, image + text, image, max_tokens, kept))
    return requests


# ----------------------------------------------------------------------------------------- the engine


class Seq:
    """A request inside an engine: kept tokens per layer and blocks held as it generates."""

    __slots__ = (
        "req",
        "generated",
        "base_blocks",
        "tail",
        "blocks",
        "num_layers",
        "prefilled",
        "did_not_fit",
    )

    def __init__(self, req: Request, block_size: int):
        self.req = req
        self.generated = 0
        n = req.prompt_tokens
        kept = [max(1, min(n, math.ceil(n * f - 1e-9))) for f in req.kept]
        self.num_layers = len(kept)
        # blocks(g) = sum_l ceil((k_l + g) / bs) = base + L * (g // bs) + tail[g % bs]
        self.base_blocks = sum(k // block_size for k in kept)
        rems = [k % block_size for k in kept]
        self.tail = [sum(-(-(r + s) // block_size) for r in rems) for s in range(block_size)]
        self.blocks = 0
        self.prefilled = False  # a prefill of it fitted: readmissions are sized by what it kept
        self.did_not_fit = False  # a prefill of it ran out of blocks: sized dense until one fits

    def blocks_at(self, generated: int, block_size: int) -> int:
        q, s = divmod(generated, block_size)
        return self.base_blocks + self.num_layers * q + self.tail[s]

    @property
    def remaining(self) -> int:
        return self.req.max_tokens - self.generated


class Replica:
    """A model of one engine (``zipvl_ray.engine.scheduler``) plus its Serve lifecycle."""

    def __init__(self, rid: int, model: ReplicaModel, started_at: float, ready_at: float):
        self.rid = rid
        self.model = model
        self.started_at = started_at
        self.ready_at = ready_at
        self.stopped_at: float | None = None
        self.draining_since: float | None = None
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.used_blocks = 0
        self.kept_ema: list[float] = []
        self.busy = False
        self.pending: Callable[[float], None] | None = None
        self.num_preemptions = 0
        self.prefill_requeues = 0
        self.num_finished = 0
        self.prefill_cap: int | None = None
        self.prefilling: list[Seq] = []

    # Serve's view -------------------------------------------------------------------------------
    def ready(self, now: float) -> bool:
        return self.stopped_at is None and self.draining_since is None and now >= self.ready_at

    @property
    def ongoing(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.prefilling)

    # engine state --------------------------------------------------------------------------------
    def profile_fractions(self) -> list[float]:
        return self.kept_ema or [1.0] * self.model.num_layers

    def headroom(self, seq: Seq) -> int:
        return max(0, min(seq.remaining, self.model.decode_headroom_tokens))

    def reserved_blocks(self) -> int:
        bs = self.model.block_size
        return sum(s.blocks_at(s.generated + self.headroom(s), bs) - s.blocks for s in self.running)

    def committed_lifetime_blocks(self, fractions: list[float]) -> int:
        """``EngineStats.committed_lifetime_bytes`` in blocks, as ``LLMEngine.stats`` computes it: running
        (and prefilling) sequences at the end of their generation, waiting ones predicted with the
        replica's kept fractions and their remaining tokens."""
        bs = self.model.block_size
        blocks = sum(s.blocks_at(s.req.max_tokens, bs) for s in self.running)
        blocks += sum(s.blocks_at(s.req.max_tokens, bs) for s in self.prefilling)
        legacy = self.model.prefill_failure_preempts
        dense = [1.0] * self.model.num_layers
        for s in self.waiting:  # as ``LLMEngine._predict_seq_bytes`` sizes them
            if s.prefilled and not legacy:
                blocks += s.blocks_at(s.req.max_tokens, bs)
            else:
                f = dense if s.did_not_fit and not legacy else fractions
                blocks += predict_bytes(s.req.prompt_tokens, f, s.remaining, bs, 1)
        return blocks

    def engine_stats(self) -> EngineStats:
        m = self.model
        fractions = self.profile_fractions()
        return EngineStats(
            committed_lifetime_bytes=self.committed_lifetime_blocks(fractions) * m.block_bytes,
            waiting_prompt_tokens=sum(s.req.prompt_tokens for s in self.waiting),
            kv_bytes_used=self.used_blocks * m.block_bytes,
            kv_bytes_capacity=m.capacity_blocks * m.block_bytes,
            kv_blocks_used=self.used_blocks,
            kv_blocks_total=m.capacity_blocks,
            block_size=m.block_size,
            block_bytes=m.block_bytes,
            num_layers=m.num_layers,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            mean_kept_fraction=sum(fractions) / len(fractions),
            kept_fraction_per_layer=list(fractions),
            reserved_bytes=self.reserved_blocks() * m.block_bytes,
            num_preemptions=self.num_preemptions,
            num_finished=self.num_finished,
        )


# ----------------------------------------------------------------------------------------- routers


class Pow2Router:
    """Ray Serve's default: two random replicas under ``max_ongoing_requests``, the shorter queue wins."""

    name = "pow2"

    def __init__(self, rng: random.Random):
        self.rng = rng

    def choose(self, req: Request, replicas: list[Replica], now: float) -> Replica | None:
        open_replicas = [r for r in replicas if r.ongoing < r.model.max_ongoing_requests]
        if not open_replicas:
            return None
        pair = self.rng.sample(open_replicas, min(2, len(open_replicas)))
        return min(pair, key=lambda r: r.ongoing)

    def on_stats(self, replica: Replica, stats: dict) -> None:
        pass

    def on_complete(self, req: Request, replica: Replica) -> None:
        pass

    def on_replica_gone(self, replica: Replica) -> None:
        pass


class SimKVRouter:
    """``KVPackingRouter``'s glue around the project's ranking and hold table, without Ray's event loop."""

    def __init__(self, config: KVRouterConfig):
        self.config = config
        self.name = config.strategy
        self.holds = HoldTable()
        self.reports: dict[int, tuple[KVProfile | None, float | None]] = {}
        self.last_sweep = -math.inf
        self.counters = {
            "decisions": 0,
            "fits": 0,
            "overflow": 0,
            "moved": 0,
            "expired": 0,
            "demoted": 0,
            "held_back": 0,
        }

    def choose(self, req: Request, replicas: list[Replica], now: float) -> Replica | None:
        if now - self.last_sweep >= self.config.sweep_interval_s:
            self.last_sweep = now
            self.counters["expired"] += self.holds.expire(
                now, routed_ttl_s=self.config.hold_ttl_s, pending_ttl_s=self.config.pending_hold_ttl_s
            )
        profiles = [p for p, _ in (self.reports.get(r.rid, (None, None)) for r in replicas) if p is not None]
        fallback = conservative_profile(profiles)
        views = [
            build_view(
                r.rid, *self.reports.get(r.rid, (None, None)), self.holds, self.config, now, r.rid, fallback
            )
            for r in replicas
        ]
        ranking = rank_replicas(views, req.hints, self.config)
        rid = str(req.rid)
        if not ranking.order or (ranking.saturated and self.config.hold_when_saturated):
            self.holds.release(rid)
            self.counters["held_back"] += int(bool(ranking.order))
            return None
        self.holds.place(rid, ranking.order[0], ranking.predicted_bytes[ranking.order[0]], now)
        self.counters["decisions"] += 1
        self.counters["fits"] += int(ranking.fits)
        self.counters["overflow"] += int(not ranking.fits)
        self.counters["demoted"] += ranking.demoted
        by_id = {r.rid: r for r in replicas}
        for key in ranking.order:  # Serve tries the singleton ranks in order, skipping full replicas
            replica = by_id[key]
            if replica.ongoing < replica.model.max_ongoing_requests:
                _, moved = self.holds.confirm(rid, key, ranking.predicted_bytes[key], now)
                self.counters["moved"] += int(moved)
                return replica
        return None

    def on_stats(self, replica: Replica, stats: dict) -> None:
        self.reports[replica.rid] = profile_from_routing_stats(stats)

    def on_complete(self, req: Request, replica: Replica) -> None:
        self.holds.release(str(req.rid), replica.rid)

    def on_replica_gone(self, replica: Replica) -> None:
        self.holds.drop_replicas([replica.rid])
        self.reports.pop(replica.rid, None)


# ----------------------------------------------------------------------------------------- the simulation


@dataclass(frozen=True)
class Strategy:
    """A router + autoscaler pairing to simulate.

    Attributes
    ----------
    label : str
        Row name.
    router : {"pow2", "spread", "pack"}
    autoscaler : {"queue", "kv"}
        Ray's default queue-length policy at ``target_ongoing_requests``, or ``KVDemandPolicy`` at
        ``target_kv_utilization``.
    target : float
    demand : {"committed", "held"}
        ``KVDemandPolicyConfig.demand`` of the KV policy.
    spare : float
        ``KVDemandPolicyConfig.spare_replicas`` of the KV policy.
    forecast_s : float
        ``KVDemandPolicyConfig.forecast_s`` of the KV policy.
    max_ongoing : int or None
        ``max_ongoing_requests`` for this strategy's replicas (``/N`` in the label); None keeps the
        replica model's. Ray's second queueing knob: below the engine's own capacity, power-of-two keeps
        requests at the handle instead of in a replica's queue.
    """

    label: str
    router: str
    autoscaler: str
    target: float
    demand: str = "committed"
    spare: float = 0.0
    forecast_s: float = 0.0
    max_ongoing: int | None = None


@dataclass
class SimResult:
    """What one simulated run measured."""

    strategy: Strategy
    requests: list[Request]
    replicas: list[Replica]
    horizon: float
    timeline: list[tuple[float, int]] = field(default_factory=list)
    router_counters: dict[str, int] = field(default_factory=dict)
    kv_utilization_samples: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        done = [r for r in self.requests if r.ttft is not None and r.failed is None]
        ttfts = sorted(r.ttft - r.arrival for r in done)
        replica_seconds = sum(
            (rep.stopped_at if rep.stopped_at is not None else self.horizon) - rep.started_at
            for rep in self.replicas
        )
        failed = [r for r in self.requests if r.failed is not None]
        util = self.kv_utilization_samples
        return {
            "strategy": self.strategy.label,
            "router": self.strategy.router,
            "autoscaler": self.strategy.autoscaler,
            "demand": self.strategy.demand if self.strategy.autoscaler == "kv" else "",
            "target": self.strategy.target,
            "spare_replicas": self.strategy.spare,
            "forecast_s": self.strategy.forecast_s,
            "max_ongoing_requests": self.strategy.max_ongoing,
            "requests": len(self.requests),
            "completed": len(done),
            "failed": len(failed),
            "failed_kv_exhausted": sum(r.failed == "kv_exhausted" for r in failed),
            "failed_drain": sum(r.failed == "drain_timeout" for r in failed),
            "failed_timeout": sum(r.failed == "ttft_timeout" for r in failed),
            "failed_unfinished": sum(r.failed == "unfinished" for r in failed),
            "replica_seconds": replica_seconds,
            "mean_replicas": replica_seconds / self.horizon,
            "peak_replicas": max((n for _, n in self.timeline), default=0),
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p95_s": percentile(ttfts, 95),
            "ttft_p99_s": percentile(ttfts, 99),
            "preemptions": sum(r.num_preemptions for r in self.replicas),
            "prefill_requeues": sum(r.prefill_requeues for r in self.replicas),
            "mean_kv_utilization": sum(util) / len(util) if util else 0.0,
            "router_fits": self.router_counters.get("fits", 0),
            "router_overflow": self.router_counters.get("overflow", 0),
        }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class Simulation:
    """Replays ``requests`` against replicas under one :class:`Strategy`.

    Parameters
    ----------
    requests : list of Request
        The trace (copied: results are written onto the copies).
    strategy : Strategy
    model : ReplicaModel
    scaling : ScalingModel
    seed : int
        Seeds the power-of-two choices.
    ttft_timeout_s : float
        A request without its first token this long after arrival fails (the client gives up).
    max_tail_s : float
        The run stops this long after the last arrival; requests still open count as failed.
    router_config : dict
        Extra ``KVRouterConfig`` fields for the KV routers.
    """

    def __init__(
        self,
        requests: list[Request],
        strategy: Strategy,
        model: ReplicaModel,
        scaling: ScalingModel,
        *,
        seed: int = 0,
        ttft_timeout_s: float = 300.0,
        max_tail_s: float = 3600.0,
        router_config: dict | None = None,
        policy_config: dict | None = None,
    ):
        self.requests = [Request(**{**r.__dict__}) for r in requests]
        self.strategy = strategy
        if strategy.max_ongoing is not None:
            model = replace(model, max_ongoing_requests=strategy.max_ongoing)
        self.model = model
        self.scaling = scaling
        self.ttft_timeout_s = ttft_timeout_s
        self.max_tail_s = max_tail_s
        if strategy.router == "pow2":
            self.router: Pow2Router | SimKVRouter = Pow2Router(random.Random(seed))
        else:
            self.router = SimKVRouter(KVRouterConfig(strategy=strategy.router, **(router_config or {})))
        if strategy.autoscaler == "kv":
            self.policy = KVDemandPolicy(
                target_kv_utilization=strategy.target,
                demand=strategy.demand,
                spare_replicas=strategy.spare,
                forecast_s=strategy.forecast_s,
                **(policy_config or {}),
            )
            target_ongoing = 2.0
        else:
            self.policy = replica_queue_length_autoscaling_policy
            target_ongoing = strategy.target
        self.autoscaling_config = AutoscalingConfig(
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            target_ongoing_requests=target_ongoing,
            upscale_delay_s=scaling.upscale_delay_s,
            downscale_delay_s=scaling.downscale_delay_s,
            look_back_period_s=scaling.look_back_period_s,
            metrics_interval_s=scaling.metrics_interval_s,
        )
        self.events: list[tuple[float, int, Callable[[float], None]]] = []
        self.seq_counter = itertools.count()
        self.replicas: list[Replica] = []
        self.handle_queue: deque[Request] = deque()
        self.target = scaling.min_replicas
        self.want_since: tuple[int, float] | None = None
        self.metric_samples: deque[tuple[float, dict[int, dict[str, float]], float, float]] = deque()
        self.timeline: list[tuple[float, int]] = []
        self.kv_util: list[float] = []
        self.outstanding = len(self.requests)
        self.policy_state: dict[str, Any] = {}

    # event plumbing ----------------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(self.events, (t, next(self.seq_counter), fn))

    def run(self) -> SimResult:
        for _ in range(self.scaling.min_replicas):
            self.add_replica(0.0, ready_now=True)
        for req in self.requests:
            self.at(req.arrival, lambda t, req=req: self.arrive(req, t))
        self.at(0.0, self.stats_tick)
        self.at(0.0, self.autoscale_tick)
        end = self.requests[-1].arrival if self.requests else 0.0
        horizon = end
        give_up = end + self.max_tail_s
        # Run on after the last request until the fleet is back at its floor (as router_real measures), so
        # every strategy pays for scaling down after the trace, not only the ones that did it mid-run:
        # replicas above the floor are charged until they stop, the floor until the last request ends.
        while self.events:
            t, _, fn = heapq.heappop(self.events)
            if (self.outstanding == 0 and t > end and self.at_floor()) or t > give_up:
                break
            busy = self.outstanding > 0 or t <= end
            fn(t)
            if busy:
                horizon = t
        for req in self.requests:  # a livelock or a run past the tail: count, never hang
            if req.finish is None and req.failed is None:
                req.failed = "unfinished"
        self.timeline.append((horizon, self.allocated()))
        counters = getattr(self.router, "counters", {})
        return SimResult(
            self.strategy, self.requests, self.replicas, horizon, self.timeline, counters, self.kv_util
        )

    # requests ----------------------------------------------------------------------------------------
    def routable(self, now: float) -> list[Replica]:
        return [r for r in self.replicas if r.ready(now)]

    def arrive(self, req: Request, now: float) -> None:
        if not self.handle_queue and self.dispatch(req, now):
            return
        self.handle_queue.append(req)

    def dispatch(self, req: Request, now: float) -> bool:
        replica = self.router.choose(req, self.routable(now), now)
        if replica is None:
            return False
        req.routed, req.replica = now, replica.rid
        replica.waiting.append(Seq(req, self.model.block_size))
        self.kick(replica, now)
        return True

    def drain_handle_queue(self, now: float) -> None:
        while self.handle_queue:
            req = self.handle_queue[0]
            if now - req.arrival > self.ttft_timeout_s:
                self.handle_queue.popleft()
                self.fail(req, "ttft_timeout")
                continue
            if not self.dispatch(req, now):
                return
            self.handle_queue.popleft()

    def fail(self, req: Request, reason: str) -> None:
        req.failed = reason
        self.outstanding -= 1

    def finish(self, seq: Seq, replica: Replica, now: float) -> None:
        seq.req.finish = now
        replica.num_finished += 1
        self.outstanding -= 1
        self.router.on_complete(seq.req, replica)

    # the engine --------------------------------------------------------------------------------------
    def kick(self, replica: Replica, now: float) -> None:
        if not replica.busy and replica.stopped_at is None:
            replica.busy = True
            self.at(now, lambda t, r=replica: self.step(r, t))

    def step(self, replica: Replica, now: float) -> None:
        if replica.pending is not None:
            apply, replica.pending = replica.pending, None
            apply(now)
            self.drain_handle_queue(now)
        if replica.stopped_at is not None:
            replica.busy = False
            return
        batch = self.admit(replica, now)
        if batch:
            duration = (
                self.model.prefill_overhead_s
                + sum(s.req.prompt_tokens + s.generated for s in batch) / self.model.prefill_tokens_per_s
            )
            replica.prefilling = batch
            replica.pending = lambda t, b=batch, r=replica: self.end_prefill(r, b, t)
            self.at(now + duration, lambda t, r=replica: self.step(r, t))
            return
        if replica.running:
            duration = self.start_decode(replica, now)
            if duration is not None:
                self.at(now + duration, lambda t, r=replica: self.step(r, t))
                return
        replica.busy = False
        self.maybe_stop(replica, now)

    def admit(self, replica: Replica, now: float) -> list[Seq]:
        m = self.model
        committed = replica.used_blocks + replica.reserved_blocks()
        batch: list[Seq] = []
        tokens = 0
        fractions = replica.profile_fractions()
        cap, replica.prefill_cap = replica.prefill_cap or m.max_num_seqs, None
        while replica.waiting and len(replica.running) + len(batch) < min(
            m.max_num_seqs, len(replica.running) + cap
        ):
            seq = replica.waiting[0]
            if seq.req.ttft is None and now - seq.req.arrival > self.ttft_timeout_s:
                replica.waiting.popleft()
                self.fail(seq.req, "ttft_timeout")
                self.router.on_complete(seq.req, replica)
                continue
            n = seq.req.prompt_tokens
            if batch and tokens + n > m.max_num_batched_tokens:
                break
            # The engine predicts a readmitted (preempted) sequence with the tokens it already generated and
            # will re-feed; without ``readmit_counts_generated`` (the engine before f57acc6) like a new one.
            decode = replica.headroom(seq) + (seq.generated if m.readmit_counts_generated else 0)
            if seq.prefilled and not m.prefill_failure_preempts:
                need = seq.blocks_at(decode, m.block_size)  # what its prefill kept: exact
            else:
                dense = seq.did_not_fit and not m.prefill_failure_preempts
                need = (
                    predict_bytes(
                        n, [1.0] * m.num_layers if dense else fractions, decode, m.block_size, m.block_bytes
                    )
                    // m.block_bytes
                )
            if committed + need > m.capacity_blocks and (batch or replica.running):
                break
            replica.waiting.popleft()
            batch.append(seq)
            tokens += n
            committed += need
        return batch

    def end_prefill(self, replica: Replica, batch: list[Seq], now: float) -> None:
        """Allocate the prefilled batch; when it does not fit, do what ``LLMEngine._prefill_did_not_fit`` does."""
        m = self.model
        replica.prefilling = []
        needed = sum(seq.blocks_at(seq.generated, m.block_size) for seq in batch)
        if replica.used_blocks + needed > m.capacity_blocks:
            replica.prefill_requeues += 1
            for seq in batch:
                seq.did_not_fit = True
            if replica.running and m.prefill_failure_preempts:  # the engine before 2026-12-07
                self.preempt_newest(replica)
                replica.waiting.extendleft(reversed(batch))
            elif replica.running:  # back to the front, sized dense, to wait for memory
                replica.waiting.extendleft(reversed(batch))
            elif len(batch) > 1:  # alone next time
                replica.waiting.extendleft(reversed(batch))
                replica.prefill_cap = 1
            else:
                self.fail(batch[0].req, "kv_exhausted")
                self.router.on_complete(batch[0].req, replica)
            return
        w = m.keep_fraction_ema
        for seq in batch:
            if seq.req.ttft is None:
                seq.req.ttft = now
                seq.generated = 1
            seq.blocks = seq.blocks_at(seq.generated, m.block_size)
            seq.prefilled = True
            replica.used_blocks += seq.blocks
            replica.running.append(seq)
            if seq.req.preemptions == 0:  # a recomputation teaches nothing new (LLMEngine._record_prefill)
                replica.kept_ema = (
                    [(1 - w) * e + w * f for e, f in zip(replica.kept_ema, seq.req.kept, strict=True)]
                    if replica.kept_ema
                    else list(seq.req.kept)
                )
            if seq.remaining <= 0:
                self.complete(replica, seq, now)

    def preempt_newest(self, replica: Replica) -> None:
        victim = replica.running.pop()  # freed and recomputed later, first in line
        replica.used_blocks -= victim.blocks
        victim.blocks = 0
        victim.req.preemptions += 1
        replica.num_preemptions += 1
        replica.waiting.appendleft(victim)

    def start_decode(self, replica: Replica, now: float) -> float | None:
        m = self.model
        chunk = m.decode_chunk
        while replica.running:
            batch = replica.running[: m.max_num_seqs]
            need = sum(
                s.blocks_at(s.generated + min(chunk, s.remaining), m.block_size) - s.blocks for s in batch
            )
            if replica.used_blocks + need <= m.capacity_blocks:
                break
            if len(replica.running) == 1:
                seq = replica.running.pop()
                replica.used_blocks -= seq.blocks
                self.fail(seq.req, "kv_exhausted")
                self.router.on_complete(seq.req, replica)
                return None
            self.preempt_newest(replica)
        if not replica.running:
            return None
        batch = replica.running[: m.max_num_seqs]
        kv_bytes = replica.used_blocks * m.block_bytes
        per_token = m.decode_base_s + m.decode_per_seq_s * len(batch) + kv_bytes / m.hbm_bytes_per_s
        steps = min(chunk, max(s.remaining for s in batch))
        replica.pending = lambda t, b=batch, r=replica: self.end_decode(r, b, t)
        return steps * per_token

    def end_decode(self, replica: Replica, batch: list[Seq], now: float) -> None:
        bs = self.model.block_size
        for seq in batch:
            if seq not in replica.running:
                continue
            seq.generated += min(self.model.decode_chunk, seq.remaining)
            blocks = seq.blocks_at(seq.generated, bs)
            replica.used_blocks += blocks - seq.blocks
            seq.blocks = blocks
            if seq.remaining <= 0:
                self.complete(replica, seq, now)

    def complete(self, replica: Replica, seq: Seq, now: float) -> None:
        replica.running.remove(seq)
        replica.used_blocks -= seq.blocks
        seq.blocks = 0
        self.finish(seq, replica, now)

    # stats and autoscaling -----------------------------------------------------------------------------
    def stats_tick(self, now: float) -> None:
        for replica in self.replicas:
            if replica.ready(now):
                snapshot = routing_stats(replica.engine_stats(), now=now)
                self.at(now + self.scaling.stats_delay_s, lambda t, r=replica, s=snapshot: self.deliver(r, s))
        if self.outstanding:
            self.at(now + self.scaling.stats_period_s, self.stats_tick)

    def deliver(self, replica: Replica, snapshot: dict) -> None:
        if replica.stopped_at is None:
            self.router.on_stats(replica, snapshot)

    def allocated(self) -> int:
        return sum(1 for r in self.replicas if r.stopped_at is None and r.draining_since is None)

    def at_floor(self) -> bool:
        """Every replica above ``min_replicas`` stopped (drained), none starting."""
        return sum(1 for r in self.replicas if r.stopped_at is None) <= self.scaling.min_replicas

    def autoscale_tick(self, now: float) -> None:
        s = self.scaling
        ready = [r for r in self.replicas if r.ready(now)]
        per_replica = {r.rid: autoscaling_stats(r.engine_stats()) for r in ready}
        ongoing = sum(r.ongoing for r in ready) + len(self.handle_queue)
        self.metric_samples.append((now, per_replica, float(ongoing), float(len(self.handle_queue))))
        while self.metric_samples and self.metric_samples[0][0] < now - s.look_back_period_s:
            self.metric_samples.popleft()
        for r in ready:
            self.kv_util.append(per_replica[r.rid]["kv_utilization"])

        aggregated: dict[str, dict[int, float]] = {}
        counts: dict[int, int] = {}
        for _, sample, _, _ in self.metric_samples:
            for rid, values in sample.items():
                if rid not in per_replica:
                    continue
                counts[rid] = counts.get(rid, 0) + 1
                for name, value in values.items():
                    aggregated.setdefault(name, {})[rid] = aggregated.get(name, {}).get(rid, 0.0) + value
        for by_replica in aggregated.values():
            for rid in by_replica:
                by_replica[rid] /= counts[rid]
        n = len(self.metric_samples)
        ctx = AutoscalingContext(
            deployment_id=None,
            deployment_name="llm",
            app_name="sim",
            current_num_replicas=len(ready),
            target_num_replicas=self.target,
            running_replicas=[r.rid for r in ready],
            total_num_requests=sum(x[2] for x in self.metric_samples) / n,
            total_queued_requests=sum(x[3] for x in self.metric_samples) / n,
            aggregated_metrics=aggregated,
            raw_metrics=None,
            capacity_adjusted_min_replicas=s.min_replicas,
            capacity_adjusted_max_replicas=s.max_replicas,
            policy_state=self.policy_state,
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=now,
            config=self.autoscaling_config,
        )
        desired, self.policy_state = self.policy(ctx)
        desired = min(s.max_replicas, max(s.min_replicas, math.ceil(desired)))
        self.apply_delays(desired, now)
        self.reconcile(now)
        self.timeline.append((now, self.allocated()))
        if self.outstanding or not self.at_floor():
            self.at(now + s.metrics_interval_s, self.autoscale_tick)

    def apply_delays(self, desired: int, now: float) -> None:
        """Serve's ``_apply_delay_logic``: act once the same direction has been wanted for the delay."""
        if desired == self.target:
            self.want_since = None
            return
        direction = 1 if desired > self.target else -1
        if self.want_since is None or self.want_since[0] != direction:
            self.want_since = (direction, now)
        delay = self.scaling.upscale_delay_s if direction > 0 else self.scaling.downscale_delay_s
        if now - self.want_since[1] + 1e-6 >= delay:
            self.target = desired
            self.want_since = None

    def add_replica(self, now: float, *, ready_now: bool = False) -> None:
        ready_at = now if ready_now else now + self.scaling.startup_s
        replica = Replica(len(self.replicas), self.model, now, ready_at)
        self.replicas.append(replica)
        if not ready_now:
            self.at(ready_at, self.drain_handle_queue)

    def reconcile(self, now: float) -> None:
        live = [r for r in self.replicas if r.stopped_at is None and r.draining_since is None]
        for _ in range(self.target - len(live)):
            self.add_replica(now)
        excess = len(live) - self.target
        if excess <= 0:
            return
        # Serve stops replicas that are not running yet first, then the newest running ones.
        order = sorted(live, key=lambda r: (r.ready_at <= now, -r.started_at, -r.rid))
        for replica in order[:excess]:
            replica.draining_since = now
            self.router.on_replica_gone(replica)
            self.maybe_stop(replica, now)
            if replica.stopped_at is None:
                self.at(now + self.scaling.drain_timeout_s, lambda t, r=replica: self.kill(r, t))

    def maybe_stop(self, replica: Replica, now: float) -> None:
        if replica.draining_since is not None and replica.stopped_at is None and replica.ongoing == 0:
            replica.stopped_at = now

    def kill(self, replica: Replica, now: float) -> None:
        if replica.stopped_at is not None:
            return
        for seq in list(replica.running) + list(replica.waiting) + list(replica.prefilling):
            self.fail(seq.req, "drain_timeout")
        replica.running.clear()
        replica.waiting.clear()
        replica.prefilling = []
        replica.used_blocks = 0
        replica.pending = None
        replica.stopped_at = now


# ----------------------------------------------------------------------------------------- the study


STRATEGY_LABEL = re.compile(
    r"^(pow2|spread|pack)\+(queue|kv|kvheld)\(([0-9.]+)(?:\+([0-9.]+))?(?:@([0-9.]+))?\)(?:/([0-9]+))?$"
)


def parse_strategy(label: str) -> Strategy:
    """``"pack+kv(0.75)"`` -> :class:`Strategy`: router ``pow2`` | ``spread`` | ``pack``, autoscaler
    ``queue(T)`` (Ray's default at ``target_ongoing_requests`` T), ``kv(U)`` (``KVDemandPolicy`` on
    committed demand at ``target_kv_utilization`` U) or ``kvheld(U)`` (the same on held demand);
    ``kvheld(U+S@F)`` adds ``spare_replicas`` S and ``forecast_s`` F (either may be left out); a ``/N``
    suffix sets that strategy's ``max_ongoing_requests`` (``pow2+queue(10)/24``)."""
    match = STRATEGY_LABEL.match(label)
    if match is None:
        raise ValueError(
            f"strategy {label!r} is not ROUTER+POLICY(TARGET[+SPARE][@FORECAST])[/MAX_ONGOING], e.g. "
            "pack+kvheld(0.9+1@20) or pow2+queue(8)"
        )
    router, policy, target, spare, forecast, max_ongoing = match.groups()
    if max_ongoing is not None and int(max_ongoing) < 1:
        raise ValueError(f"{label}: max_ongoing_requests must be at least 1")
    if router != "pow2" and policy == "queue":
        raise ValueError(f"{label}: the KV routers are simulated with a KV policy only")
    if policy == "queue" and (spare is not None or forecast is not None):
        raise ValueError(f"{label}: spare replicas and forecasts belong to the KV policy")
    demand = "held" if policy == "kvheld" else "committed"
    return Strategy(
        label,
        router,
        "queue" if policy == "queue" else "kv",
        float(target),
        demand,
        float(spare or 0.0),
        float(forecast or 0.0),
        int(max_ongoing) if max_ongoing is not None else None,
    )


SMOKE_STRATEGIES = ("pow2+queue(12)", "spread+kv(0.6)", "pack+kvheld(0.9+1@20)")
FULL_STRATEGIES = (
    *(f"pow2+queue({t})" for t in (4, 5, 6, 7, 8, 10, 12, 16)),
    "pow2+kv(0.6)",
    "spread+kv(0.6)",
    "pack+kvheld(0.5)",
    "pack+kvheld(0.7+1)",
    "pack+kvheld(0.9+1@20)",
    "pack+kvheld(0.8+2@20)",
    "pack+kv(0.75)",
)
"""The full matrix: Ray's default pair swept until its p95 brackets packing's, the KV policy under each
router, and on held demand: the library default (0.5, no spare, no forecast), one spare at 0.7, the
default of ``configs/zipvl-gpu.yaml`` (0.9, one spare, 20 s forecast) and a latency-first setting (0.8,
two spares, 20 s forecast); committed demand at 0.75."""


def strategies(smoke: bool, labels: list[str] | None = None) -> list[Strategy]:
    """The matrix: power-of-two under Ray's queue policy (target sweep), the KV policy under each router
    (``labels`` replaces it)."""
    return [parse_strategy(label) for label in (labels or (SMOKE_STRATEGIES if smoke else FULL_STRATEGIES))]


WORKLOADS = {"kept~0.45": None, "kept~0.8": 0.8}
"""Default retention (LLaVA-NeXT-7B / LongVA figures of the paper) and every request keeping ~80%
(Qwen2.5-VL-7B, the outside re-run quoted in the spec): the same matrix runs on both."""

HEADLINE = "pack+kvheld(0.9+1@20)"
"""The headline row: the KV router's default strategy with ``configs/zipvl-gpu.yaml``'s policy (held demand
at 0.9, one spare replica, demand forecast 20 s ahead)."""


SUMMED_KEYS = {
    "requests",
    "completed",
    "failed",
    "preemptions",
    "prefill_requeues",
    "router_fits",
    "router_overflow",
}


def mean_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per strategy over seeds: counts summed (``SUMMED_KEYS``, ``failed_*``), the rest averaged."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, bool) or not isinstance(value, int | float) or key == "target":
            continue
        values = [r[key] for r in rows]
        out[key] = (
            sum(values) if key in SUMMED_KEYS or key.startswith("failed_") else sum(values) / len(values)
        )
    out["seeds"] = len(rows)
    return out


def iso_p95_cost(frontier: list[dict[str, Any]], p95: float) -> float | None:
    """Replica-seconds the ``frontier`` rows need for a p95 TTFT of ``p95``, interpolated linearly
    between the two rows that bracket it; ``None`` outside their range."""
    points = sorted((r["ttft_p95_s"], r["replica_seconds"]) for r in frontier)
    for (p_lo, c_lo), (p_hi, c_hi) in itertools.pairwise(points):
        if p_lo <= p95 <= p_hi:
            return c_lo if p_hi == p_lo else c_lo + (c_hi - c_lo) * (p95 - p_lo) / (p_hi - p_lo)
    return None


def efficient_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both p95 TTFT and replica-seconds (the cost-vs-p95 frontier).

    A dominated setting is one nobody would run: as a baseline it would flatter packing (a row that is
    dearer *and* slower than another one, just above packing's p95, would be taken as power-of-two's
    cost there). With several knobs swept (``target_ongoing_requests`` and ``max_ongoing_requests``)
    most rows are dominated.
    """
    return [
        r
        for r in rows
        if not any(
            o is not r
            and o["ttft_p95_s"] <= r["ttft_p95_s"]
            and o["replica_seconds"] <= r["replica_seconds"]
            and (o["ttft_p95_s"] < r["ttft_p95_s"] or o["replica_seconds"] < r["replica_seconds"])
            for o in rows
        )
    ]


def conservative_saving(pack: dict[str, Any], pow2: list[dict[str, Any]]) -> tuple[str, float]:
    """Saving of ``pack`` against the pow2 row with the best p95 that is still no better than packing's.

    Packing is then at equal or better p95, and that row is the most expensive such (so the saving is a
    lower bound). ``("", nan)`` when every pow2 row has a better p95 (no claim possible).
    """
    worse_or_equal = [r for r in pow2 if r["ttft_p95_s"] >= pack["ttft_p95_s"]]
    if not worse_or_equal:
        return "", float("nan")
    baseline = min(worse_or_equal, key=lambda r: r["ttft_p95_s"])
    return baseline["strategy"], 1 - pack["replica_seconds"] / baseline["replica_seconds"]


def summarize(rows: list[dict[str, Any]], headline: str = HEADLINE) -> dict[str, Any]:
    """Packing against power-of-two + queue policy at equal p95 TTFT.

    Per pack row: the *conservative* saving (:func:`conservative_saving`) and the *interpolated* one
    (pow2's cost at exactly packing's p95 on the line through its rows; NaN outside their range). The
    target (>= 25% fewer replica-seconds at equal or better p95, no failed request) is judged on the
    ``headline`` row's conservative saving; ``best_pack`` names the pack row with the largest one.
    Power-of-two rows that failed requests (engine thrashing, see ``ReplicaModel``) are no baseline, nor
    are rows another power-of-two row beats on both cost and p95 (:func:`efficient_rows`).
    """
    # A baseline that failed requests is not at equal quality: only clean power-of-two rows are compared.
    pow2 = efficient_rows(
        [r for r in rows if r["router"] == "pow2" and r["autoscaler"] == "queue" and r["failed"] == 0]
    )
    packs = [r for r in rows if r["router"] == "pack" and r["autoscaler"] == "kv"]
    summary: dict[str, Any] = {"headline": headline}
    best = ("", float("-inf"))
    for row in packs:
        baseline, saving = conservative_saving(row, pow2)
        iso = iso_p95_cost(pow2, row["ttft_p95_s"])
        summary[f"{row['strategy']}: saving_conservative"] = saving
        summary[f"{row['strategy']}: vs"] = baseline or (
            "none (every pow2 row has a better p95)" if pow2 else "none (every pow2 row failed requests)"
        )
        summary[f"{row['strategy']}: saving_interpolated"] = (
            1 - row["replica_seconds"] / iso if iso else float("nan")
        )
        if saving == saving and saving > best[1] and row["failed"] == 0:
            best = (row["strategy"], saving)
    head = next((r for r in rows if r["strategy"] == headline), packs[0] if packs else rows[0])
    headline = head["strategy"]
    summary["headline"] = headline
    head_saving = summary.get(f"{headline}: saving_conservative", float("nan"))
    summary["headline_ttft_p95_s"] = head["ttft_p95_s"]
    summary["headline_ttft_p99_s"] = head["ttft_p99_s"]
    summary["headline_failures"] = head["failed"]
    summary["headline_preemptions"] = head["preemptions"]
    summary["target_met"] = bool(head_saving == head_saving and head_saving >= 0.25 and head["failed"] == 0)
    summary["best_pack"] = f"{best[0]} ({best[1]:.1%})" if best[0] else "none"
    return summary


def plot(results: dict[str, SimResult], rows: list[dict[str, Any]], path: Path) -> None:
    """Left: replicas over time (the first seed); right: cost against p95 TTFT, one line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for label, result in results.items():
        if not result.timeline:
            continue
        ts, ns = zip(*result.timeline, strict=True)
        ax1.step(ts, ns, where="post", label=label, linewidth=1.0)
    ax1.set_xlabel("time (s)")
    ax1.set_ylabel("replicas allocated")
    ax1.set_title(f"Replicas over the trace ({rows[0]['workload']}, first seed)")
    ax1.legend(fontsize=7)
    families: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        policy = "kvheld" if row.get("demand") == "held" else row["autoscaler"]
        families.setdefault(f"{row['workload']} {row['router']}+{policy}", []).append(row)
    markers = {"pow2": "o", "spread": "s", "pack": "^"}
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    for family, members in families.items():
        members = sorted(members, key=lambda r: r["replica_seconds"])
        xs = [r["replica_seconds"] / 3600 for r in members]
        ys = [r["ttft_p95_s"] for r in members]
        style = "-" if members[0]["workload"] == workloads[0] else "--"
        ax2.plot(xs, ys, style, marker=markers[members[0]["router"]], label=family)
        for r, x, y in zip(members, xs, ys, strict=True):
            ax2.annotate(f"{r['target']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("replica-hours (mean over seeds)")
    ax2.set_ylabel("p95 TTFT (s)")
    ax2.set_title("Cost vs tail latency (lower-left is better; labels: target)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_matrix(
    trace: TraceModel,
    retention: RetentionModel,
    model: ReplicaModel,
    scaling: ScalingModel,
    matrix: list[Strategy],
    seeds: int,
    workload: str,
    first: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, SimResult]]:
    """Every strategy on the same traces (seeds ``first`` .. ``first + seeds - 1``); one averaged row each,
    and the first seed's runs."""
    per_strategy: dict[str, list[dict[str, Any]]] = {}
    first_seed: dict[str, SimResult] = {}
    for seed in range(first, first + seeds):
        requests = make_trace(trace, retention, seed)
        for strategy in matrix:
            result = Simulation(requests, strategy, model, scaling, seed=seed).run()
            per_strategy.setdefault(strategy.label, []).append({"workload": workload, **result.row()})
            if seed == first:
                first_seed[strategy.label] = result
    return [mean_rows(v) for v in per_strategy.values()], first_seed


COLUMNS = [
    "workload",
    "strategy",
    "replica_seconds",
    "mean_replicas",
    "peak_replicas",
    "ttft_p50_s",
    "ttft_p95_s",
    "ttft_p99_s",
    "completed",
    "failed",
    "preemptions",
    "prefill_requeues",
    "mean_kv_utilization",
    "router_fits",
    "router_overflow",
]


RETENTION_KINDS = {
    # kind -> (pictures per request: a video's frames are pictures of one moving scene, as zipvl-tiny sends them)
    "image": (1, 1),
    "multi_image": (2, 4),
    "video": (8, 16),
    "long_video": (24, 32),
}


def synthetic_pictures(count: int, rng: random.Random, *, video: bool, side: int = 112) -> list[Any]:
    """``count`` pictures of coloured shapes on a plain background: separate scenes, or for a video one
    scene whose shapes move a few pixels per frame."""
    from PIL import Image, ImageDraw

    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]

    def scene() -> tuple[str, list[tuple[str, str, int, int, int, int]], tuple[int, int]]:
        shapes = []
        for _ in range(rng.randint(1, 4)):
            w, h = rng.randint(10, 40), rng.randint(10, 40)
            kind = rng.choice(["ellipse", "rectangle"])
            shapes.append(
                (rng.choice(colours), kind, w, h, rng.randint(0, side - w), rng.randint(0, side - h))
            )
        return rng.choice(["grey", "white", "black"]), shapes, (rng.randint(-3, 3), rng.randint(-3, 3))

    pictures = []
    background, shapes, (dx, dy) = scene()
    for frame in range(count):
        if not video and frame:
            background, shapes, (dx, dy) = scene()
        shift = frame if video else 0
        image = Image.new("RGB", (side, side), background)
        draw = ImageDraw.Draw(image)
        for colour, kind, w, h, x, y in shapes:
            x, y = (x + shift * dx) % (side - w), (y + shift * dy) % (side - h)
            getattr(draw, kind)([x, y, x + w, y + h], fill=colour)
        pictures.append(image)
    return pictures


#: kind -> (split of :mod:`zipvl_ray.data`, frames per request) for ``--retention-data splits``: the
#: built-in model's own questions about its own kind of pictures and videos (validation partition).
RETENTION_SPLITS = {
    "image": ("short", (1, 1)),
    "multi_image": ("medium", (2, 4)),
    "video": ("medium", (8, 15)),
    "long_video": ("long", (16, 64)),
}


def retention_prompts(data: str, samples: int, seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    """``samples`` engine prompts per kind of :data:`RETENTION_KINDS`, and each prompt's kind.

    ``data="synthetic"``: pictures of shapes (:func:`synthetic_pictures`) with a generic question (any
    model). ``data="splits"``: validation samples of :mod:`zipvl_ray.data` with their own question
    (:data:`RETENTION_SPLITS`), the inputs ``zipvl-tiny`` was trained for.
    """
    rng = random.Random(seed)
    prompts, kinds = [], []
    if data == "splits":
        from zipvl_ray.data import make_sample

        for kind, (split, (low, high)) in RETENTION_SPLITS.items():
            for index in range(samples):
                sample = make_sample(split, "val", index, seed=seed, num_frames=rng.randint(low, high))
                prompts.append({"messages": sample.messages(), "images": sample.images()})
                kinds.append(kind)
        return prompts, kinds
    if data != "synthetic":
        raise ValueError(f"unknown retention data {data!r}; use 'synthetic' or 'splits'")
    questions = ["What is in the picture?", "Describe the scene in detail.", "Which colours do you see?"]
    for kind, (low, high) in RETENTION_KINDS.items():
        for _ in range(samples):
            pictures = synthetic_pictures(rng.randint(low, high), rng, video="video" in kind)
            content = [{"type": "image"}] * len(pictures) + [{"type": "text", "text": rng.choice(questions)}]
            prompts.append({"messages": [{"role": "user", "content": content}], "images": pictures})
            kinds.append(kind)
    return prompts, kinds


def measure_retention(
    model: str,
    tau: float,
    samples: int,
    out: Path,
    seed: int = 0,
    *,
    max_keep_ratio: float | None = None,
    data: str = "synthetic",
) -> dict[str, Any]:
    """Per-request kept fractions per layer of ``model`` at ``tau``, measured with the paged engine.

    ``samples`` requests of each kind of :data:`RETENTION_KINDS` (see :func:`retention_prompts`; one
    generated token: only the prefill's selection matters) go through ``zipvl_ray.engine.LLM``;
    each request's ``RequestMetrics.kept_ratio_per_layer`` is one sample. ``max_keep_ratio`` caps every
    layer's kept fraction, as a served ``zipvl.max_keep_ratio`` does. Writes ``out`` in the format
    :meth:`RetentionModel.from_json` reads (plus ``"meta"``) and returns it.
    """
    import torch

    from zipvl_ray.config import EngineConfig, ZipVLConfig
    from zipvl_ray.engine import LLM, SamplingParams

    torch.manual_seed(seed)
    zipvl = (
        ZipVLConfig(tau=tau)
        if max_keep_ratio is None
        else ZipVLConfig(tau=tau, max_keep_ratio=max_keep_ratio)
    )
    llm = LLM(model, zipvl=zipvl, engine=EngineConfig(kv_cache_bytes=64 << 20))
    prompts, kinds = retention_prompts(data, samples, seed)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0))
    result: dict[str, Any] = {kind: [] for kind in RETENTION_KINDS}
    prompt_tokens: dict[str, list[int]] = {kind: [] for kind in RETENTION_KINDS}
    for kind, output in zip(kinds, outputs, strict=True):
        result[kind].append([round(float(f), 4) for f in output.metrics.kept_ratio_per_layer])
        prompt_tokens[kind].append(output.metrics.prompt_tokens)
    result["meta"] = {
        "model": model,
        "tau": tau,
        "samples_per_kind": samples,
        "prompt_tokens": {k: [min(v), max(v)] for k, v in prompt_tokens.items()},
        "mean_kept": {
            kind: sum(sum(s) / len(s) for s in result[kind]) / len(result[kind]) for kind in RETENTION_KINDS
        },
        "max_keep_ratio": max_keep_ratio,
        "data": data,
        "command": f"benchmarks/router_sim.py --measure-retention {out} --model {model} --tau {tau} "
        f"--samples {samples} --retention-data {data}"
        + ("" if max_keep_ratio is None else f" --max-keep-ratio {max_keep_ratio}"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["meta"], indent=1))
    return result


def results_notes(seeds: int, duration: float) -> str:
    return (
        "Discrete-event simulation of GPU replicas running the paged ZipVL engine, replaying a bursty trace "
        f"of mixed image / video requests ({seeds} seed(s) per workload, {duration:.0f} s each; counts are "
        "summed over seeds, other figures averaged). pow2 = Ray Serve's default router; queue(T) = Ray's "
        "default queue-length autoscaling policy at target_ongoing_requests T; spread / pack = "
        "KVPackingRouter's ranking; kv(U) = KVDemandPolicy at target_kv_utilization U on committed "
        "(end-of-generation) demand, kvheld(U) on held demand. Workloads: requests keep ~45% of their tokens "
        "(the paper's LLaVA-NeXT-7B / LongVA figures), ~80% (Qwen2.5-VL-like), or measured:NAME (per-request "
        "kept fractions measured with the engine, mapped onto the 32 simulated layers by depth). "
        "Savings compare packing with power-of-two rows that failed nothing at equal p95 TTFT (see the "
        "summary keys). Model and defaults: benchmarks/router_sim.py and docs/routing.md."
    )


def resummarize(json_path: Path, out_dir: Path, name: str) -> dict[str, Any]:
    """Recompute the summary of a finished run from its rows (no simulation; the plot is left as it is)."""
    payload = json.loads(Path(json_path).read_text())
    rows, old = payload["rows"], payload["summary"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    summary = {k: v for k, v in old.items() if not any(k.startswith(f"{w}: ") for w in workloads)}
    for workload in workloads:
        summary.update({f"{workload}: mean_kept": old.get(f"{workload}: mean_kept")})
        per_workload = summarize([r for r in rows if r["workload"] == workload], HEADLINE)
        summary.update({f"{workload}: {k}": v for k, v in per_workload.items()})
    write_results(
        name,
        rows,
        columns=COLUMNS,
        summary=summary,
        title="Router simulation: KV packing vs power-of-two choices",
        notes=results_notes(int(summary.get("seeds", 0)), float(summary.get("trace_duration_s", 0)))
        + f" Summary recomputed from the rows of the run of {payload['meta'].get('timestamp')} "
        f"(commit {payload['meta'].get('commit')}).",
        out_dir=out_dir,
    )
    print(json.dumps(summary, indent=1, default=str))
    return {"rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a 90 s trace, three strategies, one seed")
    parser.add_argument("--seeds", type=int, default=3, help="traces to average over")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seed of the first trace (fresh traces: 100)"
    )
    parser.add_argument("--duration-s", type=float, default=None, help="trace length (default 1800)")
    parser.add_argument(
        "--retention-json",
        type=Path,
        action="append",
        default=None,
        help="measured kept fractions: one more workload per file (repeatable; see RetentionModel.from_json)",
    )
    parser.add_argument(
        "--measured-only",
        action="store_true",
        help="with --retention-json: drop the two parametric workloads",
    )
    parser.add_argument(
        "--strategy",
        action="append",
        default=None,
        help="ROUTER+POLICY(TARGET), e.g. pack+kv(0.75), pack+kvheld(0.5), pow2+queue(8) (repeatable; "
        "replaces the matrix)",
    )
    parser.add_argument("--drain-timeout-s", type=float, default=None, help="graceful_shutdown_timeout_s")
    parser.add_argument(
        "--readmit-as-new",
        action="store_true",
        help="model the engine before f57acc6, whose admission of a preempted sequence ignored the tokens "
        "it had generated (thrashing under KV pressure)",
    )
    parser.add_argument(
        "--prefill-failure-preempts",
        action="store_true",
        help="model the engine before 2026-12-07, whose prefill that did not fit preempted the newest running "
        "sequence (and was sized by the running mean again)",
    )
    parser.add_argument(
        "--measure-retention",
        type=Path,
        default=None,
        help="instead of simulating: run the engine on --model and write per-request kept fractions here",
    )
    parser.add_argument(
        "--resummarize",
        type=Path,
        default=None,
        help="recompute the summary of this results JSON (no simulation)",
    )
    parser.add_argument("--model", default="tiny-llava", help="model of --measure-retention")
    parser.add_argument("--tau", type=float, default=0.975, help="ZipVL tau of --measure-retention")
    parser.add_argument("--samples", type=int, default=12, help="requests per kind of --measure-retention")
    parser.add_argument(
        "--max-keep-ratio", type=float, default=None, help="zipvl.max_keep_ratio of --measure-retention"
    )
    parser.add_argument(
        "--retention-data",
        choices=("synthetic", "splits"),
        default="synthetic",
        help="inputs of --measure-retention: shapes with a generic question (any model), or the built-in "
        "model's validation samples (zipvl_ray.data)",
    )
    parser.add_argument("--kv-pool-gib", type=float, default=None, help="KV pool per replica")
    parser.add_argument("--startup-s", type=float, default=None, help="scale-up decision to ready replica")
    parser.add_argument(
        "--upscale-delay-s",
        type=float,
        default=None,
        help="autoscaling_config.upscale_delay_s (with --startup-s 0: scaling without lag)",
    )
    parser.add_argument("--stationary-mix", action="store_true", help="bursts keep the base request mix")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="router_sim")
    args = parser.parse_args(argv)
    if args.measure_retention is not None:
        return measure_retention(
            args.model,
            args.tau,
            args.samples,
            args.measure_retention,
            max_keep_ratio=args.max_keep_ratio,
            data=args.retention_data,
        )
    if args.resummarize is not None:
        return resummarize(args.resummarize, args.out_dir, args.name)

    model = ReplicaModel(
        readmit_counts_generated=not args.readmit_as_new,
        prefill_failure_preempts=args.prefill_failure_preempts,
    )
    if args.kv_pool_gib is not None:
        model = ReplicaModel(**{**model.__dict__, "kv_pool_gib": args.kv_pool_gib})
    scaling = ScalingModel()
    if args.startup_s is not None:
        scaling = replace(scaling, startup_s=args.startup_s)
    if args.upscale_delay_s is not None:
        scaling = replace(scaling, upscale_delay_s=args.upscale_delay_s)
    duration = args.duration_s or (90.0 if args.smoke else 1800.0)
    trace = TraceModel(duration_s=duration, stationary_mix=args.stationary_mix)
    if args.smoke:
        trace = TraceModel(duration_s=duration, mean_low_s=30.0, mean_high_s=30.0, ramp_s=10.0)
        scaling = ScalingModel(startup_s=10.0, upscale_delay_s=3.0, downscale_delay_s=15.0)
    if args.drain_timeout_s is not None:
        scaling = ScalingModel(**{**scaling.__dict__, "drain_timeout_s": args.drain_timeout_s})
    if args.smoke:
        workloads = {"kept~0.45": RetentionModel(model.num_layers)}
    else:
        workloads = {name: RetentionModel(model.num_layers, mean_kept=m) for name, m in WORKLOADS.items()}
    if args.retention_json:
        measured = {
            f"measured:{path.stem}": RetentionModel.from_json(path, model.num_layers)
            for path in args.retention_json
        }
        workloads = measured if args.measured_only else {**workloads, **measured}
    seeds = 1 if args.smoke else args.seeds
    matrix = strategies(args.smoke, args.strategy)

    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    first_seed: dict[str, SimResult] = {}
    for workload, retention in workloads.items():
        workload_rows, runs = run_matrix(
            trace, retention, model, scaling, matrix, seeds, workload, args.first_seed
        )
        rows += workload_rows
        first_seed = first_seed or runs
        for key, value in summarize(workload_rows, HEADLINE).items():
            summary[f"{workload}: {key}"] = value
    summary.update(
        seeds=seeds,
        first_seed=args.first_seed,
        trace_duration_s=duration,
        requests_per_seed=rows[0]["requests"] / seeds,
        kv_pool_gib=model.kv_pool_gib,
        startup_s=scaling.startup_s,
        upscale_delay_s=scaling.upscale_delay_s,
        stationary_mix=trace.stationary_mix,
        drain_timeout_s=scaling.drain_timeout_s,
        **{f"{name}: mean_kept": retention.mean_kept() for name, retention in workloads.items()},
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_results(
        args.name,
        rows,
        columns=COLUMNS,
        summary=summary,
        title="Router simulation: KV packing vs power-of-two choices",
        notes=results_notes(seeds, duration),
        out_dir=args.out_dir,
    )
    plot(first_seed, rows, args.out_dir / f"{args.name}.png")
    for row in rows:
        print(
            f"{row['workload']:>9} {row['strategy']:>15}: replica-h {row['replica_seconds'] / 3600:6.2f}  "
            f"p50 {row['ttft_p50_s']:5.2f}s  p95 {row['ttft_p95_s']:6.2f}s  p99 {row['ttft_p99_s']:6.2f}s  "
            f"failed {row['failed']:3d}  preempt {row['preemptions']:4d}"
        )
    print(json.dumps(summary, indent=1, default=str))
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
