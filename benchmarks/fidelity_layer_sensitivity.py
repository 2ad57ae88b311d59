"""Which layer does ZipVL's adaptive count starve? Prune one decoder layer at a time.

``python -m benchmarks.fidelity_layer_sensitivity [--split-samples short=192 long=64] [--taus 0.5 0.85]
[--fixed-ratio 0.05] [--smoke]``

On the ``val`` partition (a diagnostic that informs choices, so never ``test``), for each decoder
layer ``l`` of the model it answers every sample with only layer ``l`` pruned (every other layer in
:attr:`~zipvl_ray.config.ZipVLConfig.dense_layers`), once with ZipVL's adaptive count at each ``tau``
and once with a fixed ratio (``min_keep_ratio = max_keep_ratio``, ranked by the same scores). Beside
the whole-model runs (ZipVL at each ``tau`` in every layer, and the fixed ratio in every layer), the
rows say how much each layer keeps and what pruning it alone costs: a layer whose accuracy falls while
ZipVL keeps less there than the fixed ratio does is one the attention-mass count under-serves.

Writes ``benchmarks/results/fidelity_layer_sensitivity.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.fidelity import Method, ReferenceBackend, evaluate, parse_split_samples, zipvl_method
from zipvl_ray.config import ZipVLConfig
from zipvl_ray.data import make_split

RESULTS = Path(__file__).resolve().parent / "results"
TAUS = (0.5, 0.85)
FIXED_RATIO = 0.05


def fixed_method(ratio: float, dense_layers=()) -> Method:
    """A fixed ratio in every layer but ``dense_layers`` (same scores as ZipVL)."""
    config = ZipVLConfig(tau=1.0, min_keep_ratio=ratio, max_keep_ratio=ratio, dense_layers=list(dense_layers))
    return Method(f"fixed {ratio}", "fixed", config)


def run(
    model_name: str,
    split_samples: dict[str, int],
    taus=TAUS,
    fixed_ratio: float = FIXED_RATIO,
    layers: list[int] | None = None,
    log=print,
) -> list[dict]:
    """Rows ``{split, method, tau, pruned_layer, accuracy, vs_dense, kept_ratio, layer_kept}``.

    ``pruned_layer`` is ``None`` for the whole-model rows (every layer pruned; dense: nothing pruned);
    ``layer_kept`` is the pruned layer's mean kept ratio (the whole-model rows: every layer's).
    """
    from zipvl_ray.models import load_model

    model, processor = load_model(model_name, device="cpu")
    backend = ReferenceBackend(model, processor)
    num_layers = model.config.get_text_config().num_hidden_layers
    layers = list(range(num_layers)) if layers is None else layers
    rows = []
    for split, count in split_samples.items():
        samples = make_split(split, "val", count)
        dense = evaluate(backend, split, samples, Method("dense", "dense", ZipVLConfig(enabled=False)), log)
        rows.append(_row(split, "dense", None, None, dense, dense.accuracy))
        for tau in taus:
            result = evaluate(backend, split, samples, zipvl_method(tau), log)
            rows.append(_row(split, "zipvl", tau, None, result, dense.accuracy))
        result = evaluate(backend, split, samples, fixed_method(fixed_ratio), log)
        rows.append(_row(split, f"fixed {fixed_ratio}", None, None, result, dense.accuracy))
        for layer in layers:
            others = [i for i in range(num_layers) if i != layer]
            for tau in taus:
                name = f"ZipVL tau={tau} layer {layer} only"
                result = evaluate(
                    backend, split, samples, zipvl_method(tau, name=name, dense_layers=others), log
                )
                rows.append(_row(split, "zipvl", tau, layer, result, dense.accuracy))
            result = evaluate(backend, split, samples, fixed_method(fixed_ratio, others), log)
            rows.append(_row(split, f"fixed {fixed_ratio}", None, layer, result, dense.accuracy))
    return rows


def _row(split, method, tau, layer, result, dense_accuracy) -> dict:
    ratios = result.layer_ratios()
    return {
        "split": split,
        "samples": len(result.answers),
        "method": method,
        "tau": tau,
        "pruned_layer": layer,
        "accuracy": result.accuracy,
        "vs_dense": result.accuracy / dense_accuracy if dense_accuracy else None,
        "kept_ratio": result.mean_kept_ratio,
        "layer_kept": [round(r, 4) for r in ratios] if layer is None else round(ratios[layer], 4),
    }


def markdown(rows: list[dict]) -> str:
    """One table per split: a row per pruned layer, a column pair (accuracy, layer kept) per method."""
    out = []
    for split in dict.fromkeys(r["split"] for r in rows):
        mine = [r for r in rows if r["split"] == split]
        methods = list(dict.fromkeys((r["method"], r["tau"]) for r in mine if r["method"] != "dense"))
        labels = [m if t is None else f"ZipVL tau={t}" for m, t in methods]
        dense = next(r for r in mine if r["method"] == "dense")
        out.append(f"## {split} ({dense['samples']} val samples, dense accuracy {dense['accuracy']:.3f})\n")
        out.append("| pruned | " + " | ".join(f"{lab}: accuracy | {lab}: kept" for lab in labels) + " |")
        out.append("|---" * (1 + 2 * len(labels)) + "|")
        by_key = {(r["method"], r["tau"], r["pruned_layer"]): r for r in mine}
        for layer in dict.fromkeys(r["pruned_layer"] for r in mine if r["method"] != "dense"):
            cells = []
            for method, tau in methods:
                r = by_key[(method, tau, layer)]
                kept = r["kept_ratio"] if layer is None else r["layer_kept"]
                cells.append(f"{r['accuracy']:.3f} | {kept:.3f}")
            out.append(
                f"| {'every layer' if layer is None else f'layer {layer} only'} | " + " | ".join(cells) + " |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="zipvl-tiny")
    parser.add_argument("--split-samples", nargs="+", default=["short=192", "long=64"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
    parser.add_argument("--fixed-ratio", type=float, default=FIXED_RATIO)
    parser.add_argument("--smoke", action="store_true", help="two samples, one tau, layers 0-1 (tests)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split_samples = parse_split_samples(args.split_samples)
    taus, layers = tuple(args.taus), None
    if args.smoke:
        split_samples, taus, layers = {"short": 2}, (0.5,), [0, 1]
    start = time.perf_counter()
    rows = run(args.model, split_samples, taus, args.fixed_ratio, layers)
    seconds = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.fidelity_layer_sensitivity " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    record = {"model": args.model, "seconds": seconds, "command": command.strip(), "rows": rows}
    (args.out_dir / "fidelity_layer_sensitivity.json").write_text(json.dumps(record, indent=2))
    text = markdown(rows)
    (args.out_dir / "fidelity_layer_sensitivity.md").write_text(
        f"# One pruned layer at a time on {args.model}\n\nAccuracy with only the named layer pruned "
        "(every other layer dense), and that layer's mean kept ratio; the `every layer` row prunes all "
        f"of them (its kept column: the mean over layers). `{command.strip()}`, {seconds:.0f} s.\n\n" + text
    )
    print(text)
    return rows


if __name__ == "__main__":
    main()
