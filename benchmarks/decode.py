"""Decode throughput at a fixed KV pool size: dense vs ZipVL, side by side in one process.

Many concurrent long-image requests are submitted at once to the paged engine with the same KV pool.
Dense attention keeps every prompt token in every layer, so few sequences fit; ZipVL keeps a fraction,
so more fit in one decode batch. Reported per configuration: the most sequences decoded together,
decode tokens/s (decode tokens over time spent in decode steps), the same over the *saturated* steps
only (taken while requests still waited for KV memory, i.e. with the largest batch the pool allows:
the throughput at fixed KV memory under sustained load, free of the last round's smaller batch),
end-to-end tokens/s, preemptions, and the ratios against dense.

Every configuration first runs once untimed on a few requests (warm-up), then ``--repeats`` rounds run
every configuration. Within a round the configurations advance in lockstep (each with its own engine
and pool): the one that has generated the smallest share of its tokens takes the next step, so they
progress and finish together, and every step is timed on its own; drift of the machine during the
round hits them alike. The order that breaks ties rotates from round to round. Each
throughput figure is the median over the rounds, with its min and max (``*_min`` / ``*_max``), and the
ratios are ratios of medians. ``wall_s`` and the end-to-end figure count a configuration's own steps.

Until 2026-12-06 the benchmark ran each configuration once, dense always first and cold: a review
measured the same configuration 2-2.5x apart between two passes in one process on this VM, thread CPU
time included. Then, until the lockstep rounds, each round ran the configurations one after another,
and the per-round ratio still scattered from 2.5x to 3.1x. The first lockstep rounds (2026-12-07 00:11
and 00:20) took one step of each configuration in turn, so dense, which needs more steps, ran the last
~40% of its decode time alone: those runs read 2.90x and 2.72x.

    python -m benchmarks.decode                             # the full run (5-8 minutes on 2 CPU cores)
    python -m benchmarks.decode --threads 1 --clock cpu     # on a machine shared with other jobs
    python -m benchmarks.decode --smoke                     # seconds, for the test suite
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import write_results
from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine import LLMEngine, SamplingParams
from zipvl_ray.models import load_model


def long_image_prompt(i: int, n_images: int) -> dict:
    rng = np.random.default_rng(i)
    images = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(n_images)]
    content = [{"type": "image"} for _ in range(n_images)] + [
        {"type": "text", "text": f"Request {i}: what changes?"}
    ]
    return {"messages": [{"role": "user", "content": content}], "images": images}


class Run:
    """One configuration's pass over the requests, advanced one engine step at a time.

    The configurations of a round step in turn (one step of each, then the next), so that the machine's
    drift during the round hits all of them alike; each step is timed on its own.
    """

    def __init__(self, model, processor, zipvl: ZipVLConfig, prompts, args):
        self.engine = LLMEngine(
            model,
            processor,
            zipvl=zipvl,
            engine=EngineConfig(
                kv_cache_bytes=args.kv_mb * 1024 * 1024,
                max_num_seqs=args.max_num_seqs,
                max_model_len=8192,
                max_num_batched_tokens=16384,
                decode_headroom_tokens=args.headroom,
            ),
        )
        sampling = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, output_kind=args.output_kind)
        for i, prompt in enumerate(prompts):
            self.engine.add_request(f"r{i}", prompt, sampling)
        self.generated = len(prompts) * args.max_tokens
        self.clock = time.thread_time if args.clock == "cpu" else time.perf_counter
        self.decode_time = self.prefill_time = self.saturated_time = 0.0
        self.decode_tokens = self.saturated_tokens = self.finished = self.tokens_out = 0
        self.batch_sizes: list[int] = []

    @property
    def done(self) -> bool:
        return not self.engine.has_unfinished()

    @property
    def progress(self) -> float:
        """Share of the round's tokens generated so far (finished requests' and running ones')."""
        running = sum(len(seq.output_token_ids) for seq in self.engine.sequences.values())
        return (self.tokens_out + running) / self.generated

    def step(self) -> None:
        engine = self.engine
        # Saturated: requests are still waiting for KV memory, so the batch is as large as the pool allows.
        saturated = len(engine.scheduler.waiting) > 0
        step_start = self.clock()
        outs = engine.step()
        seconds = self.clock() - step_start
        self.finished += sum(o.finished for o in outs)
        self.tokens_out += sum(len(o.token_ids) for o in outs if o.finished)
        kind, n, _ = engine.last_step
        if kind == "decode":
            self.decode_time += seconds
            self.decode_tokens += n
            self.batch_sizes.append(n)
            if saturated:
                self.saturated_time += seconds
                self.saturated_tokens += n
        else:
            self.prefill_time += seconds

    def result(self) -> dict:
        stats = self.engine.stats()
        busy = self.decode_time + self.prefill_time  # the steps' own time (the others' steps excluded)
        return {
            "max_concurrent_seqs": stats.max_concurrent_seqs,
            "mean_decode_batch": float(np.mean(self.batch_sizes)) if self.batch_sizes else 0.0,
            "decode_tokens_per_s": self.decode_tokens / self.decode_time if self.decode_time else 0.0,
            "saturated_decode_tokens_per_s": (
                self.saturated_tokens / self.saturated_time if self.saturated_time else 0.0
            ),
            "saturated_decode_steps_share": self.saturated_time / self.decode_time
            if self.decode_time
            else 0.0,
            "e2e_tokens_per_s": self.generated / busy if busy else 0.0,
            "decode_time_s": self.decode_time,
            "prefill_time_s": self.prefill_time,
            "wall_s": busy,
            "preemptions": stats.num_preemptions,
            "mean_kept_fraction": stats.mean_kept_fraction,
            "kv_pool_mb": stats.kv_bytes_capacity / 2**20,
            "finished": self.finished,
        }


