"""Fidelity of ZipVL on the trained ``zipvl-tiny``: what it keeps and what it loses, against baselines.

``python benchmarks/fidelity.py [--model zipvl-tiny] [--samples 64] [--smoke]``

On the held-out test splits of :mod:`zipvl_ray.data` (``short``: one picture, about 110 tokens;
``long``: 16-64 video frames, 1,000-4,100 tokens), with greedy decoding through the reference path
(``model.generate(..., past_key_values=ZipVLCache(model))``), it measures

1. dense accuracy, and ZipVL across ``tau`` (0.90-1.0) with the achieved mean kept ratio (mean over
   layers of kept / prompt tokens) and the attention-FLOPs reduction;
2. at the mean budget ZipVL reaches at given ``tau`` values: a fixed per-layer ratio
   (``min_keep_ratio = max_keep_ratio = budget``, same scores), a FastV-style rule (two dense layers,
   then the visual tokens the last prompt token attends to least are dropped, :mod:`fidelity_fastv`)
   and random selection (ZipVL's count, ``select_metric="random"``);
3. the paper's ablations (its Tables C and D): probe choice (64 recent + 64 random, 64 recent, 128
   recent, 128 random, all) and the metrics of the count and of the selection;
4. kept ratio per layer by task.

Writes ``benchmarks/results/fidelity.json`` / ``.md`` and ``fidelity_tradeoff.png`` /
``fidelity_layers.png``. Every configuration runs on the same samples in one process; ratios are
relative to dense. To evaluate through another serving path, implement :class:`Backend` (one method)
and pass it to :func:`run_benchmark`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, write_results  # noqa: E402
from benchmarks.fidelity_fastv import FastVCache, FastVConfig, matched_visual_keep_ratio  # noqa: E402
from zipvl_ray.cache import ZipVLCache  # noqa: E402
from zipvl_ray.config import ZipVLConfig  # noqa: E402
from zipvl_ray.data import Sample, make_split  # noqa: E402
from zipvl_ray.sparsity import attention_flops_reduction  # noqa: E402

TAUS = (0.90, 0.925, 0.95, 0.97, 0.975, 0.98, 0.99, 0.995, 1.0)
MATCH_TAUS = (0.95, 0.975, 0.99)
HEADLINE_TAU = 0.975
DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "zipvl.yaml"
ALL_PROBES = 1_000_000  # a probe count >= any prompt length: every position is a probe

PROBE_ABLATIONS = {
    "64 recent + 64 random": dict(probe_recent=64, probe_random=64),
    "64 recent": dict(probe_recent=64, probe_random=0),
    "128 recent": dict(probe_recent=128, probe_random=0),
    "128 random": dict(probe_recent=0, probe_random=128),
    "all": dict(probe_recent=ALL_PROBES, probe_random=0),
}
METRIC_ABLATIONS = {
    f"count {count} / select {select}": dict(count_metric=count, select_metric=select)
    for count in ("accumulated", "normalized")
    for select in ("accumulated", "normalized")
}


# ---------------------------------------------------------------------------------------------------
# Methods, answers, results
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One way of prefilling: dense, ZipVL under some config, or FastV at some budget.

    Attributes
    ----------
    name : str
        Label in the tables.
    family : str
        ``dense``, ``zipvl``, ``fixed``, ``fastv``, ``random``, ``probes`` or ``metric``.
    zipvl : ZipVLConfig or None
        Config of the ZipVL cache (None for FastV).
    fastv_budget : float or None
        Mean kept fraction FastV is matched to (per sample, see :func:`matched_visual_keep_ratio`).
    tau : float or None
        The tau shown in the tables (the budget's tau for matched baselines).
    """

    name: str
    family: str
    zipvl: ZipVLConfig | None = None
    fastv_budget: float | None = None
    tau: float | None = None


@dataclass
class Answer:
    """One generated answer and what the prefill kept.

    Attributes
    ----------
    task, expected, text : str
    correct : bool
        ``text`` (stripped) equals ``expected``.
    prompt_tokens : int
    kept_per_layer : list[int]
        Prompt tokens each decoder layer kept.
    """

    task: str
    expected: str
    text: str
    correct: bool
    prompt_tokens: int
    kept_per_layer: list[int]

    @property
    def kept_ratios(self) -> list[float]:
        return [k / self.prompt_tokens for k in self.kept_per_layer]

    @property
    def mean_kept_ratio(self) -> float:
        return sum(self.kept_ratios) / len(self.kept_ratios)

    @property
    def flops_reduction(self) -> float:
        return attention_flops_reduction(self.kept_per_layer, self.prompt_tokens)


