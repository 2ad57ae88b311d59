"""Loading vision-language models with ZipVL attention.

``load_model(name_or_path)`` accepts

* a built-in name (``tiny-llava``, ``tiny-llava-next``, ``tiny-qwen2-vl``, ``tiny-qwen2.5-vl``: small
  random-weight models built offline; ``zipvl-tiny``: the trained model shipped with the package),
* a local directory holding a transformers checkpoint and processor files, or
* a Hugging Face hub id (``llava-hf/llava-v1.6-mistral-7b-hf``, ``Qwen/Qwen2.5-VL-7B-Instruct``, ...)
  on machines that can reach the hub.

Supported architectures: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from zipvl_ray.attention import enable_zipvl
from zipvl_ray.config import ZipVLConfig
from zipvl_ray.models.builtin import BUILTIN_MODELS, Qwen2VLImageProcessor, TinySpec

logger = logging.getLogger(__name__)

#: Directory of checkpoints shipped inside the package (``zipvl-tiny`` lives here once trained).
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"

SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; None and ``"auto"`` -> None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() == "auto":
        return None
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def builtin_model_names() -> list[str]:
    """Names :func:`load_model` builds or finds without the network."""
    names = list(BUILTIN_MODELS)
    if CHECKPOINT_DIR.exists():
        names += sorted(p.name for p in CHECKPOINT_DIR.iterdir() if (p / "config.json").exists())
    return names


def _hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def _is_local_checkpoint(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is an existing directory holding a ``config.json``. As in transformers, such
    a directory wins over any other meaning of the name (a built-in model, a shipped checkpoint)."""
    local = Path(name_or_path)
    if not (local.is_dir() and (local / "config.json").is_file()):
        return False
    plain_name = not local.is_absolute() and len(local.parts) == 1  # an absolute path joined is itself
    if plain_name and (
        name_or_path in BUILTIN_MODELS or (CHECKPOINT_DIR / name_or_path / "config.json").exists()
    ):
        logger.warning("loading the local directory %r, not the built-in model of that name", name_or_path)
    return True


def _checkpoint_path(name_or_path: str) -> str:
    """A local directory, a shipped checkpoint's directory, or a hub id.

    Offline (``HF_HUB_OFFLINE=1``, as the KubeRay pods run), a hub id resolves to its snapshot in the
    Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``, where the download Job put it); an id that is not
    cached there is refused with a message that says so. Online, the hub id is returned as it is.
    """
    if _is_local_checkpoint(name_or_path):
        return name_or_path
    local = CHECKPOINT_DIR / name_or_path
    path = str(local) if (local / "config.json").exists() else name_or_path
    if os.path.isdir(path) or not _hub_offline():
        return path
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception as exc:  # not cached, or not a valid hub id: one message for both
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a built-in model ({', '.join(builtin_model_names())}), a local "
            f"directory, nor a hub id cached under {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE forbids the "
            f"hub: {type(exc).__name__})"
        ) from exc


