"""ZipVL inside transformers: the ``"zipvl"`` attention and mask functions and :func:`enable_zipvl`.

transformers 5 dispatches attention through ``AttentionInterface``; a model whose text sub-config
says ``_attn_implementation == "zipvl"`` calls :func:`zipvl_attention_forward` from every decoder
layer with post-RoPE ``query (B, H, q, d)`` and ``key / value (B, Hkv, kv, d)``.

* The stock causal mask assumes one cache length for all layers; after eviction every layer has
  its own. So the registered mask function only passes the 2-D padding mask through
  (:func:`zipvl_mask`) and causal + padding masking happens per layer, inside the cache.
* The attention function is not given the cache; a forward pre-hook on each text attention module
  hands it over (``past_key_values`` arrives there as a keyword argument).
* Whatever holds the KV (the reference :class:`~zipvl_ray.cache.ZipVLCache`, or the paged engine's
  step context) implements ``zipvl_attention(layer_idx, query, key, value, attention_mask,
  scaling, config) -> (B, q, H, d)``. Without a cache (``use_cache=False``) the prefill runs
  sparse and stores nothing.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface

from zipvl_ray.cache import stateless_prefill
from zipvl_ray.config import ZipVLConfig

ATTN_KEY = "zipvl"


def zipvl_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function registered for ``"zipvl"``: returns the 2-D ``(B, kv_length)`` padding mask as is.

    Causality is applied per layer by the cache, which knows each stored token's column.
    """
    return attention_mask


def zipvl_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for ``"zipvl"``.

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (has ``layer_idx``; :func:`enable_zipvl` gave it ``_zipvl_config``).
    query : torch.Tensor
        ``(B, H, q, d)``, post-RoPE.
    key, value : torch.Tensor
        ``(B, Hkv, q, d)`` for the new tokens (a ZipVL cache's ``update`` stores nothing itself).
    attention_mask : torch.Tensor or None
        The 2-D padding mask passed through by :func:`zipvl_mask`.

    Returns
    -------
    tuple
        ``(output (B, q, H, d), None)``: attention weights are never materialised.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    config: ZipVLConfig = getattr(module, "_zipvl_config", None) or ZipVLConfig()
    layer_idx = module.layer_idx
    past = module.__dict__.get("_zipvl_past")
    handler = getattr(past, "zipvl_attention", None)
    if handler is not None:
        return handler(layer_idx, query, key, value, attention_mask, scaling, config), None
    if past is not None and isinstance(past, Cache) and key.shape[2] != query.shape[2]:
        raise TypeError(
            f"ZipVL attention got a {type(past).__name__} that holds earlier tokens, including ones ZipVL "
            "would have evicted. Pass past_key_values=zipvl_ray.ZipVLCache(model) to generate()/forward()."
        )
    pad2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    if pad2d is not None:
        pad2d = pad2d[:, -query.shape[2] :]
    out, kept = stateless_prefill(query, key, value, pad2d, scaling, config, layer_idx)
    module.zipvl_last_kept = kept
    return out, None


def _capture_cache(module, args, kwargs):
    module._zipvl_past = kwargs.get("past_key_values")


def _release_cache(module, args, kwargs, output):
    module._zipvl_past = None


def register_zipvl() -> None:
    """Register the ``"zipvl"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_KEY, zipvl_attention_forward)
    AttentionMaskInterface.register(ATTN_KEY, zipvl_mask)


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (the module with ``.layers``) of a VLM or a causal LM."""
    for path in ("model.language_model", "language_model", "model"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "layers"):
            return obj
    if hasattr(model, "layers"):
        return model
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")


def text_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    return [layer.self_attn for layer in language_model(model).layers]


def sliding_window_of(model: torch.nn.Module) -> int | None:
    """The attention window the stock text model applies, if it limits anything, else None.

    Read from the attention modules as transformers' forward passes it (``module.sliding_window``, set per
    layer by Qwen2-style models; Mistral passes its config's), and ignored when it is at least the
    model's context length. ZipVL's prefill selection and decode attend over every kept token, so a model
    with a smaller window would be served differently from its stock forward.
    """
    text_config = model.config.get_text_config(decoder=True)
    context = getattr(text_config, "max_position_embeddings", None)
    windows = []
    for module in text_attention_modules(model):
        if hasattr(module, "sliding_window"):
            window = module.sliding_window
        else:
            window = getattr(getattr(module, "config", None), "sliding_window", None)
        if window and (context is None or window < context):
            windows.append(int(window))
    return min(windows) if windows else None


def enable_zipvl(model: torch.nn.Module, config: ZipVLConfig | None = None) -> torch.nn.Module:
    """Make the text model of ``model`` use ZipVL attention; the vision tower keeps SDPA.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL (or a plain causal LM).
    config : ZipVLConfig, optional
        Defaults to ``ZipVLConfig()``. Can be changed later with :func:`set_zipvl_config`.

    Returns
    -------
    The same model (modified in place). Generate with ``past_key_values=ZipVLCache(model)``.

    Raises
    ------
    ValueError
        For a text model with sliding-window attention (:func:`sliding_window_of`).
    """
    config = config or ZipVLConfig()
    _check_dense_layers(model, config)
    window = sliding_window_of(model)
    if window is not None:
        raise ValueError(
            f"the text model uses sliding-window attention (a window of {window} tokens), which ZipVL's "
            "attention does not apply: it would not answer like the stock model. Serve a checkpoint without "
            "a window (sliding_window: null), or one whose window is at least its context length"
        )
    register_zipvl()
    sub_configs = getattr(model.config, "sub_configs", {}) or {}
    if "text_config" in sub_configs:
        implementation = {"text_config": ATTN_KEY}
        for name in sub_configs:
            if name != "text_config":
                implementation[name] = "sdpa"
        model.set_attn_implementation(implementation)
    else:
        model.set_attn_implementation(ATTN_KEY)
    for module in text_attention_modules(model):
        module._zipvl_config = config
        if not getattr(module, "_zipvl_hooked", False):
            module.register_forward_pre_hook(_capture_cache, with_kwargs=True)
            module.register_forward_hook(_release_cache, with_kwargs=True, always_call=True)
            module._zipvl_hooked = True
    model.zipvl_config = config
    return model


def _check_dense_layers(model: torch.nn.Module, config: ZipVLConfig) -> None:
    num_layers = len(text_attention_modules(model))
    beyond = [i for i in config.dense_layers if i >= num_layers]
    if beyond:
        raise ValueError(
            f"dense_layers {beyond} are beyond the text model's {num_layers} layers (0-{num_layers - 1})"
        )


def set_zipvl_config(model: torch.nn.Module, config: ZipVLConfig) -> None:
    """Replace the default ZipVL config of an enabled model."""
    _check_dense_layers(model, config)
    for module in text_attention_modules(model):
        module._zipvl_config = config
    model.zipvl_config = config


def zipvl_enabled(model: torch.nn.Module) -> bool:
    """True when :func:`enable_zipvl` was applied to ``model``."""
    return getattr(model, "zipvl_config", None) is not None
