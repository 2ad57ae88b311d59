"""Prefill (time to first token): dense attention vs ZipVL, side by side in one process, as ratios.

A random-weight decoder with a realistic attention layout (GQA, bf16) prefills one long prompt with
dense attention (stock transformers SDPA, or flash-attn on a GPU that has it) and with ZipVL at
forced keep ratios (``max_keep_ratio`` with a tau that does not bind) and at the adaptive default
tau. Configurations are interleaved round by round, so machine noise hits them alike; each figure
is the best of the rounds. Per configuration:

* ``ttft_s``: the whole prefill forward (all layers, last-token logits), and ``speedup`` vs dense;
* ``attention_share``: time inside the attention function over the forward (instrumented run);
* ``select_s``: ZipVL's probe scoring + adaptive count + top-k (``zipvl_select``), also as a
  share of the dense TTFT (``overhead_pct``); ``kernel_s``: the attention kernel; ``gather_s``:
  the rest of the ZipVL attention function (gathers, scatter, storing the kept KV);
* ``limit_s``: the physical limit for the kept ratios, ``dense non-attention + dense attention x
  mean_l (p_l / n)^2``, ``limit_speedup`` and ``pct_of_limit`` = limit / TTFT (1.0 = at the limit).

Random weights give near-uniform attention, so the adaptive tau keeps most tokens; it is reported as
measured. Commands::

    python -m benchmarks.prefill                       # CPU: 4K, 8K, 16K tokens (several minutes)
    python -m benchmarks.prefill --smoke               # seconds; what the test suite runs
    python -m benchmarks.prefill --shape longva-7b     # GPU: LongVA-7B-shaped, 16K / 32K / 64K tokens
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import zipvl_ray.cache as zipvl_cache
from benchmarks.common import write_results
from zipvl_ray.attention import ATTN_KEY, enable_zipvl, set_zipvl_config
from zipvl_ray.cache import ZipVLCache
from zipvl_ray.config import ZipVLConfig
from zipvl_ray.sparsity import attention_backend


@dataclass(frozen=True)
class ModelShape:
    """Text-decoder sizes of a benchmark model (random weights)."""

    arch: str  # "llama" or "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    note: str = ""


SHAPES: dict[str, ModelShape] = {
    # CPU default: a 1B-class layout cut to 4 layers (per-layer costs are what matter).
    "cpu-1k": ModelShape("llama", 1024, 4, 16, 4, 64, 2816, 32000, note="hidden 1024, 16 x 64 heads, GQA 4"),
    # LongVA-7B = Qwen2-7B text model (Table E of the paper was measured on it).
    "longva-7b": ModelShape(
        "qwen2", 3584, 28, 28, 4, 128, 18944, 152064, rope_theta=1e6, note="Qwen2-7B text model, GQA 7"
    ),
    # LLaVA-NeXT-7B (vicuna-7b text model, no GQA).
    "llava-next-7b": ModelShape("llama", 4096, 32, 32, 32, 128, 11008, 32064, note="Vicuna-7B text model"),
    # LLaVA-NeXT-Mistral-7B text model.
    "llava-next-mistral-7b": ModelShape(
        "llama", 4096, 32, 32, 8, 128, 14336, 32064, rope_theta=1e6, note="Mistral-7B text model, GQA 4"
    ),
    "smoke": ModelShape("llama", 64, 2, 4, 2, 16, 128, 256, note="test-suite smoke"),
}

CPU_SIZES = [4096, 8192, 16384]
GPU_SIZES = [16384, 32768, 65536]
CPU_RATIOS = [0.5, 0.3, 0.1]
GPU_RATIOS = [0.5, 0.35, 0.3, 0.1]
#: Tau of the forced-ratio runs: high enough that the adaptive count never binds before the cap.
FORCED_TAU = 0.999


def build_model(
    shape: ModelShape, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> torch.nn.Module:
    """A causal LM of ``shape`` with random weights on ``device``, in eval mode, attention set to SDPA."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    )
    if shape.arch == "qwen2":
        config = Qwen2Config(**common, rope_theta=shape.rope_theta)
    else:
        config = LlamaConfig(**common, head_dim=shape.head_dim, rope_theta=shape.rope_theta)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def use_fp32_gemm(model: torch.nn.Module) -> int:
    """Run every ``nn.Linear`` of a bf16 model as an fp32 GEMM over an fp32 copy of its (bf16) weights.

    Without AVX512-BF16 / AMX, torch's bf16 GEMM on CPU is a fallback about 10x slower than fp32 MKL
    (measured, ``docs/performance.md``), so the projections and the MLP dominate a bf16 prefill and hide
    attention. The upcast weights hold exactly the bf16 values and the products accumulate in fp32 either
    way; only the rounding of the outputs differs. Activations, attention and the caches stay bf16.
    Returns the number of linears changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype != torch.float32:
            weight = module.weight.detach().float()
            bias = None if module.bias is None else module.bias.detach().float()

            def forward(x, _weight=weight, _bias=bias):
                return F.linear(x.float(), _weight, _bias).to(x.dtype)

            module.forward = forward
            changed += 1
    return changed


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Clocks of the CPU measurements. ``cpu`` (process CPU time) ignores the time other programs hold the
#: cores: with ``--threads 1`` it is the robust choice on a shared machine; ``wall`` is TTFT proper.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class Timers:
    """Seconds spent inside wrapped functions, accumulated per name (synchronising on CUDA)."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.device = device
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            synchronize(self.device)
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.seconds[name] += self.clock() - start

        timed.__wrapped__ = fn
        return timed