def _image_only_qwen_processor(path: str, error: Exception | None):
    """Qwen2(.5)-VL's processor built for images only, from the checkpoint's image processor, tokenizer
    and chat template: ``AutoProcessor`` insists on a video processor (which needs torchvision, absent
    from CPU images) and, for a checkpoint saved by the image-only class, returns a bare image processor.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except Exception:
        if error is not None:
            raise error from None  # AutoProcessor's own error says more than the config's
        raise
    if model_type not in ("qwen2_vl", "qwen2_5_vl"):
        if error is not None:
            raise error
        raise ValueError(f"{path}: transformers' AutoProcessor gave a processor without a tokenizer")
    template = None
    for name, read in (
        ("chat_template.jinja", lambda t: t),
        ("chat_template.json", lambda t: json.loads(t)["chat_template"]),
    ):
        file = Path(path) / name
        if file.is_file():
            template = read(file.read_text())
            break
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Qwen2VLImageProcessor(
        AutoImageProcessor.from_pretrained(path), tokenizer, chat_template=template or tokenizer.chat_template
    )


def _load_pretrained_processor(path: str):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ImportError) as exc:  # Qwen2-VL's video processor without torchvision (either error)
        processor = _image_only_qwen_processor(path, exc)
    if getattr(processor, "tokenizer", None) is None:
        processor = _image_only_qwen_processor(path, None)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
    return processor


def _load_pretrained(path: str, dtype: torch.dtype | None):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {config.model_type!r} is not supported; zipvl-ray serves {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    processor = _load_pretrained_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype if dtype is not None else "auto", attn_implementation="sdpa"
    )
    return model, processor


def load_processor(name_or_path: str, *, seed: int = 0, spec: TinySpec | None = None):
    """The processor of :func:`load_model`'s model, without loading checkpoint weights.

    Built-in random models are built whole (they are tiny, and their processor is made with them);
    shipped checkpoints, local directories and hub ids load only the processor files. The ingress
    uses this: it tokenizes and preprocesses images but never runs the model.
    """
    if name_or_path in BUILTIN_MODELS and not _is_local_checkpoint(name_or_path):
        kwargs = {"seed": seed} if spec is None else {"seed": seed, "spec": spec}
        return BUILTIN_MODELS[name_or_path](**kwargs)[1]
    return _load_pretrained_processor(_checkpoint_path(name_or_path))


def _to_dtype_keeping_rope_fp32(model, dtype: torch.dtype):
    """``model.to(dtype)`` except the rotary ``inv_freq`` buffers, which stay fp32 as ``from_pretrained(dtype=)``
    leaves them: in bf16 each frequency is off by up to 0.4%, an angle error that grows with the position
    (about 20 rad at 16K tokens with 128-dim heads)."""
    keep = {
        name: buffer.detach().clone()
        for name, buffer in model.named_buffers()
        if "inv_freq" in name.rsplit(".", 1)[-1] and buffer.is_floating_point()
    }
    model = model.to(dtype=dtype)
    for name, buffer in keep.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[leaf] = buffer.to(device=owner._buffers[leaf].device)
    return model


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    zipvl: ZipVLConfig | None = None,
    seed: int = 0,
    spec: TinySpec | None = None,
):
    """Load a VLM and its processor, with ZipVL attention on the text model (SDPA in the vision tower).

    Parameters
    ----------
    name_or_path : str
        Built-in name, local checkpoint directory, or hub id.
    dtype : str or torch.dtype, optional
        ``"bf16"``, ``"fp16"``, ``"fp32"``...; None keeps the checkpoint's dtype (fp32 for built-ins).
    device : str or torch.device, optional
        None: CUDA when available, else CPU.
    zipvl : ZipVLConfig, optional
        Default ZipVL settings of the model (``ZipVLConfig()`` when None).
    seed : int
        Weight seed of the random built-in models.
    spec : TinySpec, optional
        Sizes of a random built-in model (tests and benchmarks use larger ones).

    Returns
    -------
    (model, processor)
        ``model`` is in eval mode on ``device``.
    """
    torch_dtype = resolve_dtype(dtype)
    if name_or_path in BUILTIN_MODELS and not _is_local_checkpoint(name_or_path):
        kwargs = {"seed": seed}
        if spec is not None:
            kwargs["spec"] = spec
        model, processor = BUILTIN_MODELS[name_or_path](**kwargs)
    else:
        model, processor = _load_pretrained(_checkpoint_path(name_or_path), torch_dtype)
    model = model.to(device=resolve_device(device))
    if torch_dtype is not None:
        model = _to_dtype_keeping_rope_fp32(model, torch_dtype)
    model.eval()
    enable_zipvl(model, zipvl)
    model.zipvl_name = name_or_path
    return model, processor


__all__ = [
    "BUILTIN_MODELS",
    "TinySpec",
    "builtin_model_names",
    "load_model",
    "load_processor",
    "resolve_device",
    "resolve_dtype",
]
