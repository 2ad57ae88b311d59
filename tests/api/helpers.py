"""Image and request builders shared by the API and deployment tests."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image

MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def random_image(seed: int, size: tuple[int, int] = (40, 56), mode: str = "RGB") -> Image.Image:
    """A deterministic random image of ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG", **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_data_url(seed: int = 0, fmt: str = "PNG", size: tuple[int, int] = (40, 56)) -> str:
    return data_url(encode(random_image(seed, size), fmt), MIME[fmt])


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with almost no pixel data (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def animated(fmt: str) -> bytes:
    frames = [random_image(i, (16, 16)) for i in range(3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def user_message(text: str, image_urls: list[str] | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls or []]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def chat_body(text: str = "What is this?", image_urls: list[str] | None = None, **extra) -> dict:
    body = {
        "model": "tiny-llava",
        "messages": [user_message(text, image_urls)],
        "max_tokens": 64,
        "temperature": 0,
    }
    body.update(extra)
    return body
