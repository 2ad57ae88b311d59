"""Train ``zipvl-tiny``: ``python -m zipvl_ray.train [--smoke] [--out DIR] [--threads N]``.

The model (:mod:`zipvl_ray.models.zipvl_tiny`) learns the synthetic tasks of :mod:`zipvl_ray.data`
from scratch on CPU: pictures (one image, 64 visual tokens) and videos (2-64 frames, up to 4,096
visual tokens) whose answer sits in one cell of one frame. Only the answer tokens are supervised.

Reproducible: every batch is drawn from the ``train`` partition with a generator seeded by
``(seed, step)``, weights start from ``seed``, and the number of steps is fixed (not a time limit),
and torch runs its deterministic algorithms, so the same command with the same thread count gives the
same checkpoint (bit-identical: two full runs of the default command gave the same
``model.safetensors``, docs/fidelity.md).

Attention concentration
-----------------------
Loss on the answer alone trains where the *question* looks, but leaves the attention rows of the
thousands of visual tokens unconstrained; in a tiny model trained for minutes they stay close to
uniform, unlike the sink-dominated rows of large pretrained VLMs. ``--entropy-weight`` adds the mean
attention entropy (nats) of a random sample of query rows per layer to the loss, a generic pressure
towards peaked attention that every score-based pruning method (ZipVL, fixed ratio, FastV) benefits
from alike. It is computed by the ``"entropy_probe"`` attention function registered below (SDPA for
the output, plus the sampled rows' softmax for the penalty).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from zipvl_ray.data import make_sample, make_split
from zipvl_ray.data.scenes import COLOURS, GRID, PATCH_LABELS, PLURALS, SHAPES, patch_labels
from zipvl_ray.data.splits import SPLITS, Sample, make_conversation
from zipvl_ray.models.zipvl_tiny import (
    ZIPVL_TINY_NAME,
    ZIPVL_TINY_SPEC,
    build_untrained_zipvl_tiny,
    save_checkpoint,
)

#: Where the committed checkpoint lives.
DEFAULT_OUT = Path(__file__).resolve().parent / "checkpoints" / ZIPVL_TINY_NAME
#: The most frames a training video may have: the burned-in timecode has two digits.
MAX_VIDEO_FRAMES = 99
#: Attention implementation key of the text model while training (SDPA + attention loss terms).
TRAIN_ATTN_KEY = "zipvl_tiny_training"


@dataclass
class TrainConfig:
    """Everything that determines a training run.

    Attributes
    ----------
    steps : int
        Optimizer steps.
    tokens_per_step : int
        Approximate prompt tokens per batch (batch size = this // sample length, at least 1).
    lr, min_lr_ratio, warmup_steps, weight_decay, grad_clip : float / int
        AdamW with linear warm-up and cosine decay to ``lr * min_lr_ratio``. At ``lr = 2e-3`` (the
        recipe until 2026-12-06) six of six deterministic seeds failed to form the retrieval circuit
        in the first 800 steps; at 1e-3 every seed screened did (docs/fidelity.md).
    picture_steps : int
        Steps at the start of the second stage that draw only one-picture samples. The decoder's
        retrieval circuit (question word -> image token -> answer) forms after a plateau of about
        400-600 such steps (measured with exact symbolic image features, see ``docs/fidelity.md``);
        pictures cross it at a fraction of the cost of videos, which then reuse the circuit.
    short_fraction : float
        Share of the later steps on one-picture samples (the rest are videos).
    single_fraction : float
        Share of steps whose samples ask one question (the test format); the others are conversations.
    max_turns : int
        Questions per training conversation.
    video_frames : list of (start_fraction, min_frames, max_frames)
        Curriculum: from ``start_fraction`` of the run on, videos have ``min..max`` frames.
    vision_steps : int
        Steps of the first stage, which trains the vision tower alone to name what each patch shows
        (shape, colour, left neighbour, timecode digits; :func:`~zipvl_ray.data.scenes.patch_labels`),
        the part a real VLM inherits from a pretrained CLIP.
    vision_frames_per_step : int
        Frames per vision step.
    feature_source : str
        ``"vision"`` (the model's own image-token embeddings) or ``"concepts"``, a diagnostic: the
        projector's output is replaced by the exact concept embedding of each patch's true labels
        (:meth:`PatchHead.concept_embedding`), which isolates the decoder's learning from the vision
        side's errors. A checkpoint trained so is not a working VLM (its vision side is ignored).
    empty_concept : bool
        Add a fixed "empty cell" vector to the concept embedding of background cells (see
        :meth:`PatchHead.concept_embedding`).
    concept_steps, concept_anneal_steps : int
        Feature teacher forcing (:class:`ConceptFeatures`): the first ``concept_steps`` second-stage
        steps feed the decoder the exact concept embeddings instead of the projector's output, the
        next ``concept_anneal_steps`` blend linearly back to the projector's output. With exact
        features the decoder's retrieval circuit forms in a few hundred picture steps; with its own
        (noisier) features it stays on the answer prior far longer.
    freeze_vision : bool
        Keep the vision tower and projector fixed in the second stage (the language model then learns
        on the image-token embeddings the first stage produced; the patch loss is not used there).
    aux_weight : float
        Weight of the same patch loss during the second stage (when the vision side is not frozen).
    patch_mode : str
        ``"classify"`` (linear heads) or ``"align"`` (regression onto concept embeddings); see
        :class:`PatchHead`.
    patch_features : str
        Where the patch head reads: ``"projector"`` (the image-token embeddings, default) or
        ``"vision"`` (the vision tower's output); see :class:`ProjectorInput`.
    grounding_weight : float
        Weight of the grounding terms (0 turns them off): ``-log`` of the attention mass that the
        first ``grounding_heads`` heads put on the right tokens, for three queries per question, each
        in its own layer (``grounding_layers``): (0) the question's object word ("triangle") on the
        image tokens of every object it names, (1) the last prompt token on that word (and on the
        frame number's digits), (2) the last prompt token on the answer's evidence cells. A
        pretrained VLM brings such retrieval circuits; from scratch, an answer-only loss takes far
        longer than this budget to form them. What is read from the attended tokens (colour, frame
        number, neighbour, count) is learned from the answers alone.
    grounding_layers : tuple[int, int, int]
        Layers of the three roles. Layers 2-4, not 0-2: a model that fetches its evidence in layer 0
        loses it whenever ZipVL prunes layer 0 (a token dropped from a layer's attention is not
        attended there), so it needed dense early layers; retrieval in layers 2-4 leaves the
        first layers free to be pruned like the rest (docs/fidelity.md).
    grounding_heads : int
    entropy_weight : float
        Weight of the attention-entropy penalty (0 turns it off).
    entropy_rows : int
        Query rows sampled per layer and sequence for the penalty.
    entropy_start : float
        Fraction of the steps after which the penalty applies: peaked attention early in training
        saturates the softmax before the retrieval circuits have formed, so they form first.
    early_answer_layers : tuple of int
        Deep supervision: the answer loss is also applied to the residual stream after these decoder
        layers (read through the final norm and the output head), which shortens the gradient path
        to the attention circuits that fetch the answer.
    early_answer_weight : float
        Weight of each early answer loss (0 turns them off).
    seed : int
        Weights and data seed. The default, 1, is the seed of the committed checkpoint
        (``python -m zipvl_ray.train --threads 2`` reproduces it bit for bit).
    eval_every : int
        Steps between validation passes (0: only at the end).
    log_every : int
        Steps between loss lines.
    val_size : int
        Validation samples per split.
    val_splits : tuple of str
        Splits validated (the ``val`` partition).
    """

    steps: int = 4000
    tokens_per_step: int = 2048
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    picture_steps: int = 800
    short_fraction: float = 0.3
    single_fraction: float = 0.25
    max_turns: int = 6
    video_frames: list[tuple[float, int, int]] = field(
        default_factory=lambda: [(0.0, 2, 8), (0.35, 2, 24), (0.6, 8, 64)]
    )
    vision_steps: int = 1500
    vision_frames_per_step: int = 32
    freeze_vision: bool = True
    empty_concept: bool = False
    concept_steps: int = 1400
    concept_anneal_steps: int = 600
    feature_source: str = "vision"
    aux_weight: float = 0.2
    patch_features: str = "projector"
    patch_mode: str = "align"
    grounding_weight: float = 0.3
    grounding_layers: tuple[int, int, int] = (2, 3, 4)
    grounding_heads: int = 1
    entropy_weight: float = 0.05
    entropy_rows: int = 32
    entropy_start: float = 0.6
    early_answer_layers: tuple[int, ...] = ()
    early_answer_weight: float = 0.0
    seed: int = 1
    eval_every: int = 1000
    log_every: int = 25
    val_size: int = 16
    val_splits: tuple[str, ...] = ("short", "medium", "long")

    def __post_init__(self):
        """Check every field's type and range, so that a bad ``--set`` fails at once, with its name, and
        not as a traceback after the vision stage or as a loss term silently switched off."""
        layers, heads = ZIPVL_TINY_SPEC.num_layers, ZIPVL_TINY_SPEC.num_heads
        errors = []

        def check(name, ok, expected):
            if not ok:
                errors.append(f"{name} must be {expected}, not {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return is_int(v) or (isinstance(v, float) and math.isfinite(v))

        minimum = {"steps": 1, "tokens_per_step": 1, "max_turns": 1, "vision_frames_per_step": 1}
        minimum |= {"grounding_heads": 1, "entropy_rows": 1, "log_every": 1}
        for name in (
            "warmup_steps",
            "picture_steps",
            "vision_steps",
            "concept_steps",
            "concept_anneal_steps",
        ):
            minimum[name] = 0
        minimum |= {"seed": 0, "eval_every": 0, "val_size": 0}
        for name, low in minimum.items():
            check(name, is_int(getattr(self, name)) and getattr(self, name) >= low, f"an integer >= {low}")
        check(
            "grounding_heads",
            is_int(self.grounding_heads) and self.grounding_heads <= heads,
            f"an integer of at most the {heads} heads",
        )
        for name in ("lr", "grad_clip"):
            check(name, is_number(getattr(self, name)) and getattr(self, name) > 0, "a number > 0")
        for name in (
            "weight_decay",
            "aux_weight",
            "grounding_weight",
            "entropy_weight",
            "early_answer_weight",
        ):
            check(name, is_number(getattr(self, name)) and getattr(self, name) >= 0, "a number >= 0")
        for name in ("min_lr_ratio", "short_fraction", "single_fraction", "entropy_start"):
            check(
                name, is_number(getattr(self, name)) and 0 <= getattr(self, name) <= 1, "a number in [0, 1]"
            )
        for name in ("freeze_vision", "empty_concept"):
            check(name, isinstance(getattr(self, name), bool), "true or false")
        for name, choices in (
            ("feature_source", ("vision", "concepts")),
            ("patch_features", ("projector", "vision")),
            ("patch_mode", ("classify", "align")),
        ):
            check(name, getattr(self, name) in choices, f"one of {choices}")
        in_model = lambda v: isinstance(v, (list, tuple)) and all(is_int(i) and 0 <= i < layers for i in v)  # noqa: E731
        check(
            "grounding_layers",
            in_model(self.grounding_layers) and len(self.grounding_layers) == 3,
            f"three layer indices in [0, {layers})",
        )
        check("early_answer_layers", in_model(self.early_answer_layers), f"layer indices in [0, {layers})")
        check(
            "val_splits",
            isinstance(self.val_splits, (list, tuple))
            and all(isinstance(s, str) and s in SPLITS for s in self.val_splits),
            f"a list of splits among {sorted(SPLITS)}",
        )
        stage = lambda v: (  # noqa: E731
            isinstance(v, (list, tuple))
            and len(v) == 3
            and is_number(v[0])
            and 0 <= v[0] <= 1
            and is_int(v[1])
            and is_int(v[2])
            and 1 <= v[1] <= v[2] <= MAX_VIDEO_FRAMES
        )
        check(
            "video_frames",
            isinstance(self.video_frames, (list, tuple))
            and len(self.video_frames) > 0
            and all(stage(v) for v in self.video_frames),
            f"a list of [start_fraction, min_frames, max_frames] with 1 <= min <= max <= {MAX_VIDEO_FRAMES}",
        )
        if errors:
            raise ValueError("TrainConfig: " + "; ".join(errors))


SMOKE_CONFIG = TrainConfig(
    steps=6,
    picture_steps=2,
    concept_steps=2,
    concept_anneal_steps=2,
    vision_steps=3,
    vision_frames_per_step=8,
    tokens_per_step=600,
    warmup_steps=2,
    video_frames=[(0.0, 2, 3)],
    eval_every=0,
    val_size=2,
)


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------


@dataclass
class Encoder:
    """Turns samples into model inputs exactly as the processor would, without its per-image overhead.

    The scenes are rendered at the vision tower's input size, so the image processor's resize and
    centre crop are identities and preprocessing reduces to ``(x / 255 - mean) / std`` (a test checks
    equality with the processor).
    """

    processor: object
    image_mean: np.ndarray = field(init=False)
    image_std: np.ndarray = field(init=False)
    image_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        ip = self.processor.image_processor
        self.image_mean = np.asarray(ip.image_mean, dtype=np.float32)
        self.image_std = np.asarray(ip.image_std, dtype=np.float32)
        side = ip.crop_size["height"]
        self.image_tokens = (side // self.processor.patch_size) ** 2

    def prompt_ids(self, sample: Sample) -> list[int]:
        """Token ids of the rendered chat prompt, each ``<image>`` expanded to the frame's tokens."""
        text = self.processor.apply_chat_template(
            sample.messages(), add_generation_prompt=True, tokenize=False
        )
        image = self.processor.image_token
        return self.processor.tokenizer(text.replace(image, image * self.image_tokens))["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        """The supervised continuation: the answer and the end-of-turn token."""
        tok = self.processor.tokenizer
        return tok(answer)["input_ids"] + [tok.eos_token_id]

    def conversation_ids(
        self, sample: Sample
    ) -> tuple[list[int], list[int], list[tuple[int, list[int], int]]]:
        """Token ids, labels and attention targets of the whole chat (every turn of :meth:`Sample.turns`).

        Labels are -100 except on each answer and its end-of-turn token. Attention targets are
        ``(query position, target positions, role)`` with role 0, 1, 2 (see :class:`TrainConfig`):
        the question's object word -> the image tokens of every object it names; the last prompt
        token -> the object word and the frame number's digits; the last prompt token -> the answer's
        evidence cells. The chat template renders each prefix ending in ``"ASSISTANT: "`` as a prefix
        of the full conversation, so the pieces are tokenized separately and concatenated.
        """
        tok = self.processor.tokenizer
        image = self.processor.image_token
        messages = sample.messages()
        ids, labels, targets, rendered = [], [], [], ""
        image_positions: list[int] = []

        def image_cells(cells):
            return [image_positions[f * self.image_tokens + r * GRID + c] for f, r, c in cells]

        for turn_index, turn in enumerate(sample.turns()):
            if turn_index > 0:
                messages = [*messages, {"role": "user", "content": [{"type": "text", "text": turn.question}]}]
            prefix = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            piece = tok(prefix[len(rendered) :].replace(image, image * self.image_tokens))["input_ids"]
            if turn_index == 0:
                image_positions = [i for i, t in enumerate(piece) if t == self.processor.image_token_id]
            last = len(ids) + len(piece) - 1
            word, cells = anchor_cells(sample.scenes, turn)
            word_id = tok.convert_tokens_to_ids(word)
            if word_id in piece:
                anchor = len(ids) + len(piece) - 1 - piece[::-1].index(word_id)
                if cells:
                    targets.append((anchor, image_cells(cells), 0))
                digits = (
                    [anchor + 1 + i for i, t in enumerate(piece[anchor - len(ids) + 1 :]) if chr(t).isdigit()]
                    if (turn.task == "frame_colour")
                    else []
                )
                targets.append((last, [anchor, *digits], 1))
            if turn.evidence:
                targets.append((last, image_cells(turn.evidence), 2))
            target = self.answer_ids(turn.answer)
            ids += piece + target
            labels += [-100] * len(piece) + target
            messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": turn.answer}]}]
            rendered = self.processor.apply_chat_template(messages, tokenize=False)
            rendered = rendered[: rendered.rindex(tok.eos_token) + len(tok.eos_token)]
        return ids, labels, targets

    def pixel_values(self, samples: list[Sample]) -> torch.Tensor:
        """``(total_frames, 3, H, W)`` float32, normalized like the CLIP image processor."""
        pixels = np.concatenate([s.pixels() for s in samples]).astype(np.float32) / 255.0
        return torch.from_numpy(((pixels - self.image_mean) / self.image_std).transpose(0, 3, 1, 2).copy())

    @staticmethod
    def patch_labels(samples: list[Sample]) -> torch.Tensor:
        """``(total_frames, patches, len(PATCH_LABELS))`` labels of every patch, frames in order."""
        return torch.from_numpy(np.stack([patch_labels(scene) for s in samples for scene in s.scenes]))

    def batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (answers only), ``pixel_values``, and
        ``grounding``: ``(row, query position, target positions, role)`` (not a model input).
        """
        rows = [self.conversation_ids(s) for s in samples]
        width = max(len(row[0]) for row in rows)
        pad = self.processor.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row_ids, row_labels, _) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            labels[i, : len(row_labels)] = torch.tensor(row_labels)
            mask[i, : len(row_ids)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": self.pixel_values(samples),
            "grounding": [
                (i, query, cells, role) for i, row in enumerate(rows) for query, cells, role in row[2]
            ],
        }


def anchor_cells(scenes, turn) -> tuple[str, list[tuple[int, int, int]]]:
    """The object word of a question and every cell (frame, row, col) showing such an object.

    The word is the colour in "What shape is the blue object?" and the shape (or its plural)
    otherwise; the cells are all objects of that colour or shape in all frames, whatever the rest of
    the question narrows them to (the frame, the left neighbour, the count).
    """
    words = turn.question.rstrip("?").split()
    if turn.task == "shape":
        word = next(w for w in words if w in COLOURS)
        match = [(i, o) for i, frame in enumerate(scenes) for o in frame.objects if o.colour == word]
    else:
        word = next(w for w in words if w in SHAPES or w in PLURALS.values())
        shape = word if word in SHAPES else next(k for k, v in PLURALS.items() if v == word)
        match = [(i, o) for i, frame in enumerate(scenes) for o in frame.objects if o.shape == shape]
    return word, [(i, o.row, o.col) for i, o in match]


def frames_range(config: TrainConfig, step: int) -> tuple[int, int]:
    """Video length range of the curriculum stage that ``step`` belongs to."""
    fraction = step / max(config.steps, 1)
    low, high = config.video_frames[0][1:]
    for start, lo, hi in config.video_frames:
        if fraction >= start:
            low, high = lo, hi
    return low, high


def draw_batch(config: TrainConfig, step: int, prompt_tokens_per_frame: int = 64) -> list[Sample]:
    """The samples of training step ``step`` (deterministic in ``(config.seed, step)``).

    All samples of a batch have the same number of frames, so padding is only the questions'. A
    share ``1 - single_fraction`` of the batches are multi-turn conversations (several questions about
    the same frames); the others have the test format (one question).
    """
    rng = np.random.default_rng([config.seed, step, 7])
    if rng.random() < config.short_fraction or step < config.picture_steps:
        frames, split = 1, "short"
    else:
        low, high = frames_range(config, step)
        frames = int(rng.integers(low, high + 1))
        split = "medium" if frames <= SPLITS["medium"].max_frames else "long"
    conversation = rng.random() >= config.single_fraction
    turns = config.max_turns if conversation else 1
    size = max(1, config.tokens_per_step // (frames * prompt_tokens_per_frame + 48 * turns))
    first = int(rng.integers(0, 2**31 - 1))
    forced = None if frames == 1 else frames
    if conversation:
        return [
            make_conversation(split, "train", first + i, seed=config.seed, num_frames=forced, max_turns=turns)
            for i in range(size)
        ]
    return [make_sample(split, "train", first + i, seed=config.seed, num_frames=forced) for i in range(size)]


# ---------------------------------------------------------------------------------------------------
# Vision supervision: name what every patch shows
# ---------------------------------------------------------------------------------------------------


class PatchHead(torch.nn.Module):
    """Supervision of the patch features by :data:`PATCH_LABELS` (only used while training; it is not
    part of the checkpoint).

    ``mode="classify"``: linear classifiers, one per label column (the features must make each label
    linearly decodable). ``mode="align"``: the features are regressed onto a fixed *concept embedding*
    of the patch, the sum of one seeded random vector per present label (shape, colour, left
    neighbour, timecode digits; zero for an empty cell): the image-token embeddings then describe each
    cell in one fixed vocabulary of concepts, the way LLaVA's first stage aligns CLIP features with the
    language model's input space.
    """

    def __init__(self, hidden: int, mode: str = "classify", seed: int = 0, empty: bool = False):
        super().__init__()
        if mode not in ("classify", "align"):
            raise ValueError(f"mode must be 'classify' or 'align', not {mode!r}")
        self.mode = mode
        self.empty = empty
        self.heads = torch.nn.ModuleList(
            torch.nn.Linear(hidden, classes) for classes in PATCH_LABELS.values()
        )
        generator = torch.Generator().manual_seed(seed + 5)
        for i, classes in enumerate(PATCH_LABELS.values()):
            self.register_buffer(f"concepts_{i}", torch.randn(classes, hidden, generator=generator))
        self.register_buffer("concept_empty", torch.randn(hidden, generator=generator))

    def concept_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """``(..., hidden)``: the sum of the concept vectors of the labels present (class > 0); zero for an
        empty cell of a still picture, unless ``empty`` adds a fixed "empty cell" vector there (with it,
        the decoder stays on the answer prior far longer: ``docs/fidelity.md``).
        """
        total = self.concept_empty * (labels[..., :1] == 0) if self.empty else 0
        for i in range(labels.shape[-1]):
            table = getattr(self, f"concepts_{i}")
            total = total + table[labels[..., i]] * (labels[..., i : i + 1] > 0)
        return total

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Patch loss; ``features (frames, patches, hidden)``, ``labels (frames, patches, k)``.

        ``classify``: mean cross-entropy per label column, plus the same over the patches where it is
        not 0. ``align``: mean squared error to :meth:`concept_embedding`.
        """
        if self.mode == "align":
            return F.mse_loss(features, self.concept_embedding(labels))
        flat = features.reshape(-1, features.shape[-1])
        targets = labels.reshape(-1, labels.shape[-1])
        losses = []
        for i, head in enumerate(self.heads):
            logits = head(flat)
            losses.append(F.cross_entropy(logits, targets[:, i]))
            present = targets[:, i] > 0  # objects are rare among the patches: weigh them up
            if present.any():
                losses.append(F.cross_entropy(logits[present], targets[present, i]))
        return torch.stack(losses).mean()


class ConceptFeatures:
    """Feature teacher forcing: the projector returns ``mix * head.concept_embedding(labels) + (1 - mix) *
    its own output`` for the labels set in :attr:`labels` (``(frames, patches, k)``).

    ``mix = 1`` is the diagnostic ``feature_source="concepts"``; the ``concept_steps`` /
    ``concept_anneal_steps`` curriculum moves it from 1 to 0, after which the model reads its own
    image-token embeddings (the saved checkpoint always does: hooks are not saved).
    """

    def __init__(self, model, head: PatchHead):
        self.head = head
        self.labels: torch.Tensor | None = None
        self.mix = 1.0
        model.model.multi_modal_projector.register_forward_hook(self._replace)

    def _replace(self, module, args, output):
        if self.labels is None or self.mix <= 0.0:
            return output
        concepts = self.head.concept_embedding(self.labels).to(output.dtype)
        return self.mix * concepts + (1.0 - self.mix) * output


def concept_mix(config: TrainConfig, step: int) -> float:
    """Share of the exact concept embedding in the image-token embeddings at second-stage ``step``."""
    if config.feature_source == "concepts":
        return 1.0
    if step < config.concept_steps:
        return 1.0
    if step < config.concept_steps + config.concept_anneal_steps:
        return 1.0 - (step - config.concept_steps + 1) / (config.concept_anneal_steps + 1)
    return 0.0


class ProjectorInput:
    """Captures the patch features the patch head reads (``(frames, patches, hidden)``).

    ``where="projector"`` (default): the multimodal projector's output, i.e. the image-token embeddings
    the language model reads, so that shape, colour and timecode are prominent in them (not merely
    decodable from the vision tower's output, where they hide among background variation that the
    projector passes on and the language model's attention then averages in). ``where="vision"``:
    the vision tower's output (the projector's input).
    """

    def __init__(self, model, where: str = "projector"):
        self.features: torch.Tensor | None = None
        projector = model.model.multi_modal_projector
        if where == "projector":
            projector.register_forward_hook(self._capture_output)
        elif where == "vision":
            projector.register_forward_pre_hook(self._capture_input)
        else:
            raise ValueError(f"where must be 'projector' or 'vision', not {where!r}")

    def _capture_input(self, module, args):
        self.features = args[0]

    def _capture_output(self, module, args, output):
        self.features = output


def draw_vision_batch(config: TrainConfig, step: int) -> list[Sample]:
    """Pictures and short videos (train partition) totalling about ``vision_frames_per_step`` frames."""
    rng = np.random.default_rng([config.seed, step, 11])
    samples, frames = [], 0
    while frames < config.vision_frames_per_step:
        index = int(rng.integers(0, 2**31 - 1))
        split = "short" if rng.random() < 0.5 else "medium"
        samples.append(make_sample(split, "train", index, seed=config.seed + 1000))
        frames += samples[-1].num_frames
    return samples


def train_vision(
    model, encoder: Encoder, head: PatchHead, capture: ProjectorInput, config: TrainConfig, log=print
):
    """Stage 1: the vision tower and the patch head learn :func:`patch_labels`."""
    params = (
        list(model.model.vision_tower.parameters())
        + list(model.model.multi_modal_projector.parameters())
        + list(head.parameters())
    )
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)
    start = time.perf_counter()
    for step in range(config.vision_steps):
        samples = draw_vision_batch(config, step)
        model.model.get_image_features(
            pixel_values=encoder.pixel_values(samples),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        loss = head.loss(capture.features, encoder.patch_labels(samples))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.log_every == 0 or step == config.vision_steps - 1:
            log(
                f"vision step {step + 1}/{config.vision_steps} patch loss {loss.item():.4f} "
                f"{time.perf_counter() - start:.0f}s"
            )


# ---------------------------------------------------------------------------------------------------
# Attention terms of the loss: grounding and entropy
# ---------------------------------------------------------------------------------------------------


class AttentionTerms:
    """What the training attention function records during one forward (class-level state).

    Attributes
    ----------
    grounding : list of (batch row, query position, target positions, role)
        Queries whose attention is supervised (set before the forward).
    role_layers : tuple[int, ...]
        The decoder layer of each role.
    grounding_heads : int
        The first this many heads of those layers are supervised.
    entropy_rows : int
        Random query rows per layer for the entropy term (0: off).
    grounding_losses, entropies : list[torch.Tensor]
        Filled by the forward.
    """

    grounding: list[tuple[int, int, list[int], int]] = []
    role_layers: tuple[int, ...] = ()
    grounding_heads: int = 1
    entropy_rows: int = 0
    grounding_losses: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []

    @classmethod
    def reset(cls, grounding: list[tuple[int, int, list[int], int]]) -> None:
        cls.grounding, cls.grounding_losses, cls.entropies = grounding, [], []


def _row_log_probs(query, key, batch_rows, query_rows, scaling):
    """Causal log-softmax attention of ``query[b, :, r]`` over ``key[b]``: ``(len(rows), H, n)``."""
    heads, n = query.shape[1], key.shape[2]
    group = heads // key.shape[1]
    k = key[batch_rows].float()
    k = k.repeat_interleave(group, dim=1) if group > 1 else k  # (r, H, n, d)
    q = query[batch_rows, :, query_rows].float()  # (r, H, d)
    logits = torch.einsum("rhd,rhnd->rhn", q, k) * scaling
    causal = torch.arange(n, device=query.device)[None, :] > query_rows[:, None]
    return F.log_softmax(logits.masked_fill(causal[:, None, :], float("-inf")), dim=-1)


def training_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA attention that also records the attention terms of :class:`AttentionTerms`.

    Shapes: ``query (B, H, q, d)``, ``key / value (B, Hkv, q, d)``.

    * Grounding: ``-log`` of the attention mass that the first ``grounding_heads`` heads of each
      supervised query put on its targets, in the layer of its role.
    * Entropy: mean entropy (nats) of ``entropy_rows`` random query rows (padding rows included).
    """
    out = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    if not module.training or query.shape[2] == 1:
        return out
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    terms = AttentionTerms
    mine = [g for g in terms.grounding if terms.role_layers[g[3]] == module.layer_idx]
    if mine:
        rows = torch.tensor([b for b, _, _, _ in mine], device=query.device)
        queries = torch.tensor([q for _, q, _, _ in mine], device=query.device)
        logp = _row_log_probs(query, key, rows, queries, scaling)[:, : terms.grounding_heads]
        for i, (_, _, cells, _) in enumerate(mine):
            mass = torch.logsumexp(logp[i][:, cells], dim=-1)  # (heads,)
            terms.grounding_losses.append(-mass.mean())
    if terms.entropy_rows:
        batch, _, n, _ = query.shape
        picks = torch.randint(0, n, (batch * terms.entropy_rows,), device=query.device)
        rows = torch.arange(batch, device=query.device).repeat_interleave(terms.entropy_rows)
        logp = _row_log_probs(query, key, rows, picks, scaling)
        terms.entropies.append(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1).mean())
    return out


def register_training_attention() -> None:
    AttentionInterface.register(TRAIN_ATTN_KEY, training_attention)


# ---------------------------------------------------------------------------------------------------
# Evaluation (dense, greedy)
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def dense_accuracy(
    model, encoder: Encoder, samples: list[Sample], max_new_tokens: int = 10, before=None
) -> dict[str, float]:
    """Greedy exact-match accuracy per task and overall, with plain (dense) attention, one sample at a time
    (``before(sample)`` is called first, if given)."""
    model.eval()
    tokenizer = encoder.processor.tokenizer
    hits: dict[str, list[int]] = {}
    for sample in samples:
        if before is not None:
            before(sample)
        ids = torch.tensor([encoder.prompt_ids(sample)])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=encoder.pixel_values([sample]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        hits.setdefault(sample.task, []).append(int(text == sample.answer))
    result = {task: sum(v) / len(v) for task, v in hits.items()}
    result["all"] = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    return result


def validation_sets(config: TrainConfig) -> dict[str, list[Sample]]:
    return {split: make_split(split, "val", config.val_size, seed=config.seed) for split in config.val_splits}


# ---------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------


def early_answer_loss(model, hidden_states, labels: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Mean answer cross-entropy read from the residual stream after each of ``early_answer_layers``.

    ``hidden_states[k + 1]`` is the output of decoder layer ``k``; position ``t`` predicts ``labels[t + 1]``.
    """
    targets = labels[:, 1:]
    supervised = targets != -100
    norm, head = model.model.language_model.norm, model.lm_head
    losses = []
    for layer in config.early_answer_layers:
        hidden = hidden_states[layer + 1][:, :-1][supervised]
        losses.append(F.cross_entropy(head(norm(hidden)).float(), targets[supervised]))
    return torch.stack(losses).mean()


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(
    config: TrainConfig,
    out: Path | None,
    *,
    log=print,
    init_from: Path | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train, validate, save the checkpoint to ``out`` (if given); return the training record.

    ``stop_after`` runs only the first that many steps of the run (the same batches, learning rates
    and losses as the full run, which is deterministic) and then returns without the final validation
    and without saving: a cheap screen of seeds (docs/fidelity.md).

    Runs with ``torch.use_deterministic_algorithms(True)`` (restored afterwards): without it two runs
    of the same command on an idle machine diverged once long videos entered the batches (step
    50-75 of an 80-step run); with it they give bit-identical weights at the same speed.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(config, out, log=log, init_from=init_from, stop_after=stop_after)
    finally:
        torch.use_deterministic_algorithms(previous)


def load_initial_weights(model, checkpoint: Path | str) -> None:
    """Load a saved checkpoint's weights into ``model`` (``--init-from``), every tensor or an error.

    Through transformers, which maps the file's key layout (``language_model.model.layers...``) onto
    the module's (``model.language_model.layers...``); a raw ``load_state_dict(strict=False)`` of the
    file loaded none of them and said nothing.
    """
    from transformers import LlavaForConditionalGeneration

    saved = LlavaForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.load_state_dict(saved.state_dict(), strict=True)


def _train(
    config: TrainConfig, out: Path | None, *, log, init_from: Path | None, stop_after: int | None = None
) -> dict:
    torch.manual_seed(config.seed)
    model, processor = build_untrained_zipvl_tiny(seed=config.seed)
    if init_from is not None:
        load_initial_weights(model, init_from)
    encoder = Encoder(processor)
    on_projector = config.patch_features == "projector"
    head = PatchHead(
        model.config.text_config.hidden_size if on_projector else model.config.vision_config.hidden_size,
        mode=config.patch_mode,
        seed=config.seed,
        empty=config.empty_concept,
    )
    capture = ProjectorInput(model, config.patch_features)
    if config.feature_source not in ("vision", "concepts"):
        raise ValueError(f"feature_source must be 'vision' or 'concepts', not {config.feature_source!r}")
    teacher = config.feature_source == "concepts" or config.concept_steps + config.concept_anneal_steps > 0
    oracle = ConceptFeatures(model, head) if teacher else None
    if config.feature_source == "vision":
        train_vision(model, encoder, head, capture, config, log)
    register_training_attention()
    AttentionTerms.role_layers = tuple(config.grounding_layers)
    AttentionTerms.grounding_heads = config.grounding_heads
    AttentionTerms.entropy_rows = config.entropy_rows if config.entropy_weight > 0 else 0
    model.set_attn_implementation({"text_config": TRAIN_ATTN_KEY, "vision_config": "sdpa"})
    if config.freeze_vision:
        for module in (model.model.vision_tower, model.model.multi_modal_projector, head):
            module.requires_grad_(False)
    named = [
        (n, p)
        for n, p in [*model.named_parameters(), *((f"patch_head.{n}", p) for n, p in head.named_parameters())]
        if p.requires_grad
    ]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    val = validation_sets(config)
    history: list[dict] = []
    start = time.perf_counter()
    running = {"answer": 0.0, "grounding": 0.0, "entropy": 0.0, "patch": 0.0, "early": 0.0, "n": 0}
    for step in range(config.steps):
        if stop_after is not None and step >= stop_after:
            record = {"config": asdict(config), "stopped_after": step, "history": history}
            log(f"stopped after step {step} of {config.steps} (nothing saved)")
            return record
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        samples = draw_batch(config, step)
        batch = encoder.batch(samples)
        if oracle is not None:
            oracle.labels = encoder.patch_labels(samples)
            oracle.mix = concept_mix(config, step)
        AttentionTerms.reset(batch.pop("grounding") if config.grounding_weight > 0 else [])
        entropy_on = config.entropy_weight > 0 and step >= config.entropy_start * config.steps
        AttentionTerms.entropy_rows = config.entropy_rows if entropy_on else 0
        early = bool(config.early_answer_layers) and config.early_answer_weight > 0
        outputs = model(**batch, output_hidden_states=early)
        loss = outputs.loss
        terms = {"answer": outputs.loss}
        if early:
            terms["early"] = early_answer_loss(model, outputs.hidden_states, batch["labels"], config)
            loss = loss + config.early_answer_weight * terms["early"]
        if config.aux_weight > 0 and not config.freeze_vision:
            terms["patch"] = head.loss(capture.features, encoder.patch_labels(samples))
            loss = loss + config.aux_weight * terms["patch"]
        if AttentionTerms.grounding_losses:
            terms["grounding"] = torch.stack(AttentionTerms.grounding_losses).mean()
            loss = loss + config.grounding_weight * terms["grounding"]
        if AttentionTerms.entropies:
            terms["entropy"] = torch.stack(AttentionTerms.entropies).mean()
            loss = loss + config.entropy_weight * terms["entropy"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, value in terms.items():
            running[name] += value.item()
        running["n"] += 1
        last = step == config.steps - 1
        if (step + 1) % config.log_every == 0 or last:
            means = " ".join(f"{k} {v / running['n']:.3f}" for k, v in running.items() if k != "n")
            log(
                f"step {step + 1}/{config.steps} {means} lr {learning_rate(config, step):.2e} "
                f"frames {samples[0].num_frames} batch {len(samples)} {time.perf_counter() - start:.0f}s"
            )
            running = dict.fromkeys(running, 0.0)
            running["n"] = 0
        if (config.eval_every and (step + 1) % config.eval_every == 0) or last:
            before = (
                None if oracle is None else lambda s: setattr(oracle, "labels", encoder.patch_labels([s]))
            )
            accuracy = {
                split: dense_accuracy(model, encoder, samples, before=before)
                for split, samples in val.items()
            }
            history.append(
                {"step": step + 1, "elapsed_s": time.perf_counter() - start, "val_accuracy": accuracy}
            )
            log(
                f"  val {json.dumps({k: {t: round(a, 2) for t, a in v.items()} for k, v in accuracy.items()})}"
            )
    elapsed = time.perf_counter() - start
    model.set_attn_implementation("sdpa")
    model.eval()
    record = {
        "config": asdict(config),
        "torch_threads": torch.get_num_threads(),
        "train_seconds": elapsed,
        "history": history,
    }
    if out is not None:
        files = save_checkpoint(model, processor, out)
        (Path(out) / "training.json").write_text(json.dumps(record, indent=2))
        record["checkpoint_bytes"] = sum(f.stat().st_size for f in files)
        log(f"saved {out} ({record['checkpoint_bytes'] / 1e6:.2f} MB) after {elapsed:.0f}s")
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a few tiny steps (< 60 s), for the test suite")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"checkpoint directory (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="run only the run's first N steps and save nothing (screening seeds: the grounding loss by "
        "step 800 tells whether the retrieval circuit formed; docs/fidelity.md)",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--entropy-weight", type=float, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--init-from", type=Path, default=None, help="start from a checkpoint's weights")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="override any TrainConfig field, e.g. --set picture_steps=1200 --set patch_mode='\"align\"'",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = SMOKE_CONFIG if args.smoke else TrainConfig()
    overrides = {
        "steps": args.steps,
        "seed": args.seed,
        "entropy_weight": args.entropy_weight,
        "eval_every": args.eval_every,
    }
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, not {args.threads}")
    fields = asdict(config)
    for item in args.set:
        name, equals, value = item.partition("=")
        if name not in fields:
            parser.error(f"--set {item}: TrainConfig has no field {name!r}")
        try:
            overrides[name] = json.loads(value) if equals else None
        except json.JSONDecodeError:
            parser.error(f"--set {item}: the value must be JSON (a string needs quotes: {name}='\"...\"')")
        if overrides[name] is None:
            parser.error(f"--set {item}: give a JSON value after '='")
    try:
        config = TrainConfig(**{**fields, **{k: v for k, v in overrides.items() if v is not None}})
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else (None if args.smoke else DEFAULT_OUT)
    if args.stop_after is not None:
        out = None
    return train(config, out, init_from=args.init_from, stop_after=args.stop_after)


if __name__ == "__main__":
    main()