@contextlib.contextmanager
def instrumented(timers: Timers, dense_impl: str) -> Iterator[None]:
    """Time the attention functions (dense and ZipVL), ZipVL's selection and the attention kernels."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    patches: list[tuple[Any, str, Any]] = []

    def patch(obj, attr, name):
        original = getattr(obj, attr)
        patches.append((obj, attr, original))
        setattr(obj, attr, timers.wrap(name, original))

    originals = {key: ALL_ATTENTION_FUNCTIONS[key] for key in (dense_impl, ATTN_KEY)}
    for key, fn in originals.items():
        AttentionInterface.register(key, timers.wrap("attention", fn))
    patch(zipvl_cache, "zipvl_select", "select")
    patch(F, "scaled_dot_product_attention", "kernel")
    with contextlib.suppress(ImportError):
        import flash_attn

        patch(flash_attn, "flash_attn_varlen_func", "kernel")
    try:
        yield
    finally:
        for obj, attr, original in reversed(patches):
            setattr(obj, attr, original)
        for key, fn in originals.items():
            AttentionInterface.register(key, fn)


def prefill_once(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """One prefill forward (last-token logits only), returning the logits."""
    with torch.inference_mode():
        return model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits


def timed_prefill(
    model, input_ids: torch.Tensor, make_cache: Callable, device: torch.device, clock: Callable[[], float]
) -> tuple[float, Any, float | None]:
    """One prefill: its seconds (CUDA events on a GPU, wall clock on CPU), the cache it filled and the
    peak GPU memory in GiB (None on CPU)."""
    cache = make_cache()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        prefill_once(model, input_ids, cache)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, cache, torch.cuda.max_memory_allocated(device) / 2**30
    start_s = clock()
    prefill_once(model, input_ids, cache)
    return clock() - start_s, cache, None


# ---------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One column of the comparison: dense, or ZipVL under ``zipvl``."""

    name: str
    zipvl: ZipVLConfig | None  # None: dense attention
    forced_ratio: float | None = None


def run_configs(
    ratios: list[float], adaptive_tau: float, with_tau1: bool, adaptive: bool = True
) -> list[RunConfig]:
    """Dense, then ZipVL at tau = 1 (optional), at each forced ratio and at the adaptive tau (optional)."""
    configs = [RunConfig("dense", None)]
    if with_tau1:
        configs.append(RunConfig("zipvl tau=1", ZipVLConfig(tau=1.0)))
    for r in ratios:
        configs.append(
            RunConfig(f"zipvl r={r:g}", ZipVLConfig(tau=FORCED_TAU, max_keep_ratio=r), forced_ratio=r)
        )
    if adaptive:
        configs.append(RunConfig(f"zipvl tau={adaptive_tau:g}", ZipVLConfig(tau=adaptive_tau)))
    return configs


def activate(model, config: RunConfig, dense_impl: str) -> Callable:
    """Switch ``model`` to ``config``'s attention; return the factory of its cache."""
    if config.zipvl is None:
        model.set_attn_implementation(dense_impl)
        from transformers import DynamicCache

        return lambda: DynamicCache(config=model.config)
    model.set_attn_implementation(ATTN_KEY)
    set_zipvl_config(model, config.zipvl)
    return lambda: ZipVLCache(model)


def kept_counts(cache) -> list[int]:
    """Kept prompt tokens per layer after a ZipVL prefill (empty for a dense cache)."""
    if not isinstance(cache, ZipVLCache):
        return []
    return [kept[0] for kept in cache.stats().prompt_kept_per_layer]


