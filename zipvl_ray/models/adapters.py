"""What the engine and the vision stage need to know about each supported architecture.

The paged engine does not call ``model.generate``: it embeds tokens, scatters image features into
the embeddings, computes positions (1-D for LLaVA, 3-D M-RoPE for Qwen2(.5)-VL) and runs the decoder
stack with its own KV context. :class:`VLMAdapter` hides the per-architecture differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zipvl_ray.attention import language_model
from zipvl_ray.multimodal import ImageInput

MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class TextGeometry:
    """Shapes of the decoder stack that size the KV pool.

    Attributes
    ----------
    num_layers, num_heads, num_kv_heads, head_dim, hidden_size, vocab_size : int
    dtype : torch.dtype
        Dtype of the KV cache (the model's).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype

    @property
    def token_bytes_per_layer(self) -> int:
        """Bytes of one token's key + value in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize


class VLMAdapter:
    """Architecture-specific glue around a transformers VLM (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A ``*ForConditionalGeneration`` VLM (ZipVL-enabled for the LLM stage).
    """

    def __init__(self, model):
        self.model = model
        self.model_type: str = model.config.model_type
        self.text_config = model.config.get_text_config(decoder=True)
        self.uses_mrope = self.model_type in MROPE_MODEL_TYPES
        image_token = getattr(model.config, "image_token_id", None)
        if image_token is None:
            image_token = getattr(model.config, "image_token_index", None)
        self.image_token_id: int = int(image_token)

    # -- modules ------------------------------------------------------------------------------
    @property
    def language_model(self) -> torch.nn.Module:
        return language_model(self.model)

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def geometry(self) -> TextGeometry:
        cfg = self.text_config
        heads = cfg.num_attention_heads
        return TextGeometry(
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            dtype=self.dtype,
        )

    def vision_modules(self) -> list[str]:
        """Attribute paths (under ``model.model``) of the vision tower and projector."""
        if self.uses_mrope:
            return ["visual"]
        return ["vision_tower", "multi_modal_projector"]

    def drop_vision_tower(self) -> None:
        """Free the vision tower + projector (the LLM stage gets precomputed features)."""
        for name in self.vision_modules():
            if getattr(self.model.model, name, None) is not None:
                setattr(self.model.model, name, None)

    def drop_language_model(self) -> None:
        """Free the decoder stack and LM head (the vision stage needs only the tower + projector)."""
        self.model.model.language_model = None
        self.model.lm_head = None

    # -- vision ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Run the vision tower + projector on ``images`` in one batch.

        Returns
        -------
        list[torch.Tensor]
            Per image, ``(num_tokens_i, hidden_size)`` on the model's device, in the model's dtype.
        """
        if not images:
            return []
        device = self._vision_device()
        dtype = self._vision_dtype()
        pixels = [im.pixel_values for im in images]
        kwargs: dict[str, torch.Tensor] = {}
        if self.model_type == "llava_next":
            tiles = max(p.shape[1] for p in pixels)
            pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in pixels]
            kwargs["image_sizes"] = torch.cat([im.extra["image_sizes"] for im in images]).to(device)
        elif self.uses_mrope:
            kwargs["image_grid_thw"] = torch.cat([im.extra["image_grid_thw"] for im in images]).to(device)
        pixel_values = torch.cat(pixels).to(device=device, dtype=dtype)
        out = self.model.model.get_image_features(pixel_values=pixel_values, **kwargs, return_dict=True)
        features = list(out.pooler_output)
        for feature, image in zip(features, images, strict=True):
            if feature.shape[0] != image.num_tokens:
                raise RuntimeError(
                    f"vision tower produced {feature.shape[0]} tokens for an image announced as {image.num_tokens}"
                )
        return features

    def _vision_device(self) -> torch.device:
        for name in self.vision_modules():
            module = getattr(self.model.model, name, None)
            if module is not None:
                return next(module.parameters()).device
        raise RuntimeError("this model's vision tower was dropped")

    def _vision_dtype(self) -> torch.dtype:
        for name in self.vision_modules():
            module = getattr(self.model.model, name, None)
            if module is not None:
                return next(module.parameters()).dtype
        raise RuntimeError("this model's vision tower was dropped")

    # -- text -----------------------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor, image_features: list[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with image features scattered at the placeholder positions.

        Parameters
        ----------
        token_ids : torch.LongTensor
            ``(T,)``.
        image_features : list[torch.Tensor]
            ``(n_i, hidden)`` per image, in placeholder order; ``sum n_i`` equals the placeholder count.

        Returns
        -------
        torch.Tensor
            ``(T, hidden)``.
        """
        embed_tokens = self.language_model.embed_tokens
        is_image = token_ids == self.image_token_id
        safe_ids = (
            token_ids.masked_fill(is_image, 0)
            if embed_tokens.num_embeddings <= self.image_token_id
            else token_ids
        )
        embeds = embed_tokens(safe_ids)
        if image_features:
            feats = torch.cat(image_features).to(device=embeds.device, dtype=embeds.dtype)
            embeds = embeds.masked_scatter(is_image[:, None], feats)
        return embeds

    def prompt_positions(
        self, token_ids: list[int], grids: list[tuple[int, int, int]] | None
    ) -> tuple[torch.Tensor, int]:
        """Rotary positions of a prompt and the position of the first generated token.

        Returns
        -------
        positions : torch.LongTensor
            ``(1, n)`` for 1-D RoPE, ``(3, n)`` for M-RoPE.
        next_position : int
            Position of the next token (M-RoPE: ``max + 1``, all three rows alike during decode).
        """
        n = len(token_ids)
        if not self.uses_mrope:
            return torch.arange(n)[None, :], n
        ids = torch.tensor([token_ids])
        mm_types = (ids == self.image_token_id).long()
        grid = torch.tensor(grids, dtype=torch.long) if grids else None
        if grid is None:
            positions = torch.arange(n)[None, :].expand(3, n)
            return positions.clone(), n
        positions, _ = self.model.model.get_rope_index(
            ids, mm_types, grid, None, attention_mask=torch.ones_like(ids)
        )
        positions = positions[:, 0, :]
        return positions, int(positions.max().item()) + 1