@dataclass
class MethodResult:
    """Aggregate of one method on one split."""

    split: str
    method: Method
    answers: list[Answer] = field(repr=False)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return sum(a.correct for a in self.answers) / len(self.answers)

    @property
    def mean_kept_ratio(self) -> float:
        return sum(a.mean_kept_ratio for a in self.answers) / len(self.answers)

    @property
    def flops_reduction(self) -> float:
        return sum(a.flops_reduction for a in self.answers) / len(self.answers)

    def task_accuracy(self) -> dict[str, float]:
        tasks = sorted({a.task for a in self.answers})
        return {t: _mean([a.correct for a in self.answers if a.task == t]) for t in tasks}

    def layer_ratios(self, task: str | None = None) -> list[float]:
        """Mean kept ratio per layer (over the answers of ``task``, or all)."""
        chosen = [a.kept_ratios for a in self.answers if task is None or a.task == task]
        return [_mean(col) for col in zip(*chosen, strict=True)]

    def row(self, dense_accuracy: float) -> dict:
        return {
            "split": self.split,
            "family": self.method.family,
            "method": self.method.name,
            "tau": self.method.tau if self.method.tau is not None else "",
            "accuracy": self.accuracy,
            "vs_dense": self.accuracy / dense_accuracy if dense_accuracy else float("nan"),
            "kept_ratio": self.mean_kept_ratio,
            "flops_reduction": self.flops_reduction,
            "samples": len(self.answers),
            "seconds": self.seconds,
            "task_accuracy": self.task_accuracy(),
            "layer_kept_ratio": self.layer_ratios(),
            "layer_kept_ratio_by_task": {t: self.layer_ratios(t) for t in self.task_accuracy()},
        }


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------------
# Backends: the serving path the answers come from
# ---------------------------------------------------------------------------------------------------


class Backend(Protocol):
    """Answers one sample with one method. Swap the reference path for the engine by passing another."""

    def answer(self, sample: Sample, method: Method) -> Answer: ...


class ReferenceBackend:
    """Greedy ``model.generate`` with a :class:`ZipVLCache` (or a :class:`FastVCache`), one sample at a time."""

    def __init__(self, model, processor, *, max_new_tokens: int = 10):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self._inputs: dict[tuple, dict] = {}  # by sample identity (split, partition, index, task, question)

    def inputs(self, sample: Sample) -> dict:
        key = (sample.split, sample.partition, sample.index, sample.task, sample.question)
        if key not in self._inputs:
            prompt = self.processor.apply_chat_template(
                sample.messages(), add_generation_prompt=True, tokenize=False
            )
            self._inputs[key] = dict(
                self.processor(text=[prompt], images=sample.images(), return_tensors="pt")
            )
        return self._inputs[key]

    def cache(self, inputs: dict, method: Method):
        if method.fastv_budget is None:
            return ZipVLCache(self.model, method.zipvl)
        image_mask = inputs["input_ids"][0] == self.processor.image_token_id
        n, visual = image_mask.numel(), int(image_mask.sum())
        ratio = matched_visual_keep_ratio(method.fastv_budget, self.num_layers, 2, n, visual)
        return FastVCache(self.model, image_mask, FastVConfig(dense_layers=2, visual_keep_ratio=ratio))

    @torch.no_grad()
    def answer(self, sample: Sample, method: Method) -> Answer:
        inputs = self.inputs(sample)
        cache = self.cache(inputs, method)
        out = self.model.generate(
            **inputs, past_key_values=cache, max_new_tokens=self.max_new_tokens, do_sample=False
        )
        n = inputs["input_ids"].shape[1]
        text = self.processor.tokenizer.decode(out[0, n:], skip_special_tokens=True).strip()
        kept = [layer[0] for layer in cache.stats().prompt_kept_per_layer]
        return Answer(sample.task, sample.answer, text, text == sample.answer, n, kept)


# ---------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------


def zipvl_method(tau: float, family: str = "zipvl", name: str | None = None, **overrides) -> Method:
    return Method(name or f"ZipVL tau={tau}", family, ZipVLConfig(tau=tau, **overrides), tau=tau)


def evaluate(backend: Backend, split: str, samples: list[Sample], method: Method, log=print) -> MethodResult:
    start = time.perf_counter()
    answers = [backend.answer(sample, method) for sample in samples]
    result = MethodResult(split, method, answers, time.perf_counter() - start)
    log(
        f"  {split:6s} {method.name:42s} acc {result.accuracy:.3f} kept {result.mean_kept_ratio:.3f} "
        f"attention flops saved {result.flops_reduction:.3f} ({result.seconds:.0f}s)"
    )
    return result


