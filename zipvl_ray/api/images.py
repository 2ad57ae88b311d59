"""Image intake: data URLs and (optionally) remote URLs -> validated PIL images.

Nothing reaches the image processor before passing these checks, in this order:

1. **Source.** ``data:image/{png,jpeg,webp};base64,...`` URLs always; ``http(s)`` URLs only when the
   host matches :attr:`ImageLimits.allowed_url_hosts` (empty by default: remote URLs are off). A host
   that resolves to a private, loopback, link-local or otherwise non-global address is refused unless
   :attr:`ImageLimits.allow_private_networks` (SSRF guard); the connection then goes to the address that
   was checked, so a second DNS answer cannot redirect it (no DNS rebinding). Redirects are followed
   only to hosts passing the same checks. Credentials in URLs are refused.
2. **Bytes.** Empty or over :attr:`ImageLimits.max_image_bytes` is refused before decoding (the base64
   length is checked before decoding it, a remote body while it streams in).
3. **Header.** Pillow opens the image lazily, restricted to the allowed formats (so no exotic decoder
   ever runs); the format must match the data URL's MIME type; width and height must be >= 1 and the
   pixel count <= :attr:`ImageLimits.max_image_pixels` *before* any pixel is decoded (decompression
   bomb guard); animated images and colour modes other than RGB-like ones (CMYK...) are refused; a JPEG
   with more than :data:`MAX_JPEG_SCANS` scans is refused (a progressive JPEG of thousands of tiny scans
   costs minutes of CPU to decode while its size stays small). A camera's multi-picture JPEG (MPO) is
   read as its first picture.
4. **Request.** All the images of one request together hold at most :attr:`ImageLimits.max_total_pixels`
   (checked on the headers, before any is decoded: a few kilobytes of headers may declare gigabytes).
5. **Pixels.** The image is decoded, truncated or corrupt data is refused, and the EXIF orientation is
   applied (as browsers and ``transformers.image_utils.load_image`` do). The decoded pixels of all the
   requests of one process together stay within :attr:`ImageLimits.pending_pixel_budget`
   (:class:`PixelBudget`): a request whose images do not fit waits for earlier ones to be preprocessed.

Every refusal is an :class:`~zipvl_ray.api.errors.APIError` (HTTP 400) whose message names the image
(``messages[0].content[1]``-style path when the caller passes it) and the limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import io
import ipaddress
import socket
import warnings
from typing import Literal
from urllib.parse import urljoin, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zipvl_ray.api.errors import APIError

ImageFormat = Literal["PNG", "JPEG", "WEBP"]

#: MIME type of each accepted format.
FORMAT_MIME: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MIME_FORMAT: dict[str, str] = {**{v: k for k, v in FORMAT_MIME.items()}, "image/jpg": "JPEG"}

#: Most scans (SOS markers) a JPEG may have. Baseline JPEGs have one per component group, progressive
#: ones about ten (libjpeg's default script); decode time grows with the scan count, whatever the size.
MAX_JPEG_SCANS = 100

#: The EXIF tag that says how to rotate / flip the stored pixels for display (1: as stored).
EXIF_ORIENTATION = 0x0112

#: Colour modes accepted (converted to RGB by the prompt processor). CMYK, 32-bit and float are refused.
ACCEPTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "La"})


class ImageLimits(BaseModel):
    """What the service accepts as images (part of the app's ``args``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_images: int = Field(
        16, ge=0, le=1024, description="Most images in one request (a video's frames count each)."
    )
    max_image_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="Largest encoded image, in bytes (after base64 decoding)."
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="Largest width x height, checked from the header before decoding (decompression bomb guard).",
    )
    max_image_side: int = Field(16384, ge=1, description="Largest width or height, in pixels.")
    max_total_pixels: int = Field(
        4 * 4096 * 4096,
        ge=1,
        description=(
            "Most pixels of all the images of one request together, checked from the headers before any is "
            "decoded (16 header-only JPEGs of 4096 x 4096 are 15 KB of JSON and 800 MB of pixels); at least "
            "max_image_pixels. The default takes five 12 MP photos or 64 frames of 1024 x 1024."
        ),
    )
    max_pending_pixels: int | None = Field(
        None,
        ge=1,
        description=(
            "Most decoded pixels held at once by all the requests one ingress replica prepares, from decoding "
            "to the end of image preprocessing; a request that does not fit waits (first come, first served). "
            "Each request is within max_total_pixels, but eight of them at once would be 0.5 G pixels (1.6 GB "
            "as RGB) from 2.5 MB of JSON. None (the default) is twice max_total_pixels; at least "
            "max_total_pixels."
        ),
    )
    max_aspect_ratio: float = Field(
        50.0,
        ge=1,
        description=(
            "Largest long side / short side. Image processors scale the short side up to their input size "
            "(a 16384 x 1 picture would become a 1.8M x 112 float array in LLaVA's), and Qwen2-VL's refuse "
            "ratios over 200."
        ),
    )
    allowed_formats: list[ImageFormat] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP"], min_length=1, description="Accepted image formats."
    )
    allowed_url_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Hosts http(s) image URLs may point to: exact names ('images.example.com') or '*.' suffix patterns "
            "('*.example.com'). Empty (the default) turns remote URLs off; only data URLs are accepted."
        ),
    )
    allow_private_networks: bool = Field(
        False,
        description=(
            "Allow allowlisted hosts that resolve to private, loopback or link-local addresses. Off by default "
            "(SSRF guard): turn on only for a trusted internal image store."
        ),
    )
    url_fetch_timeout_s: float = Field(
        10.0, gt=0, description="Total time allowed to fetch one remote image."
    )
    max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed when fetching a remote image.")

    @model_validator(mode="after")
    def _total_holds_one_image(self) -> ImageLimits:
        if self.max_total_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_total_pixels ({self.max_total_pixels}) must be at least max_image_pixels "
                f"({self.max_image_pixels}): a single allowed image would be refused"
            )
        if self.max_pending_pixels is not None and self.max_pending_pixels < self.max_total_pixels:
            raise ValueError(
                f"max_pending_pixels ({self.max_pending_pixels}) must be at least max_total_pixels "
                f"({self.max_total_pixels}): an allowed request would never fit"
            )
        return self

    @property
    def pending_pixel_budget(self) -> int:
        """:attr:`max_pending_pixels`, or twice :attr:`max_total_pixels` when it is None."""
        return self.max_pending_pixels if self.max_pending_pixels is not None else 2 * self.max_total_pixels

    @field_validator("allowed_url_hosts")
    @classmethod
    def _normalise_hosts(cls, hosts: list[str]) -> list[str]:
        out = []
        for host in hosts:
            host = host.strip().lower().rstrip(".")
            if not host or "/" in host or ":" in host.replace("::", "") and not _is_ip_literal(host):
                raise ValueError(
                    f"allowed_url_hosts entries are host names or '*.suffix' patterns, got {host!r}"
                )
            if "*" in host and not (host.startswith("*.") and "*" not in host[2:]):
                raise ValueError(f"only a leading '*.' wildcard is allowed, got {host!r}")
            out.append(host)
        return out

    @property
    def remote_urls_enabled(self) -> bool:
        return bool(self.allowed_url_hosts)