def measure_size(
    model, configs: list[RunConfig], n: int, args, device: torch.device, dense_impl: str
) -> list[dict]:
    """All configurations at prompt length ``n``: interleaved timed rounds, then one instrumented run each."""
    generator = torch.Generator().manual_seed(n)
    input_ids = torch.randint(0, model.config.vocab_size, (1, n), generator=generator).to(device)
    ttfts: dict[str, list[float]] = defaultdict(list)
    splits: dict[str, dict[str, float]] = {}
    counts: dict[str, list[int]] = {}
    peaks: dict[str, float | None] = {}
    # CPU timers do not synchronise, so one run gives both the time and its split; on CUDA the timed
    # rounds run bare and one extra instrumented run per configuration gives the split.
    instrument_timed = device.type == "cpu" and not args.separate_breakdown
    for round_idx in range(args.repeats):
        for config in configs:
            make_cache = activate(model, config, dense_impl)
            timers = Timers(device, CLOCKS[args.clock])
            ctx = instrumented(timers, dense_impl) if instrument_timed else contextlib.nullcontext()
            with ctx:
                seconds, cache, peak = timed_prefill(model, input_ids, make_cache, device, CLOCKS[args.clock])
            ttfts[config.name].append(seconds)
            if instrument_timed and seconds <= min(ttfts[config.name]):
                splits[config.name] = {**timers.seconds, "total": seconds}
            counts[config.name] = kept_counts(cache)
            peaks[config.name] = peak
            del cache
            print(
                f"  n={n} round {round_idx + 1}/{args.repeats} {config.name:16s} {seconds:8.3f} s", flush=True
            )
    if not instrument_timed:
        for config in configs:
            make_cache = activate(model, config, dense_impl)
            timers = Timers(device, CLOCKS[args.clock])
            with instrumented(timers, dense_impl):
                seconds, _, _ = timed_prefill(model, input_ids, make_cache, device, CLOCKS[args.clock])
            splits[config.name] = {**timers.seconds, "total": seconds}
    return summarise(configs, n, ttfts, splits, counts, peaks)


def summarise(configs, n, ttfts, splits, counts, peaks) -> list[dict]:
    """Rows of one prompt length: TTFT, ratios, the split of the best run and the limit per config."""
    dense_ttft = min(ttfts["dense"])
    dense_split = splits["dense"]
    dense_share = dense_split.get("attention", 0.0) / dense_split["total"]
    dense_attention = dense_share * dense_ttft
    dense_rest = dense_ttft - dense_attention
    rows = []
    for config in configs:
        ttft = min(ttfts[config.name])
        split = splits[config.name]
        scale = ttft / split["total"]  # instrumented run -> best timed run (1.0 on CPU)
        attention = split.get("attention", 0.0) * scale
        select = split.get("select", 0.0) * scale
        kernel = split.get("kernel", 0.0) * scale
        layer_ratios = [c / n for c in counts[config.name]] or [1.0]
        cap = None if config.forced_ratio is None else max(1, math.ceil(config.forced_ratio * n - 1e-9))
        mean_ratio = sum(layer_ratios) / len(layer_ratios)
        mean_sq = sum(r * r for r in layer_ratios) / len(layer_ratios)
        limit = dense_rest + dense_attention * mean_sq
        row = {
            "n_tokens": n,
            "config": config.name,
            "keep_ratio": mean_ratio,
            "ttft_s": ttft,
            "ttft_median_s": statistics.median(ttfts[config.name]),
            "speedup": dense_ttft / ttft,
            "attention_share": attention / ttft,
            "attention_s": attention,
            "select_s": select,
            "overhead_pct": 100.0 * select / dense_ttft,
            "kernel_s": kernel,
            "gather_s": max(attention - select - kernel, 0.0) if config.zipvl is not None else 0.0,
            "kernel_vs_r2": kernel / (dense_attention * mean_sq)
            if config.zipvl is not None and mean_sq
            else 1.0,
            "limit_s": limit,
            "limit_speedup": dense_ttft / limit,
            "pct_of_limit": limit / ttft,
            "kept_per_layer": counts[config.name],
            "tau_binds": cap is not None and any(c < cap for c in counts[config.name]),
            "rounds": len(ttfts[config.name]),
            "peak_memory_gib": peaks[config.name],
        }
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------

COLUMNS = [
    "n_tokens",
    "config",
    "keep_ratio",
    "ttft_s",
    "speedup",
    "attention_share",
    "select_s",
    "overhead_pct",
    "kernel_s",
    "gather_s",
    "kernel_vs_r2",
    "limit_s",
    "limit_speedup",
    "pct_of_limit",
]