def parse_split_samples(items: Iterable[str]) -> dict[str, int]:
    """``["short=192", "long=64"]`` -> ``{"short": 192, "long": 64}`` (the ``--split-samples`` option)."""
    counts = {}
    for item in items:
        name, sep, size = item.partition("=")
        if not sep or not size.isdigit():
            raise ValueError(f"--split-samples takes SPLIT=N items, not {item!r}")
        counts[name] = int(size)
    return counts


def fixed_ratio_config(
    tau: float, budget: float, num_layers: int, dense_layers: Iterable[int] = ()
) -> ZipVLConfig:
    """The fixed-ratio baseline at a mean budget: ``dense_layers`` dense, every other layer the same ratio.

    The ratio ``r`` solves ``(len(dense_layers) + (L - len(dense_layers)) * r) / L = budget`` (clamped
    to ``[0, 1]``), so the mean kept ratio over layers matches ``budget`` up to rounding.
    """
    dense = sorted(set(dense_layers))
    pruned = num_layers - len(dense)
    ratio = budget if pruned == num_layers else (num_layers * budget - len(dense)) / max(pruned, 1)
    ratio = min(1.0, max(0.0, ratio))
    return ZipVLConfig(tau=tau, dense_layers=dense, min_keep_ratio=ratio, max_keep_ratio=ratio)


def load_base(path: str | Path | None) -> dict:
    """The served ZipVL setting of a Serve config file (its first application's ``args.zipvl``), less ``tau``.

    ``None`` or ``"none"`` gives ``{}``: the paper's ZipVL (every layer pruned, no floor).
    """
    if path is None or str(path) == "none":
        return {}
    import yaml

    app = yaml.safe_load(Path(path).read_text())["applications"][0]
    base = dict(app.get("args", {}).get("zipvl") or {})
    base.pop("tau", None)
    base.pop("enabled", None)
    ZipVLConfig(**base)  # fails early on a bad setting
    return base


def run_benchmark(
    backend: Backend,
    splits: dict[str, list[Sample]],
    *,
    taus: Iterable[float] = TAUS,
    match_taus: Iterable[float] = MATCH_TAUS,
    ablations: bool | Iterable[str] = True,
    base: dict | None = None,
    log=print,
) -> list[MethodResult]:
    """Every method on every split, in one process, on the same samples.

    ``ablations``: True (every split), False (none) or the names of the splits that get them.
    ``base``: :class:`ZipVLConfig` fields every ZipVL row of the sweep and of the matched budget uses
    (the served setting, e.g. ``{"dense_layers": [0], "min_keep_ratio": 0.3}``); the fixed ratio keeps
    the same dense layers. The ablations run the paper's plain ZipVL (no dense layer, no floor), so
    that they isolate the probe and metric choices as its Tables C and D do.
    """
    base = dict(base or {})
    num_layers = getattr(backend, "num_layers", None)
    results: list[MethodResult] = []
    for split, samples in splits.items():
        log(f"split {split}: {len(samples)} samples")
        results.append(
            evaluate(backend, split, samples, Method("dense", "dense", ZipVLConfig(enabled=False)), log)
        )
        by_tau = {}
        for tau in sorted(set(taus) | set(match_taus) | {HEADLINE_TAU}):
            by_tau[tau] = evaluate(backend, split, samples, zipvl_method(tau, **base), log)
            results.append(by_tau[tau])
        for tau in match_taus:
            budget = by_tau[tau].mean_kept_ratio
            label = f"@ budget {budget:.3f} (ZipVL tau={tau})"
            if num_layers is None or not base.get("dense_layers"):
                fixed = ZipVLConfig(tau=tau, min_keep_ratio=budget, max_keep_ratio=budget)
            else:
                fixed = fixed_ratio_config(tau, budget, num_layers, base["dense_layers"])
            for method in (
                Method(f"fixed ratio {label}", "fixed", fixed, tau=tau),
                Method(f"FastV K=2 {label}", "fastv", fastv_budget=budget, tau=tau),
                zipvl_method(
                    tau,
                    "random",
                    f"random selection (ZipVL count, tau={tau})",
                    **{**base, "select_metric": "random"},
                ),
            ):
                results.append(evaluate(backend, split, samples, method, log))
        if ablations is True or (not isinstance(ablations, bool) and split in set(ablations)):
            for name, overrides in PROBE_ABLATIONS.items():
                method = zipvl_method(HEADLINE_TAU, "probes", f"probes: {name}", **overrides)
                results.append(evaluate(backend, split, samples, method, log))
            for name, overrides in METRIC_ABLATIONS.items():
                method = zipvl_method(HEADLINE_TAU, "metric", name, **overrides)
                results.append(evaluate(backend, split, samples, method, log))
    return results


