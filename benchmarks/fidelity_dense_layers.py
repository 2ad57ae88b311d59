"""Which decoder layers must stay dense for ZipVL to keep zipvl-tiny's answers?

``python benchmarks/fidelity_dense_layers.py [--split-samples short=96 medium=48 long=48] [--smoke]``

On the held-out test splits, ZipVL at each ``tau`` with ``dense_layers`` = none, ``[0]`` and
``[0, 1]`` (:attr:`zipvl_ray.config.ZipVLConfig.dense_layers`: no selection and no eviction there),
beside dense, through the same reference path as :mod:`benchmarks.fidelity`. The checkpoint of
2026-11 fetched the answer's evidence in layer 0 (its results, in ``benchmarks/results/
fidelity_lucky_lr2e-3/``, are why this script exists); today's retrieves in layers 2-4, and
:mod:`benchmarks.fidelity_layer_sensitivity` measures what pruning each layer alone costs. Writes
``benchmarks/results/fidelity_dense_layers.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.fidelity import Method, ReferenceBackend, evaluate, parse_split_samples, zipvl_method
from zipvl_ray.config import ZipVLConfig
from zipvl_ray.data import make_split

RESULTS = Path(__file__).resolve().parent / "results"
DENSE_LAYER_SETS: tuple[tuple[int, ...], ...] = ((), (0,), (0, 1))
TAUS = (0.95, 0.975, 0.99)


def run(model_name: str, split_samples: dict[str, int], taus=TAUS, layer_sets=DENSE_LAYER_SETS, log=print):
    """Rows ``{split, dense_layers, tau, accuracy, vs_dense, kept_ratio, flops_reduction}`` (dense: tau None)."""
    from zipvl_ray.models import load_model

    model, processor = load_model(model_name, device="cpu")
    backend = ReferenceBackend(model, processor)
    rows = []
    for split, count in split_samples.items():
        samples = make_split(split, "test", count)
        dense = evaluate(backend, split, samples, Method("dense", "dense", ZipVLConfig(enabled=False)), log)
        rows.append(_row(split, None, None, dense, dense.accuracy))
        for layers in layer_sets:
            for tau in taus:
                name = f"ZipVL tau={tau} dense_layers={list(layers)}"
                result = evaluate(
                    backend, split, samples, zipvl_method(tau, name=name, dense_layers=list(layers)), log
                )
                rows.append(_row(split, list(layers), tau, result, dense.accuracy))
    return rows


def _row(split, layers, tau, result, dense_accuracy):
    return {
        "split": split,
        "samples": len(result.answers),
        "dense_layers": layers,
        "tau": tau,
        "accuracy": result.accuracy,
        "vs_dense": result.accuracy / dense_accuracy if dense_accuracy else None,
        "kept_ratio": result.mean_kept_ratio,
        "flops_reduction": result.flops_reduction,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| split | samples | dense layers | tau | accuracy | vs dense | kept ratio | attention FLOPs saved |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        layers = "all (dense)" if r["tau"] is None else (", ".join(map(str, r["dense_layers"])) or "none")
        tau = "-" if r["tau"] is None else f"{r['tau']}"
        vs = "-" if r["vs_dense"] is None else f"{r['vs_dense']:.2f}"
        lines.append(
            f"| {r['split']} | {r['samples']} | {layers} | {tau} | {r['accuracy']:.3f} | {vs} | "
            f"{r['kept_ratio']:.3f} | {r['flops_reduction']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="zipvl-tiny")
    parser.add_argument("--split-samples", nargs="+", default=["short=96", "medium=48", "long=48"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
    parser.add_argument("--smoke", action="store_true", help="two samples of one split, one tau (tests)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split_samples = parse_split_samples(args.split_samples)
    taus, layer_sets = tuple(args.taus), DENSE_LAYER_SETS
    if args.smoke:
        split_samples, taus, layer_sets = {"short": 2}, (0.975,), ((), (0,))
    start = time.perf_counter()
    rows = run(args.model, split_samples, taus, layer_sets)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = {"model": args.model, "seconds": time.perf_counter() - start, "rows": rows}
    (args.out_dir / "fidelity_dense_layers.json").write_text(json.dumps(record, indent=2))
    (args.out_dir / "fidelity_dense_layers.md").write_text(
        f"# ZipVL with dense layers on {args.model}\n\n" + markdown(rows)
    )
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