class PixelBudget:
    """Decoded pixels held at once by the requests of one process, granted first come, first served.

    Parameters
    ----------
    capacity : int
        Pixels; a request asking for more is granted the whole budget (it then waits for an empty one).

    ``await acquire(n)`` returns the pixels granted, to pass to :meth:`release`. Waiters are served in
    arrival order, so a large request is not starved by a stream of small ones. A caller cancelled while it
    waits takes nothing; one cancelled right after being granted gives its grant back.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for pixels."""
        return sum(1 for _, future in self._waiters if not future.done())

    async def acquire(self, pixels: int) -> int:
        pixels = min(max(pixels, 0), self.capacity)
        if not self._waiters and self.in_use + pixels <= self.capacity:
            self.in_use += pixels
            return pixels
        future = asyncio.get_running_loop().create_future()
        entry = (pixels, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():  # granted, then cancelled before it resumed
                self.release(pixels)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._grant()  # it may have been the head that held the others back
            raise
        return pixels

    def release(self, pixels: int) -> None:
        self.in_use -= pixels
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            pixels, future = self._waiters[0]
            if future.done():  # cancelled
                self._waiters.popleft()
                continue
            if self.in_use + pixels > self.capacity:
                return
            self._waiters.popleft()
            self.in_use += pixels
            future.set_result(None)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def host_allowed(host: str, patterns: list[str]) -> bool:
    """True when ``host`` equals a pattern or matches a ``*.suffix`` pattern (case-insensitive)."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def address_is_public(address: str) -> bool:
    """True for globally routable unicast addresses (what an SSRF guard lets through)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:  # judged by the IPv4 address it reaches
            return address_is_public(str(embedded))
    return ip.is_global and not ip.is_multicast


#: IPv6 prefixes that carry an IPv4 address in their last 32 bits and reach it: NAT64 (well-known and
#: local-use prefixes), IPv4-compatible, and IPv4-translated addresses.
_IPV4_CARRYING = tuple(
    ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96")
)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to (mapped, 6to4, NAT64...), or None."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _IPV4_CARRYING) and int(ip) & 0xFFFFFFFF:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


# ---------------------------------------------------------------------------------------------------
# Data URLs and bytes


def parse_data_url(url: str, limits: ImageLimits, *, where: str = "image") -> tuple[str, bytes]:
    """Split a ``data:<mime>;base64,<data>`` URL into its MIME type and decoded bytes.

    Raises
    ------
    APIError
        Not a base64 data URL, a MIME type that is not an accepted image format, too large, or bad base64.
    """
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:"):
        raise APIError(f"{where}: not a data URL", param=where, code="invalid_image_url")
    meta = header[5:].split(";")
    mime = meta[0].strip().lower()
    if "base64" not in [m.strip().lower() for m in meta[1:]]:
        raise APIError(
            f"{where}: data URLs must be base64-encoded (';base64,')", param=where, code="invalid_image_url"
        )
    accepted = {FORMAT_MIME[f] for f in limits.allowed_formats}
    if mime not in MIME_FORMAT or MIME_FORMAT[mime] not in limits.allowed_formats:
        raise APIError(
            f"{where}: MIME type {mime[:40]!r} is not accepted; send one of {', '.join(sorted(accepted))}",
            param=where,
            code="unsupported_image_type",
        )
    # ASCII whitespace is dropped, as the Fetch standard's forgiving-base64 decode (browsers) does: GNU
    # ``base64`` and many libraries wrap their output every 76 characters.
    payload = payload.translate(_BASE64_WHITESPACE)
    if len(payload) // 4 * 3 > limits.max_image_bytes + 3:
        raise APIError(
            f"{where}: the image is about {len(payload) // 4 * 3} bytes, over the limit of {limits.max_image_bytes}",
            param=where,
            code="image_too_large",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        hint = (
            " (URL-safe '-' / '_' characters: use the standard alphabet)"
            if "-" in payload or "_" in payload
            else ""
        )
        raise APIError(
            f"{where}: the data URL is not valid base64{hint}", param=where, code="invalid_image_data"
        ) from None
    return mime, data


#: What :func:`parse_data_url` removes from a base64 payload (the Fetch standard's ASCII whitespace).
_BASE64_WHITESPACE = str.maketrans("", "", " \t\n\f\r")


def decode_image(
    data: bytes, limits: ImageLimits, *, claimed_mime: str | None = None, where: str = "image"
) -> Image.Image:
    """Validate and decode encoded image bytes (:func:`open_image`, then :func:`load_pixels`)."""
    return load_pixels(open_image(data, limits, claimed_mime=claimed_mime, where=where), where=where)


def open_image(
    data: bytes, limits: ImageLimits, *, claimed_mime: str | None = None, where: str = "image"
) -> Image.Image:
    """Validate encoded image bytes up to the header (steps 2-3 of the module docstring); no pixel decoded.

    Parameters
    ----------
    data : bytes
        PNG, JPEG or WebP bytes.
    limits : ImageLimits
    claimed_mime : str, optional
        The MIME type the client declared; the decoded format must match it.
    where : str
        Names the image in error messages.

    Returns
    -------
    PIL.Image.Image
        The opened image (lazy: pixels not decoded yet), original mode.
    """
    if not data:
        raise APIError(f"{where}: the image is empty", param=where, code="invalid_image_data")
    if len(data) > limits.max_image_bytes:
        raise APIError(
            f"{where}: the image is {len(data)} bytes, over the limit of {limits.max_image_bytes}",
            param=where,
            code="image_too_large",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(limits.allowed_formats))
        except Image.DecompressionBombError:
            raise APIError(
                f"{where}: the image has too many pixels (limit {limits.max_image_pixels})",
                param=where,
                code="image_too_large",
            ) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise APIError(
                f"{where}: the data is not a decodable {'/'.join(limits.allowed_formats)} image",
                param=where,
                code="invalid_image_data",
            ) from None
        fmt = (image.format or "").upper()
        multi_picture = fmt == "MPO"  # a camera JPEG with a second picture (preview, gain map)
        if multi_picture:
            fmt = "JPEG"
        if claimed_mime is not None and MIME_FORMAT.get(claimed_mime) != fmt:
            raise APIError(
                f"{where}: declared as {claimed_mime} but the data is a {fmt or 'unknown'} image",
                param=where,
                code="unsupported_image_type",
            )
        width, height = image.size
        if width < 1 or height < 1:
            raise APIError(
                f"{where}: the image has zero size ({width}x{height})", param=where, code="invalid_image_data"
            )
        if width * height > limits.max_image_pixels:
            raise APIError(
                f"{where}: the image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{limits.max_image_pixels} pixels",
                param=where,
                code="image_too_large",
            )
        if max(width, height) > limits.max_image_side:
            raise APIError(
                f"{where}: the image is {width}x{height}, over the limit of {limits.max_image_side} pixels per side",
                param=where,
                code="image_too_large",
            )
        if max(width, height) > limits.max_aspect_ratio * min(width, height):
            raise APIError(
                f"{where}: the image is {width}x{height}, an aspect ratio of "
                f"{max(width, height) / min(width, height):.4g}:1, over the limit of {limits.max_aspect_ratio:g}:1",
                param=where,
                code="image_too_large",
            )
        if fmt == "JPEG" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
            raise APIError(
                f"{where}: the JPEG has {scans} scans, over the limit of {MAX_JPEG_SCANS}",
                param=where,
                code="invalid_image_data",
            )
        if not multi_picture and (getattr(image, "is_animated", False) or getattr(image, "n_frames", 1) > 1):
            raise APIError(
                f"{where}: animated images are not supported; send the frames as separate images",
                param=where,
                code="unsupported_image_type",
            )
        if image.mode not in ACCEPTED_MODES:
            raise APIError(
                f"{where}: colour mode {image.mode!r} is not supported (CMYK, 16-bit greyscale and float images "
                "are not); send an 8-bit RGB, RGBA or greyscale image",
                param=where,
                code="unsupported_image_type",
            )
    return image


def load_pixels(image: Image.Image, *, where: str = "image") -> Image.Image:
    """Decode an image from :func:`open_image` and apply its EXIF orientation (step 5).

    Returns
    -------
    PIL.Image.Image
        The decoded, upright image (original mode).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image.load()
        except Image.DecompressionBombError:
            raise APIError(
                f"{where}: the image has too many pixels", param=where, code="image_too_large"
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError):
            raise APIError(
                f"{where}: the image data is truncated or corrupt", param=where, code="invalid_image_data"
            ) from None
        try:
            if image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
                return ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - PIL's EXIF parser raises struct.error, IndexError, ... on bad tags
            pass  # an unreadable EXIF block: the pixels as stored
    return image


# ---------------------------------------------------------------------------------------------------
# Remote URLs


class _CheckedResolver:
    """An aiohttp resolver that refuses non-public addresses (unless allowed) and returns only checked ones."""

    def __init__(self, limits: ImageLimits, where: str):
        from aiohttp.resolver import DefaultResolver

        self._inner = DefaultResolver()
        self._limits = limits
        self._where = where

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        if not host_allowed(host, self._limits.allowed_url_hosts):
            raise APIError(
                f"{self._where}: host {host!r} is not in the URL allowlist",
                param=self._where,
                code="url_not_allowed",
            )
        try:
            answers = await self._inner.resolve(host, port, family)
        except (OSError, UnicodeError, ValueError):  # UnicodeError: a label the IDNA codec refuses
            raise APIError(
                f"{self._where}: host {host!r} does not resolve", param=self._where, code="url_fetch_failed"
            ) from None
        if not self._limits.allow_private_networks:
            for answer in answers:
                if not address_is_public(answer["host"]):
                    raise APIError(
                        f"{self._where}: host {host!r} resolves to a private, loopback or link-local address, which "
                        "is refused (SSRF guard)",
                        param=self._where,
                        code="url_not_allowed",
                    )
        return answers

    async def close(self) -> None:
        await self._inner.close()


def check_remote_url(url: str, limits: ImageLimits, *, where: str = "image") -> None:
    """Refuse a remote URL before any network access: scheme, credentials, allowlist, IP literals."""
    if not limits.remote_urls_enabled:
        raise APIError(
            f"{where}: remote image URLs are disabled on this server; send the image as a base64 data URL",
            param=where,
            code="url_not_allowed",
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed lazily: an out-of-range or non-numeric port raises here
    except ValueError as exc:  # "Invalid IPv6 URL", a bad port
        raise APIError(
            f"{where}: the image URL is malformed ({exc})", param=where, code="invalid_image_url"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise APIError(
            f"{where}: only data: and http(s) URLs are accepted", param=where, code="invalid_image_url"
        )
    if parts.username or parts.password:
        raise APIError(f"{where}: URLs with credentials are refused", param=where, code="invalid_image_url")
    host = parts.hostname
    try:  # what the resolver will do: an empty or over-long (> 63 characters) label is no host name
        host.encode("idna")
    except UnicodeError:
        raise APIError(
            f"{where}: the image URL's host name is malformed", param=where, code="invalid_image_url"
        ) from None
    if not host_allowed(host, limits.allowed_url_hosts):
        raise APIError(
            f"{where}: host {host!r} is not in the URL allowlist", param=where, code="url_not_allowed"
        )
    if _is_ip_literal(host) and not limits.allow_private_networks and not address_is_public(host):
        raise APIError(
            f"{where}: {host} is a private, loopback or link-local address, which is refused (SSRF guard)",
            param=where,
            code="url_not_allowed",
        )


async def fetch_image_bytes(
    url: str, limits: ImageLimits, *, where: str = "image"
) -> tuple[str | None, bytes]:
    """Download an allowlisted remote image with the SSRF guard, size limit and time limit.

    Returns
    -------
    (mime, data)
        The response's image MIME type (None when it did not say) and the body.
    """
    import aiohttp

    deadline = limits.url_fetch_timeout_s
    try:
        async with asyncio.timeout(deadline):
            connector = aiohttp.TCPConnector(
                resolver=_CheckedResolver(limits, where), use_dns_cache=False, force_close=True
            )
            async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
                current = url
                for _ in range(limits.max_redirects + 1):
                    check_remote_url(current, limits, where=where)
                    async with session.get(current, allow_redirects=False) as response:
                        if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                            try:
                                current = urljoin(current, response.headers["Location"])
                            except ValueError:  # a malformed Location ("Invalid IPv6 URL")
                                raise APIError(
                                    f"{where}: the image URL redirected to a malformed URL",
                                    param=where,
                                    code="invalid_image_url",
                                ) from None
                            continue
                        if response.status != 200:
                            raise APIError(
                                f"{where}: fetching the image URL returned HTTP {response.status}",
                                param=where,
                                code="url_fetch_failed",
                            )
                        return _content_mime(
                            response.headers.get("Content-Type"), where
                        ), await _read_limited(response, limits, where)
                raise APIError(
                    f"{where}: too many redirects (limit {limits.max_redirects})",
                    param=where,
                    code="url_fetch_failed",
                )
    except TimeoutError:
        raise APIError(
            f"{where}: fetching the image URL took longer than {deadline} s",
            param=where,
            code="url_fetch_timeout",
        ) from None
    except aiohttp.ClientError as exc:
        raise APIError(
            f"{where}: fetching the image URL failed ({type(exc).__name__})",
            param=where,
            code="url_fetch_failed",
        ) from None


def _content_mime(content_type: str | None, where: str) -> str | None:
    if not content_type:
        return None
    mime = content_type.split(";")[0].strip().lower()
    if mime == "application/octet-stream":
        return None
    if mime not in MIME_FORMAT:
        raise APIError(
            f"{where}: the URL returned content type {mime[:40]!r}, not an accepted image type",
            param=where,
            code="unsupported_image_type",
        )
    return mime


async def _read_limited(response, limits: ImageLimits, where: str) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_image_bytes:
        raise APIError(
            f"{where}: the remote image is {declared} bytes, over the limit of {limits.max_image_bytes}",
            param=where,
            code="image_too_large",
        )
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        total += len(chunk)
        if total > limits.max_image_bytes:
            raise APIError(
                f"{where}: the remote image is over the limit of {limits.max_image_bytes} bytes",
                param=where,
                code="image_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def load_image(url: str, limits: ImageLimits, *, where: str = "image") -> Image.Image:
    """A data URL or an allowlisted remote URL -> a validated, decoded image.

    The CPU part (base64 and image decoding) runs in a worker thread so the event loop stays free.
    """
    image = await open_image_url(url, limits, where=where)
    return await asyncio.to_thread(load_pixels, image, where=where)


async def open_image_url(url: str, limits: ImageLimits, *, where: str = "image") -> Image.Image:
    """A data URL or an allowlisted remote URL -> a validated image, opened but not decoded (:func:`open_image`)."""
    if url[:5].lower() == "data:":
        mime, data = await asyncio.to_thread(parse_data_url, url, limits, where=where)
    else:
        check_remote_url(url, limits, where=where)
        mime, data = await fetch_image_bytes(url, limits, where=where)
    return await asyncio.to_thread(open_image, data, limits, claimed_mime=mime, where=where)
