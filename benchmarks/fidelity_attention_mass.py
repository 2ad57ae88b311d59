"""Where does each layer's attention mass go, and would a count over the visual tokens alone differ?

``python -m benchmarks.fidelity_attention_mass [--split-samples short=96 long=24] [--tau 0.975] [--smoke]``

A diagnostic on the ``val`` partition (never ``test``). ZipVL sizes each layer's kept set by the share of
the probe rows' attention mass a few keys carry (the adaptive count at ``tau``). On ``zipvl-tiny`` that
count under-serves the retrieval layers (docs/fidelity.md, "Below the served budget"): do they spend
their mass on an attention sink or on the text, so that the count is spent there instead of on the image?
For every sample this script runs the model densely with eager attention and takes each layer's
attention of the last ``--rows`` prompt positions (ZipVL's recent probes; its random probes are left
out), averaged over heads and rows. Per layer, averaged over samples:

* ``sink`` / ``image`` / ``text``: the mass on position 0, on the image tokens, on the other text;
* ``evidence``: the mass on the image tokens of the cells the answer depends on, and ``evidence_rank``:
  their mean rank among all keys (0 = the most attended key, 1 = the least);
* ``count_all``: the share of all keys the count keeps (the fewest keys that carry ``tau`` of the mass);
* ``count_image_only``: the share of the image tokens a count over the image tokens alone keeps (the
  fewest that carry ``tau`` of the image tokens' mass), against ``image_in_count_all``: the share of the
  image tokens that ``count_all`` keeps.

Writes ``benchmarks/results/fidelity_attention_mass.{json,md}``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import write_results
from benchmarks.fidelity import parse_split_samples
from zipvl_ray.data import make_split

COLUMNS = (
    "sink",
    "image",
    "text",
    "evidence",
    "evidence_rank",
    "count_all",
    "image_in_count_all",
    "count_image_only",
)


def fewest_covering(mass: np.ndarray, tau: float) -> np.ndarray:
    """Indices of the fewest entries of ``mass`` (non-negative, any total) that carry ``tau`` of its sum."""
    order = np.argsort(-mass, kind="stable")
    covered = np.cumsum(mass[order]) / max(mass.sum(), 1e-30)
    return order[: int(np.searchsorted(covered, tau - 1e-12)) + 1]


def layer_figures(attention: np.ndarray, image: np.ndarray, evidence: list[int], tau: float) -> dict:
    """The figures of one layer from ``attention (n,)`` (the probe rows' mean, summing to 1)."""
    n = attention.size
    kept = fewest_covering(attention, tau)
    image_idx = np.nonzero(image)[0]
    kept_image = fewest_covering(attention[image_idx], tau) if image_idx.size else np.array([], dtype=int)
    rank = np.empty(n)
    rank[np.argsort(-attention, kind="stable")] = np.arange(n) / max(n - 1, 1)
    return {
        "sink": float(attention[0]),
        "image": float(attention[image].sum()),
        "text": float(1.0 - attention[0] - attention[image].sum()),
        "evidence": float(attention[evidence].sum()) if evidence else float("nan"),
        "evidence_rank": float(rank[evidence].mean()) if evidence else float("nan"),
        "count_all": kept.size / n,
        "image_in_count_all": float(image[kept].sum() / max(image.sum(), 1)),
        "count_image_only": kept_image.size / max(image_idx.size, 1),
    }


@torch.no_grad()
def run(model_name: str, split_samples: dict[str, int], tau: float, rows: int, log=print) -> list[dict]:
    from zipvl_ray.models import load_model

    model, processor = load_model(model_name, device="cpu")
    model.set_attn_implementation("eager")  # the attention probabilities themselves
    image_token_id = processor.image_token_id
    out_rows = []
    for split, count in split_samples.items():
        figures: list[list[dict]] = []
        for sample in make_split(split, "val", count):
            prompt = processor.apply_chat_template(
                sample.messages(), add_generation_prompt=True, tokenize=False
            )
            inputs = processor(text=[prompt], images=sample.images(), return_tensors="pt")
            ids = inputs["input_ids"][0]
            image = (ids == image_token_id).numpy()
            positions = np.nonzero(image)[0]
            per_image = positions.size // max(sample.num_frames, 1)
            side = int(round(per_image**0.5))
            evidence = [
                int(positions[f * per_image + r * side + c])
                for f, r, c in sample.evidence
                if f * per_image + r * side + c < positions.size
            ]
            attentions = model(**inputs, output_attentions=True).attentions
            figures.append(
                [
                    layer_figures(
                        (a := layer[0, :, -rows:, :].float().mean(dim=(0, 1)).numpy()) / a.sum(),
                        image,
                        evidence,
                        tau,
                    )
                    for layer in attentions
                ]
            )
        for layer in range(len(figures[0])):
            row = {"split": split, "samples": len(figures), "layer": layer}
            for key in COLUMNS:
                values = [f[layer][key] for f in figures if not np.isnan(f[layer][key])]
                row[key] = float(np.mean(values)) if values else float("nan")
            out_rows.append(row)
        log(f"{split}: {len(figures)} samples")
    return out_rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="zipvl-tiny")
    parser.add_argument("--split-samples", nargs="+", default=["short=96", "long=24"])
    parser.add_argument("--tau", type=float, default=0.975)
    parser.add_argument(
        "--rows", type=int, default=64, help="Last prompt positions averaged (recent probes)."
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="two short samples (tests)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split_samples = {"short": 2} if args.smoke else parse_split_samples(args.split_samples)
    start = time.perf_counter()
    rows = run(args.model, split_samples, args.tau, args.rows)
    write_results(
        "fidelity_attention_mass-smoke" if args.smoke else "fidelity_attention_mass",
        rows,
        columns=["split", "samples", "layer", *COLUMNS],
        summary={
            "model": args.model,
            "tau": args.tau,
            "probe_rows": args.rows,
            "partition": "val",
            "seconds": time.perf_counter() - start,
        },
        title=f"Where each layer's attention mass goes ({args.model}, val)",
        notes=(
            f"Dense, eager attention; each layer's attention of the last {args.rows} prompt positions, mean "
            "over heads and rows, then over samples. count_all: share of all keys carrying tau of the "
            "mass; count_image_only: share of the image tokens carrying tau of the image tokens' mass; "
            "image_in_count_all: share of the image tokens count_all keeps."
        ),
        out_dir=args.out_dir,
    )
    return rows


if __name__ == "__main__":
    main()
