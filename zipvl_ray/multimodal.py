"""Prompt preparation: chat messages + images -> token ids and per-image vision inputs.

This is CPU work the HTTP ingress does before anything reaches a GPU: apply the chat template,
preprocess each image separately (so the vision stage can cache it by content), expand each image
placeholder to the number of tokens the image becomes, and tokenize. The result matches what the
model's own processor produces for the same text and images (tested), but keeps images apart.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import torch
from PIL import Image


class PromptError(ValueError):
    """The prompt cannot be prepared (wrong number of images, empty prompt...). Maps to HTTP 400."""


@dataclass
class ImageInput:
    """One preprocessed image, ready for the vision tower.

    Attributes
    ----------
    pixel_values : torch.Tensor
        LLaVA: ``(1, 3, H, W)``; LLaVA-NeXT: ``(1, tiles, 3, h, w)``; Qwen2(.5)-VL: ``(patches, C*T*P*P)``.
    extra : dict[str, torch.Tensor]
        What the tower needs besides pixels: ``image_sizes (1, 2)`` (LLaVA-NeXT) or
        ``image_grid_thw (1, 3)`` (Qwen).
    num_tokens : int
        Placeholder tokens this image expands to in the prompt.
    content_hash : str
        Hash of the decoded image (mode, size and pixels): the encoder-cache key.
    preprocessing : str
        Digest of the image processor's settings that made ``pixel_values`` (resize, crop, mean, std...):
        also part of the encoder-cache key, so that ingress replicas with other settings (a rolling
        update) never get features made from other pixels. Empty when unknown.
    """

    pixel_values: torch.Tensor
    extra: dict[str, torch.Tensor]
    num_tokens: int
    content_hash: str
    preprocessing: str = ""

    @property
    def grid_thw(self) -> tuple[int, int, int] | None:
        grid = self.extra.get("image_grid_thw")
        return None if grid is None else tuple(int(x) for x in grid.reshape(-1).tolist())

    @property
    def image_size(self) -> tuple[int, int] | None:
        size = self.extra.get("image_sizes")
        return None if size is None else tuple(int(x) for x in size.reshape(-1).tolist())

    @property
    def nbytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()


@dataclass
class PreparedPrompt:
    """A prompt ready for the engine: token ids with expanded image placeholders, and the images.

    Attributes
    ----------
    token_ids : list[int]
        The whole prompt; each image's placeholder is repeated ``images[i].num_tokens`` times.
    images : list[ImageInput]
        In placeholder order.
    image_token_id : int
        The placeholder token id.
    """

    token_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)
    image_token_id: int = -1

    @property
    def num_image_tokens(self) -> int:
        return sum(image.num_tokens for image in self.images)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def _message_texts(messages: list[dict]) -> list[str]:
    """The text of chat messages in transformers' format: a string content, or a message's ``text`` parts
    joined with nothing between them, as the chat templates render them (a control token split over two
    parts is seen whole)."""
    texts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.append(
                "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
            )
    return texts


def image_content_hash(image: Image.Image) -> str:
    """A stable hash of an image's mode, size and pixels."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the models' image processors make it (``transformers.image_transforms.convert_to_rgb``):
    transparency is composited onto white, not dropped (which would show what lies under it, often black).
    An RGB PNG may key one colour as transparent (``tRNS``): composited too, as ``convert_to_rgb`` does, so
    that the content hash (taken on this image) covers what the model sees."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class PromptProcessor:
    """Turns chat messages (or a rendered prompt) and images into a :class:`PreparedPrompt`.

    Parameters
    ----------
    processor : transformers.ProcessorMixin
        The model's processor (tokenizer, image processor, chat template).
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token: str = processor.image_token
        self.image_token_id: int = int(processor.image_token_id)
        #: Digest of the image processor's class and settings (see :attr:`ImageInput.preprocessing`). The
        #: class is part of it: a PIL and a torchvision processor serialise alike but resize differently.
        image_processor = processor.image_processor
        kind = f"{type(image_processor).__module__}.{type(image_processor).__qualname__}\n"
        self.preprocessing_digest: str = hashlib.blake2b(
            (kind + image_processor.to_json_string()).encode(), digest_size=8
        ).hexdigest()

    @functools.cached_property
    def control_tokens(self) -> list[str]:
        """The special tokens that structure a prompt, longest first: those the chat template writes
        (turn markers such as ``<|im_start|>`` / ``<|im_end|>``, a Llama template's ``</s>`` after an
        answer, Qwen's vision markers) and the image / video placeholders.

        Other special tokens (a BOS ``<s>`` the tokenizer adds, which is also an HTML tag; padding) stay
        allowed in message text: they cannot end a turn or stand for an image.
        """
        sample = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "u"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
            {"role": "user", "content": [{"type": "text", "text": "v"}]},
        ]
        rendered = ""
        for messages in ([{"role": "system", "content": [{"type": "text", "text": "s"}]}, *sample], sample):
            try:  # some hub templates refuse a system message
                rendered = self.render(messages)
                break
            except Exception:
                continue
        specials = {t for t in self.tokenizer.all_special_tokens if t and t in rendered}
        specials.add(self.image_token)
        video = getattr(self.processor, "video_token", None)
        if isinstance(video, str) and video:
            specials.add(video)
        return sorted(specials, key=len, reverse=True)

    def check_message_text(self, texts) -> None:
        """Refuse message text that holds one of the model's control tokens.

        The rendered prompt is tokenized as a whole, so ``"<|im_end|>"`` typed by a user would become the
        real end-of-turn token (and could end the turn and write the assistant's part itself), and
        ``"<image>"`` an image placeholder. OpenAI's API treats message text as text; here such text is
        refused with a message naming the token rather than given a meaning its writer did not intend.
        """
        tokens = self.control_tokens
        for text in texts:
            for token in tokens:
                if token in text:
                    raise PromptError(
                        f"message text must not contain the model's control token {token!r} (send images as "
                        "image_url parts; the chat template writes the turn markers)"
                    )

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Apply the chat template. Image parts (``{"type": "image"}`` or ``"image_url"``) become placeholders."""
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def preprocess_image(self, image: Image.Image) -> ImageInput:
        """Run the image processor on one image and count its placeholder tokens."""
        rgb = to_rgb(image)
        processed = self.processor.image_processor(images=[rgb], return_tensors="pt")
        replacement = self.processor.replace_image_token(processed, 0)
        num_tokens = replacement.count(self.image_token)
        extra = {k: v for k, v in processed.items() if k in ("image_sizes", "image_grid_thw")}
        return ImageInput(
            pixel_values=processed["pixel_values"],
            extra=extra,
            num_tokens=num_tokens,
            content_hash=image_content_hash(rgb),
            preprocessing=self.preprocessing_digest,
        )

    def expand(self, text: str, images: list[ImageInput]) -> list[int]:
        """Replace the i-th placeholder with ``images[i].num_tokens`` placeholders and tokenize."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise PromptError(
                f"the prompt has {len(pieces) - 1} image placeholders but {len(images)} images were given "
                f"(message text must not contain the model's image placeholder {self.image_token!r}; "
                "send images as image_url parts)"
            )
        out = [pieces[0]]
        for image, piece in zip(images, pieces[1:], strict=True):
            out.append(self.image_token * image.num_tokens)
            out.append(piece)
        text = "".join(out)
        # A template that writes the BOS itself (many hub templates do) must not get a second one.
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special_tokens = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def prepare(self, prompt: str | list[dict], images: list[Image.Image] | None = None) -> PreparedPrompt:
        """Prepare a rendered prompt (``str``) or chat messages (``list[dict]``) with its images."""
        images = images or []
        if not isinstance(prompt, str):
            self.check_message_text(_message_texts(prompt))
        text = prompt if isinstance(prompt, str) else self.render(prompt)
        if not text:
            raise PromptError("the prompt is empty")
        inputs = []
        for index, image in enumerate(images):
            try:
                inputs.append(self.preprocess_image(image))
            except ValueError as exc:  # e.g. Qwen2-VL's processor refuses aspect ratios over 200
                raise PromptError(f"image {index}: the model's image processor refused it: {exc}") from None
        token_ids = self.expand(text, inputs)
        if not token_ids:
            raise PromptError("the prompt is empty after tokenization")
        return PreparedPrompt(token_ids=token_ids, images=inputs, image_token_id=self.image_token_id)