def run_round(model, processor, configs: list[ZipVLConfig], prompts, args) -> list[dict]:
    """Every configuration over ``prompts`` in lockstep; one result each.

    The run with the least progress (share of its tokens generated; the first in the order given on a tie)
    takes the next step, so the runs advance together and finish together: a configuration that needs
    fewer, larger steps steps less often, and none runs alone at the end of the round.
    """
    runs = [Run(model, processor, zipvl, prompts, args) for zipvl in configs]
    while not all(r.done for r in runs):
        min((r for r in runs if not r.done), key=lambda r: r.progress).step()
    results = [r.result() for r in runs]
    for r in runs:  # free the pools before the next round allocates its own
        del r.engine
    return results


def run(model, processor, zipvl: ZipVLConfig, prompts, args) -> dict:
    """One configuration alone (the warm-up)."""
    return run_round(model, processor, [zipvl], prompts, args)[0]


#: Figures that vary between rounds: the median is reported, with the min and max beside it.
TIMED = (
    "decode_tokens_per_s",
    "saturated_decode_tokens_per_s",
    "e2e_tokens_per_s",
    "decode_time_s",
    "wall_s",
)


def summarize_rounds(results: list[dict]) -> dict:
    """One row from the rounds of a configuration: medians of the timed figures (with ``_min`` / ``_max``),
    the rest from the first round (the schedule is deterministic, so they are the same in every round)."""
    row = dict(results[0])
    for key in TIMED:
        values = [r[key] for r in results]
        row[key] = float(np.median(values))
        row[f"{key}_min"], row[f"{key}_max"] = float(min(values)), float(max(values))
    row["prefill_time_s"] = float(np.median([r["prefill_time_s"] for r in results]))
    row["rounds"] = len(results)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument(
        "--requests",
        type=int,
        default=256,
        help="requests submitted at once (enough for several rounds of the largest batch)",
    )
    parser.add_argument(
        "--images", type=int, default=32, help="images per request (64 tokens each on tiny-llava)"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--output-kind",
        choices=["final_only", "stream"],
        default="final_only",
        help="final_only: the engine builds only each request's finished output (what LLM.generate and "
        "non-streamed API requests ask for); stream: an output per token, as a streamed request gets",
    )
    parser.add_argument("--kv-mb", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument(
        "--headroom", type=int, default=16, help="decode tokens reserved per layer at admission"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's; 1 on a machine shared with other jobs)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: the thread's CPU time (with --threads 1: less exposed to other jobs, "
        "not immune: shared caches and a VM's CPU time still move; the rounds' spread is reported)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds per configuration (median)"
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: add --threads 1")
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _benchmark(args)
    finally:
        torch.set_num_threads(previous_threads)


def _benchmark(args: argparse.Namespace) -> dict:
    if args.smoke:
        args.requests, args.images, args.max_tokens, args.kv_mb, args.repeats = 6, 2, 4, 1, 2
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    torch.manual_seed(0)
    model, processor = load_model(args.model)
    prompts = [long_image_prompt(i, args.images) for i in range(args.requests)]
    configs = {
        "dense": ZipVLConfig(enabled=False),
        "zipvl r=0.35": ZipVLConfig(max_keep_ratio=0.35),
        "zipvl adaptive (tau=0.975)": ZipVLConfig(),
    }
    names = list(configs)
    for name in names:  # warm-up, untimed: allocator, kernels, caches
        run(model, processor, configs[name], prompts[: min(8, len(prompts))], args)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name, result in zip(
            order, run_round(model, processor, [configs[n] for n in order], prompts, args), strict=True
        ):
            rounds[name].append(result)
    rows = [{"config": name, **summarize_rounds(rounds[name])} for name in names]
    dense = rows[0]
    for row in rows:
        row["concurrency_x"] = row["max_concurrent_seqs"] / max(dense["max_concurrent_seqs"], 1)
        row["decode_throughput_x"] = row["decode_tokens_per_s"] / max(dense["decode_tokens_per_s"], 1e-9)
        row["saturated_decode_throughput_x"] = row["saturated_decode_tokens_per_s"] / max(
            dense["saturated_decode_tokens_per_s"], 1e-9
        )
        row["e2e_throughput_x"] = row["e2e_tokens_per_s"] / max(dense["e2e_tokens_per_s"], 1e-9)
    prompt_tokens = len(
        processor(
            text=[
                processor.apply_chat_template(
                    prompts[0]["messages"], add_generation_prompt=True, tokenize=False
                )
            ],
            images=prompts[0]["images"],
        )["input_ids"][0]
    )
    summary = {
        "model": args.model,
        "requests": args.requests,
        "prompt_tokens": prompt_tokens,
        "max_tokens": args.max_tokens,
        "kv_pool_mb": args.kv_mb,
        "torch_threads": torch.get_num_threads(),
        "clock": args.clock,
        "output_kind": args.output_kind,
        "rounds": args.repeats,
        "decode_throughput_x_at_r0.35": rows[1]["decode_throughput_x"],
        # The ratio's range over the rounds (each round's r=0.35 figure against its dense figure).
        "decode_throughput_x_at_r0.35_rounds": [
            z["decode_tokens_per_s"] / max(d["decode_tokens_per_s"], 1e-9)
            for z, d in zip(rounds[names[1]], rounds[names[0]], strict=True)
        ],
        "concurrency_x_at_r0.35": rows[1]["concurrency_x"],
        "saturated_decode_throughput_x_at_r0.35": rows[1]["saturated_decode_throughput_x"],
        "target_x": 2.8,
    }
    columns = [
        "config",
        "max_concurrent_seqs",
        "mean_decode_batch",
        "decode_tokens_per_s",
        "decode_tokens_per_s_min",
        "decode_tokens_per_s_max",
        "decode_throughput_x",
        "saturated_decode_tokens_per_s",
        "saturated_decode_throughput_x",
        "concurrency_x",
        "e2e_tokens_per_s",
        "e2e_throughput_x",
        "preemptions",
        "mean_kept_fraction",
        "wall_s",
    ]
    name = "decode_smoke" if args.smoke else "decode"
    write_results(
        name,
        rows,
        columns=columns,
        summary=summary,
        title="Decode throughput at a fixed KV pool: dense vs ZipVL",
        notes=__doc__.split("\n\n")[1],
        out_dir=args.out_dir,
    )
    for row in rows:
        print(
            f"{row['config']:>28}: {row['max_concurrent_seqs']:4d} seqs  {row['decode_tokens_per_s']:8.1f} tok/s"
            f"  x{row['decode_throughput_x']:.2f}  saturated x{row['saturated_decode_throughput_x']:.2f}"
        )
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