def headline_result(results: list[MethodResult], split: str) -> MethodResult | None:
    """ZipVL at the headline tau on ``split``, if it was run."""
    return next(
        (
            r
            for r in results
            if r.split == split and r.method.family == "zipvl" and r.method.tau == HEADLINE_TAU
        ),
        None,
    )


def summarize(results: list[MethodResult]) -> tuple[list[dict], dict]:
    """Table rows (with ``vs_dense``) and headline figures per split."""
    dense = {r.split: r.accuracy for r in results if r.method.family == "dense"}
    rows = [r.row(dense[r.split]) for r in results]
    summary: dict = {}
    for split in dense:
        summary[f"{split}: dense accuracy"] = dense[split]
        head = headline_result(results, split)
        if head is None:
            continue
        summary[f"{split}: ZipVL tau={HEADLINE_TAU} accuracy"] = head.accuracy
        summary[f"{split}: ZipVL tau={HEADLINE_TAU} vs dense"] = (
            head.accuracy / dense[split] if dense[split] else 0
        )
        summary[f"{split}: ZipVL tau={HEADLINE_TAU} kept ratio"] = head.mean_kept_ratio
        summary[f"{split}: ZipVL tau={HEADLINE_TAU} attention FLOPs reduction"] = head.flops_reduction
        for family in ("fixed", "fastv", "random"):
            match = next(
                (
                    r
                    for r in results
                    if r.split == split and r.method.family == family and r.method.tau == HEADLINE_TAU
                ),
                None,
            )
            if match is not None:
                summary[f"{split}: {family} @ same budget accuracy"] = match.accuracy
                summary[f"{split}: {family} @ same budget kept ratio"] = match.mean_kept_ratio
        for match in results:
            if match.split != split or match.method.family not in ("fixed", "fastv", "random"):
                continue
            zipvl = next(
                r
                for r in results
                if r.split == split and r.method.family == "zipvl" and r.method.tau == match.method.tau
            )
            zipvl_only, other_only, p_value = paired_comparison(zipvl, match)
            family, tau = match.method.family, match.method.tau
            summary[f"{split}: tau={tau}, answers only ZipVL / only {family} got right"] = (
                f"{zipvl_only} / {other_only} (exact McNemar p = {p_value:.3g})"
            )
    return rows, summary


def paired_comparison(a: MethodResult, b: MethodResult) -> tuple[int, int, float]:
    """Paired comparison of two methods on the same samples: exact two-sided McNemar test.

    Returns
    -------
    a_only, b_only : int
        Samples only ``a`` (only ``b``) answered correctly.
    p_value : float
        Probability, if neither method is better, of a split of the ``a_only + b_only`` discordant
        samples at least this uneven (binomial with p = 1/2; 1.0 when there is none).
    """
    if len(a.answers) != len(b.answers):
        raise ValueError("paired comparison needs the same samples")
    a_only = sum(x.correct and not y.correct for x, y in zip(a.answers, b.answers, strict=True))
    b_only = sum(y.correct and not x.correct for x, y in zip(a.answers, b.answers, strict=True))
    n, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 0.5
    return a_only, b_only, min(1.0, 2 * tail)


