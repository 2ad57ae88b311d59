"""Predict the KV bytes a request will hold on a replica *after* ZipVL pruning.

Ray-free on purpose: the engine's admission control and the Serve router use the same functions.

A replica reports a :class:`KVProfile` (its pool geometry, what is used, and the running mean kept
fraction per layer it observed); the ingress attaches :class:`RoutingHints` (token counts, max_tokens,
per-request ZipVL overrides) to every request. The prediction rounds every layer up to whole blocks,
exactly as the paged pool allocates them::

    bytes = sum_l ceil((ceil(n * f_l) + decode_tokens) / block_size) * block_bytes
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class RoutingHints:
    """What the ingress knows about a request before it reaches an LLM replica.

    Attributes
    ----------
    prompt_tokens : int
        Prompt length after image placeholder expansion.
    image_tokens : int
        How many of those are image tokens.
    max_tokens : int
        Generation budget.
    tau, max_keep_ratio : float or None
        Per-request ZipVL overrides (None: the replica's defaults).
    zipvl_enabled : bool or None
        Per-request switch (None: the replica's default).
    """

    prompt_tokens: int
    image_tokens: int = 0
    max_tokens: int = 16
    tau: float | None = None
    max_keep_ratio: float | None = None
    zipvl_enabled: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RoutingHints | None:
        if not data:
            return None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class KVProfile:
    """One replica's KV pool as reported to the router (a subset of ``EngineStats``).

    Attributes
    ----------
    capacity_bytes, used_bytes, reserved_bytes : int
        Pool size, bytes held by sequences, bytes promised to running sequences' decode growth.
    lifetime_bytes : int
        The replica's committed end-of-generation demand: predicted bytes of every running and waiting
        request once it has generated its whole ``max_tokens`` (``EngineStats.committed_lifetime_bytes``;
        0 when the replica does not report it). The router's holds are sized the same way.
    block_size : int
        Tokens per block.
    block_bytes : int
        Bytes of one block of one layer (keys + values).
    num_layers : int
    kept_fraction_per_layer : list[float]
        Running mean kept fraction per layer (1.0 until the replica has seen a prefill).
    num_running, num_waiting : int
    zipvl_tau, zipvl_max_keep_ratio : float or None
        The replica's default ZipVL setting, under which ``kept_fraction_per_layer`` was measured (None:
        not reported).
    zipvl_dense_layers : tuple[int, ...]
        Layers the replica's ZipVL setting keeps whole: no cap applies to them.
    """

    capacity_bytes: int
    used_bytes: int = 0
    reserved_bytes: int = 0
    block_size: int = 16
    block_bytes: int = 0
    num_layers: int = 1
    kept_fraction_per_layer: list[float] = field(default_factory=list)
    num_running: int = 0
    num_waiting: int = 0
    lifetime_bytes: int = 0
    zipvl_tau: float | None = None
    zipvl_max_keep_ratio: float | None = None
    zipvl_dense_layers: tuple[int, ...] = ()

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes - self.reserved_bytes)

    @property
    def committed_bytes(self) -> int:
        """What the replica has promised: ``max(used + reserved, lifetime)`` (the lifetime when reported)."""
        return max(self.used_bytes + self.reserved_bytes, self.lifetime_bytes)

    @property
    def mean_kept_fraction(self) -> float:
        f = self.kept_fraction_per_layer
        return sum(f) / len(f) if f else 1.0

    @classmethod
    def from_stats(cls, stats: Any) -> KVProfile:
        """Build from an ``EngineStats`` or its ``to_dict()`` (what ``record_routing_stats`` returns)."""
        data = stats if isinstance(stats, dict) else stats.to_dict()
        return cls(
            capacity_bytes=int(data.get("kv_bytes_capacity", 0)),
            used_bytes=int(data.get("kv_bytes_used", 0)),
            reserved_bytes=int(data.get("reserved_bytes", 0)),
            block_size=int(data.get("block_size", 16)),
            block_bytes=int(data.get("block_bytes", 0)),
            num_layers=int(data.get("num_layers", 1)),
            kept_fraction_per_layer=list(data.get("kept_fraction_per_layer") or []),
            num_running=int(data.get("num_running", 0)),
            num_waiting=int(data.get("num_waiting", 0)),
            lifetime_bytes=int(data.get("committed_lifetime_bytes", 0) or 0),
            zipvl_tau=_optional_float(data.get("zipvl_tau")),
            zipvl_max_keep_ratio=_optional_float(data.get("zipvl_max_keep_ratio")),
            zipvl_dense_layers=tuple(data.get("zipvl_dense_layers") or ()),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def effective_keep_fractions(
    fractions: list[float],
    num_layers: int,
    *,
    tau: float | None = None,
    max_keep_ratio: float | None = None,
    zipvl_enabled: bool | None = None,
    default_tau: float | None = None,
    default_max_keep_ratio: float | None = None,
    dense_layers: Iterable[int] = (),
) -> list[float]:
    """Per-layer keep fractions to predict with, after per-request overrides.

    ``fractions`` were observed under the replica's defaults (``default_tau``, ``default_max_keep_ratio``;
    a request without its own cap inherits the default one). ZipVL off keeps everything. An override that
    keeps *more* than the defaults (a higher ``tau``, ``tau >= 1``, a looser cap) makes the observed
    fractions a lower bound, so the prediction is dense up to the cap (``tau >= 1`` with a cap r keeps
    exactly ``ceil(r n)`` per layer). An override that keeps fewer (a lower ``tau``, a tighter cap) is not
    extrapolated: the observed fractions, capped, stay an upper estimate. Layers in ``dense_layers``
    keep every token whatever the cap (ZipVL never selects there).
    """
    base = list(fractions) if fractions else [1.0] * num_layers
    if zipvl_enabled is False:
        return [1.0] * len(base)
    cap = max_keep_ratio if max_keep_ratio is not None else default_max_keep_ratio  # a request inherits it
    keeps_more = (tau is not None and (tau >= 1.0 or (default_tau is not None and tau > default_tau))) or (
        max_keep_ratio is not None
        and default_max_keep_ratio is not None
        and max_keep_ratio > default_max_keep_ratio
    )
    if keeps_more:
        base = [1.0] * len(base)
    if cap is not None:
        base = [min(f, cap) for f in base]
    for layer in dense_layers:
        if 0 <= layer < len(base):
            base[layer] = 1.0
    return base


def predict_kept_tokens(prompt_tokens: int, fractions: list[float]) -> list[int]:
    """Kept prompt tokens per layer: ``ceil(n * f_l)``, at least 1."""
    return [max(1, min(prompt_tokens, math.ceil(prompt_tokens * f - 1e-9))) for f in fractions]


def blocks_for(tokens_per_layer: list[int], block_size: int) -> int:
    """Blocks a sequence holds: ``sum_l ceil(tokens_l / block_size)``."""
    return sum(-(-t // block_size) for t in tokens_per_layer)


def predict_bytes(
    prompt_tokens: int,
    fractions: list[float],
    decode_tokens: int,
    block_size: int,
    block_bytes: int,
) -> int:
    """Bytes a sequence will hold with ``decode_tokens`` generated, block-rounded per layer."""
    kept = predict_kept_tokens(prompt_tokens, fractions)
    return blocks_for([k + decode_tokens for k in kept], block_size) * block_bytes


def predict_request_bytes(
    hints: RoutingHints, profile: KVProfile, *, decode_tokens: int | None = None
) -> int:
    """Bytes ``hints``'s request will hold on ``profile``'s replica after pruning, with decode growth.

    ``decode_tokens`` defaults to the request's whole ``max_tokens``.
    """
    fractions = effective_keep_fractions(
        profile.kept_fraction_per_layer,
        profile.num_layers,
        tau=hints.tau,
        max_keep_ratio=hints.max_keep_ratio,
        zipvl_enabled=hints.zipvl_enabled,
        default_tau=profile.zipvl_tau,
        default_max_keep_ratio=profile.zipvl_max_keep_ratio,
        dense_layers=profile.zipvl_dense_layers,
    )
    growth = hints.max_tokens if decode_tokens is None else decode_tokens
    return predict_bytes(hints.prompt_tokens, fractions, growth, profile.block_size, profile.block_bytes)


#: ``id(list) -> (list, array)``: each replica's reported fractions as an array, converted once per snapshot
#: (the router keeps a snapshot's parsed profile, and with it the same list, until the next one).
_FRACTION_ARRAYS: dict[int, tuple[list[float], np.ndarray]] = {}
_FRACTION_ARRAYS_MAX = 4096


def _fraction_array(fractions: list[float], num_layers: int) -> np.ndarray:
    if not fractions:
        return np.ones(num_layers)
    entry = _FRACTION_ARRAYS.get(id(fractions))
    if entry is not None and entry[0] is fractions:
        return entry[1]
    if len(_FRACTION_ARRAYS) >= _FRACTION_ARRAYS_MAX:
        _FRACTION_ARRAYS.clear()
    array = np.asarray(fractions, dtype=np.float64)
    _FRACTION_ARRAYS[id(fractions)] = (fractions, array)
    return array


def predict_request_bytes_many(hints: RoutingHints, profiles: Sequence[KVProfile]) -> list[int]:
    """:func:`predict_request_bytes` for one request on each of ``profiles``, equal to it exactly, in one
    array computation per geometry instead of a Python loop over every replica's layers (at 64 replicas of
    80 layers a routing decision spent ~4 ms there; now ~0.3 ms).

    Returns
    -------
    list[int]
        Bytes per profile, in order.
    """
    n, growth = hints.prompt_tokens, hints.max_tokens
    if n > 1 << 40 or growth > 1 << 40:  # past int64 once multiplied out: Python's integers, as before
        return [predict_request_bytes(hints, p) for p in profiles]
    out = [0] * len(profiles)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, p in enumerate(profiles):
        width = len(p.kept_fraction_per_layer) or p.num_layers
        groups.setdefault((width, p.block_size, p.block_bytes), []).append(i)
    tau, cap_override = hints.tau, hints.max_keep_ratio
    for (width, block_size, block_bytes), rows in groups.items():
        group = [profiles[i] for i in rows]
        if width * (-(-(n + growth) // block_size) + 1) * block_bytes >= 1 << 62:  # int64 would overflow
            for i in rows:
                out[i] = predict_request_bytes(hints, profiles[i])
            continue
        if hints.zipvl_enabled is False:
            fractions = np.ones((len(group), width))
        else:
            fractions = np.stack([_fraction_array(p.kept_fraction_per_layer, width) for p in group])
            # The rules of effective_keep_fractions, one row per replica.
            keeps_more = [
                (tau is not None and (tau >= 1.0 or (p.zipvl_tau is not None and tau > p.zipvl_tau)))
                or (
                    cap_override is not None
                    and p.zipvl_max_keep_ratio is not None
                    and cap_override > p.zipvl_max_keep_ratio
                )
                for p in group
            ]
            if any(keeps_more):
                fractions[np.asarray(keeps_more)] = 1.0
            caps = [cap_override if cap_override is not None else p.zipvl_max_keep_ratio for p in group]
            if any(c is not None for c in caps):
                column = np.array([np.inf if c is None else c for c in caps], dtype=np.float64)[:, None]
                fractions = np.minimum(fractions, column)
            for row, p in enumerate(group):
                dense = [layer for layer in p.zipvl_dense_layers if 0 <= layer < width]
                if dense:
                    fractions[row, dense] = 1.0
        kept = np.maximum(1, np.minimum(n, np.ceil(n * fractions - 1e-9))).astype(np.int64)
        blocks = (-(-(kept + growth) // block_size)).sum(axis=1) * block_bytes
        for i, value in zip(rows, blocks.tolist(), strict=True):
            out[i] = int(value)
    return out


__all__ = [
    "KVProfile",
    "RoutingHints",
    "blocks_for",
    "effective_keep_fractions",
    "predict_bytes",
    "predict_kept_tokens",
    "predict_request_bytes",
    "predict_request_bytes_many",
]