def targets(rows: list[dict], device: torch.device) -> dict[str, Any]:
    """The issue's targets, read off the rows (CPU: 16K, r = 0.3; GPU: 32K, r = 0.35)."""
    n, r = (32768, 0.35) if device.type == "cuda" else (16384, 0.3)
    row = next((x for x in rows if x["n_tokens"] == n and x["config"] == f"zipvl r={r:g}"), None)
    if row is None:
        return {}
    need_speedup, need_overhead = (2.5, 3.0) if device.type == "cuda" else (2.6, 2.0)
    return {
        "target_point": f"{n} tokens, r = {r:g}",
        "speedup": row["speedup"],
        "speedup_target": need_speedup,
        "pct_of_limit": row["pct_of_limit"],
        "overhead_pct": row["overhead_pct"],
        "overhead_target_pct": need_overhead,
        "speedup_met": row["speedup"] >= need_speedup,
        "overhead_met": row["overhead_pct"] <= need_overhead,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, short prompts, one round")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="model layout")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="prompt lengths in tokens")
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="forced keep ratios")
    parser.add_argument("--tau", type=float, default=0.975, help="tau of the adaptive run")
    parser.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run ZipVL at the adaptive tau (--no-adaptive: forced ratios only)",
    )
    parser.add_argument(
        "--with-tau1", action="store_true", help="also run ZipVL at tau = 1 (dense via ZipVL)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per size (best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--separate-breakdown",
        action="store_true",
        help="time bare rounds and split the time in one extra instrumented run per config (always on CUDA)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="CPU only: wall clock (TTFT) or process CPU time (robust to other programs; use with --threads 1)",
    )
    parser.add_argument(
        "--gemm",
        choices=["native", "fp32"],
        default="native",
        help="CPU only: linears as stock bf16 GEMMs (native) or as fp32 GEMMs over upcast bf16 weights (fp32)",
    )
    parser.add_argument(
        "--name", default=None, help="results file stem (default prefill, prefill_gpu, prefill_smoke)"
    )
    parser.add_argument("--out-dir", default=None, help="results directory (default benchmarks/results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        args.clock = "wall"  # CUDA events
    shape_name = args.shape or ("smoke" if args.smoke else "longva-7b" if gpu else "cpu-1k")
    shape = SHAPES[shape_name]
    sizes = args.sizes or ([256, 512] if args.smoke else GPU_SIZES if gpu else CPU_SIZES)
    ratios = args.ratios or (GPU_RATIOS if gpu else CPU_RATIOS)
    args.repeats = args.repeats or (1 if args.smoke else 5 if gpu else 3)
    dtype = torch.bfloat16
    backend = attention_backend(device, dtype)
    dense_impl = "flash_attention_2" if backend == "flash" else "sdpa"

    model = build_model(shape, device, dtype)
    gemm = args.gemm if device.type == "cpu" else "native"
    if gemm == "fp32":
        use_fp32_gemm(model)
    enable_zipvl(model, ZipVLConfig())
    configs = run_configs(ratios, args.tau, args.with_tau1, args.adaptive)
    print(
        f"shape {shape_name} ({shape.note}), {device}, bf16, {gemm} GEMMs, dense={dense_impl}, zipvl={backend}"
    )
    warm = torch.randint(0, shape.vocab_size, (1, min(256, min(sizes))), device=device)
    for config in configs:  # first-call costs (kernel selection, allocator) out of the timed rounds
        prefill_once(model, warm, activate(model, config, dense_impl)())
    name = args.name or ("prefill_smoke" if args.smoke else "prefill_gpu" if gpu else "prefill")
    if gemm == "fp32" and not args.name:
        name += "_fp32gemm"
    summary = {
        "device": str(device),
        "shape": shape_name,
        "layout": shape.note,
        "layers": shape.num_layers,
        "gemm": gemm,
        "clock": args.clock,
        "threads": torch.get_num_threads() if not gpu else None,
        "dense_attention": dense_impl,
        "zipvl_kernel": backend,
        "forced_tau": FORCED_TAU,
        "adaptive_tau": args.tau if args.adaptive else None,
        "repeats": args.repeats,
    }
    notes = (
        "Dense vs ZipVL prefill, interleaved rounds in one process, best of the rounds. `limit_s` = dense "
        "non-attention time + dense attention time x mean_l (p_l/n)^2; `pct_of_limit` = limit / TTFT. "
        "`overhead_pct` = probe scoring + selection over the dense TTFT. Random weights give near-uniform "
        "attention, so the adaptive tau keeps most tokens."
    )
    rows: list[dict] = []
    for n in sizes:
        if gpu:
            torch.cuda.empty_cache()
        rows += measure_size(model, configs, n, args, device, dense_impl)
        # Written after every length, so a long run that is stopped keeps what it measured.
        paths = write_results(
            name,
            rows,
            columns=COLUMNS,
            summary={**summary, **targets(rows, device)},
            title="Prefill: dense vs ZipVL",
            notes=notes,
            out_dir=args.out_dir,
        )
    for row in rows:
        print(
            f"{row['n_tokens']:6d} {row['config']:16s} keep {row['keep_ratio']:.3f} ttft {row['ttft_s']:8.3f} s "
            f"x{row['speedup']:.2f} (limit x{row['limit_speedup']:.2f}, {100 * row['pct_of_limit']:.0f}%) "
            f"select {row['overhead_pct']:.2f}% of dense"
        )
    print(f"wrote {paths[0]} and {paths[1]}")
    return paths


if __name__ == "__main__":
    main()