def plot(results: list[MethodResult], out_dir: Path) -> list[Path]:
    """``fidelity_tradeoff.png`` (accuracy vs kept ratio) and ``fidelity_layers.png`` (kept ratio per layer by task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(r.split for r in results))
    paths = []
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.5), squeeze=False)
    markers = {"fixed": "s", "fastv": "^", "random": "x", "dense": "*"}
    for ax, split in zip(axes[0], splits, strict=True):
        mine = [r for r in results if r.split == split]
        sweep = sorted((r for r in mine if r.method.family == "zipvl"), key=lambda r: r.mean_kept_ratio)
        ax.plot(
            [r.mean_kept_ratio for r in sweep], [r.accuracy for r in sweep], "o-", label="ZipVL (tau sweep)"
        )
        for r in sweep:
            ax.annotate(
                f"{r.method.tau}",
                (r.mean_kept_ratio, r.accuracy),
                fontsize=7,
                xytext=(3, -9),
                textcoords="offset points",
            )
        for family, marker in markers.items():
            points = sorted((r for r in mine if r.method.family == family), key=lambda r: r.mean_kept_ratio)
            if points:
                label = {
                    "fixed": "fixed ratio",
                    "fastv": "FastV K=2",
                    "random": "random selection",
                    "dense": "dense",
                }[family]
                ax.plot(
                    [r.mean_kept_ratio for r in points],
                    [r.accuracy for r in points],
                    marker,
                    linestyle="--" if family != "dense" else "",
                    label=label,
                )
        ax.set_title(f"{split} split")
        ax.set_xlabel("mean kept ratio (over layers)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths.append(out_dir / "fidelity_tradeoff.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        head = headline_result(results, split)
        if head is None:
            continue
        for task in head.task_accuracy():
            ratios = head.layer_ratios(task)
            ax.plot(range(len(ratios)), ratios, "o-", label=task)
        ax.set_title(f"{split}: ZipVL tau={HEADLINE_TAU}, kept ratio per layer")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("kept / prompt tokens")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "fidelity_layers.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


SMOKE_SPLIT_SIZES = {"short": 4, "medium": 3}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="zipvl-tiny", help="built-in name or checkpoint directory")
    parser.add_argument("--samples", type=int, default=64, help="test samples per split")
    parser.add_argument("--splits", nargs="+", default=["short", "long"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--taus", type=float, nargs="+", default=list(TAUS), help="ZipVL tau sweep")
    parser.add_argument(
        "--match-taus",
        type=float,
        nargs="+",
        default=list(MATCH_TAUS),
        help="budgets the baselines are matched to",
    )
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument(
        "--ablation-splits",
        nargs="+",
        default=None,
        help="splits that get the probe and metric ablations (default: every split)",
    )
    parser.add_argument(
        "--split-samples",
        nargs="+",
        default=[],
        metavar="SPLIT=N",
        help="per-split sample counts overriding --samples, e.g. short=64 long=32",
    )
    parser.add_argument(
        "--zipvl-config",
        default=str(DEFAULT_SERVE_CONFIG),
        help="Serve config whose ZipVL setting (besides tau) every ZipVL row uses; 'none': the paper's plain ZipVL",
    )
    parser.add_argument("--smoke", action="store_true", help="a few samples, few methods, seconds")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from zipvl_ray.models import load_model

    model, processor = load_model(args.model, device="cpu")
    backend = ReferenceBackend(model, processor)
    base = load_base(args.zipvl_config)
    if args.smoke:
        splits = {name: make_split(name, "test", size) for name, size in SMOKE_SPLIT_SIZES.items()}
        results = run_benchmark(
            backend, splits, taus=(0.975,), match_taus=(0.975,), ablations=False, base=base
        )
    else:
        sizes = {name: args.samples for name in args.splits} | parse_split_samples(args.split_samples)
        splits = {name: make_split(name, "test", sizes[name]) for name in args.splits}
        ablations = False if args.no_ablations else (args.ablation_splits if args.ablation_splits else True)
        results = run_benchmark(
            backend, splits, taus=args.taus, match_taus=args.match_taus, ablations=ablations, base=base
        )
    rows, summary = summarize(results)
    summary["ZipVL setting (besides tau)"] = json.dumps(base)
    name = "fidelity_smoke" if args.smoke else "fidelity"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    columns = [
        "split",
        "family",
        "method",
        "tau",
        "accuracy",
        "vs_dense",
        "kept_ratio",
        "flops_reduction",
        "samples",
    ]
    notes = (
        f"Model `{args.model}`, greedy decoding through `model.generate(..., past_key_values=ZipVLCache(model))`; "
        "kept_ratio = mean over layers of kept / prompt tokens; flops_reduction = 1 - mean_l (kept_l / n)^2. "
        "Per-task accuracy and per-layer kept ratios are in the JSON file. "
        f"ZipVL setting besides tau (from `{args.zipvl_config}`): `{json.dumps(base)}`; the fixed ratio keeps "
        "the same dense layers; the probe and metric ablations run the paper's plain ZipVL. "
        f"Command: `python benchmarks/fidelity.py {' '.join(sys.argv[1:] if argv is None else argv)}`."
    )
    json_path, md_path = write_results(
        name,
        rows,
        columns=columns,
        summary=summary,
        title=f"Fidelity of ZipVL on {args.model}",
        notes=notes,
        out_dir=args.out_dir,
    )
    pngs = plot(results, args.out_dir) if not args.smoke else []
    print(f"wrote {json_path}, {md_path}" + "".join(f", {p}" for p in pngs))
    return {"rows": rows, "summary": summary, "paths": [json_path, md_path, *pngs]}


if __name__ == "__main__":
    main()
