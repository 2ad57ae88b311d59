"""Detokenization in the decode loop: whole-output ``decode`` after every token vs incremental streams.

The engine keeps each running sequence's text up to date after every token (stop strings, streamed
deltas). Re-decoding the whole output costs ``O(n)`` per token; ``zipvl_ray.engine.detokenizer``
streams it through tokenizers' ``DecodeStream`` instead (``O(1)`` per token) and decodes a sequence
whole once, when it finishes. This benchmark runs the same requests through two engines that differ
only in that (``Detokenizer(incremental=False)`` vs the default), side by side in one process,
alternating whole runs, and reports the engine's CPU time per decode step and per token, the ratio, and
whether the finished texts are identical (they must be).

    python -m benchmarks.detokenize                      # 48 requests x 256 tokens, 3 rounds (about a minute)
    python -m benchmarks.detokenize --smoke              # seconds, for the test suite

Results: ``benchmarks/results/detokenize.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import write_results
from zipvl_ray.config import EngineConfig
from zipvl_ray.engine import LLMEngine, SamplingParams
from zipvl_ray.engine.detokenizer import Detokenizer
from zipvl_ray.models import load_model


def run_once(model, processor, incremental: bool, args) -> tuple[dict, dict[str, str]]:
    """One pass over the requests; the engine's thread CPU time split by step kind, and the final texts."""
    engine = LLMEngine(
        model,
        processor,
        engine=EngineConfig(max_num_seqs=max(args.requests, 1), kv_cache_bytes=args.kv_mb << 20),
    )
    engine.detokenizer = Detokenizer(processor.tokenizer, incremental=incremental)
    sampling = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    for i in range(args.requests):
        engine.add_request(f"r{i}", f"USER: Tell story number {i}. ASSISTANT:", sampling)
    decode_s = prefill_s = 0.0
    decode_steps = decode_tokens = 0
    texts: dict[str, str] = {}
    while engine.has_unfinished():
        start = time.thread_time()
        outputs = engine.step()
        seconds = time.thread_time() - start
        kind, n, _ = engine.last_step
        if kind == "decode":
            decode_s, decode_steps, decode_tokens = decode_s + seconds, decode_steps + 1, decode_tokens + n
        else:
            prefill_s += seconds
        texts.update((o.request_id, o.text) for o in outputs if o.finished)
    return {
        "decode_s": decode_s,
        "prefill_s": prefill_s,
        "decode_steps": decode_steps,
        "decode_tokens": decode_tokens,
    }, texts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--requests", type=int, default=48, help="Requests decoded together.")
    parser.add_argument("--max-tokens", type=int, default=256, help="Tokens generated per request.")
    parser.add_argument(
        "--rounds", type=int, default=3, help="Rounds; each runs both modes (order alternates)."
    )
    parser.add_argument("--kv-mb", type=int, default=256, help="KV pool (MiB): room for every request.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (thread CPU time is measured).")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.max_tokens, args.rounds, args.kv_mb = 3, 12, 1, 16
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = load_model(args.model)
    modes = {"whole decode": False, "incremental": True}
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    texts: dict[str, dict[str, str]] = {}
    for r in range(args.rounds):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for name in order:
            result, texts[name] = run_once(model, processor, modes[name], args)
            runs[name].append(result)
    identical = texts["whole decode"] == texts["incremental"]
    rows = []
    for name, results in runs.items():
        per_step = [1e3 * r["decode_s"] / max(r["decode_steps"], 1) for r in results]
        per_token = [1e6 * r["decode_s"] / max(r["decode_tokens"], 1) for r in results]
        rows.append(
            {
                "mode": name,
                "requests": args.requests,
                "max_tokens": args.max_tokens,
                "decode_steps": results[0]["decode_steps"],
                "decode_ms_per_step": statistics.median(per_step),
                "decode_ms_per_step_min": min(per_step),
                "decode_ms_per_step_max": max(per_step),
                "decode_us_per_token": statistics.median(per_token),
            }
        )
    whole, incremental = rows
    summary = {
        "model": args.model,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "decode_step_speedup_x": whole["decode_ms_per_step"] / max(incremental["decode_ms_per_step"], 1e-9),
        "saved_us_per_sequence_and_step": 1e3
        * (whole["decode_ms_per_step"] - incremental["decode_ms_per_step"])
        / max(args.requests, 1),
        "identical_texts": identical,
    }
    write_results(
        "detokenize-smoke" if args.smoke else "detokenize",
        rows,
        summary=summary,
        title="Detokenization in the decode loop: whole decode vs incremental",
        notes=(
            "The same requests through two engines that differ only in how running sequences' text is "
            "kept (engine thread CPU time per decode step, median over rounds); finished texts compared."
        ),
        out_dir=args.out_dir,
    )
    if not identical:
        raise SystemExit("the two modes returned different texts")
    print(summary)
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
