"""Image intake: data URL parsing, decoding limits, remote URL policy (allowlist, SSRF guard, limits)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from PIL import Image

from tests.api.helpers import MIME, animated, data_url, encode, image_data_url, png_header_only, random_image
from tests.deployments.conftest import free_port
from zipvl_ray.api.errors import APIError
from zipvl_ray.api.images import (
    ImageLimits,
    address_is_public,
    check_remote_url,
    decode_image,
    host_allowed,
    load_image,
    parse_data_url,
)

LIMITS = ImageLimits(max_image_bytes=200_000, max_image_pixels=512 * 512, max_image_side=1024)


def _load(url: str, limits: ImageLimits = LIMITS) -> Image.Image:
    return asyncio.run(load_image(url, limits, where="messages[0].content[0].image_url.url"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_their_size(fmt):
    image = _load(image_data_url(1, fmt, size=(33, 21)))
    assert image.size == (33, 21)
    assert image.format == fmt


@pytest.mark.parametrize(
    "url, code, fragment",
    [
        ("data:image/png;base64,", "invalid_image_data", "empty"),
        ("data:image/png;base64,@@@@", "invalid_image_data", "not valid base64"),
        ("data:image/png," + "abcd", "invalid_image_url", "base64-encoded"),
        (
            "data:image/gif;base64," + image_data_url(0, "GIF").split(",")[1],
            "unsupported_image_type",
            "image/gif",
        ),
        ("data:text/plain;base64,aGVsbG8=", "unsupported_image_type", "text/plain"),
        ("data:image/svg+xml;base64,PHN2Zy8+", "unsupported_image_type", "image/svg+xml"),
        (data_url(b"not an image at all"), "invalid_image_data", "not a decodable"),
        (
            data_url(encode(random_image(0), "JPEG"), "image/png"),
            "unsupported_image_type",
            "declared as image/png",
        ),
        (data_url(encode(random_image(0), "PNG")[:200]), "invalid_image_data", "truncated or corrupt"),
        (data_url(png_header_only(100_000, 100_000)), "image_too_large", "pixels"),
        (data_url(png_header_only(600, 600)), "image_too_large", "over the limit of 262144 pixels"),
        (data_url(png_header_only(2000, 10)), "image_too_large", "per side"),
        (
            data_url(png_header_only(1000, 10)),
            "image_too_large",
            "aspect ratio of 100:1, over the limit of 50:1",
        ),
        (data_url(png_header_only(3, 600)), "image_too_large", "aspect ratio of 200:1"),
        (data_url(png_header_only(0, 10)), "invalid_image_data", ""),
        (data_url(encode(random_image(0, (300, 300)), "PNG")), "image_too_large", "bytes"),
        (data_url(animated("PNG")), "unsupported_image_type", "animated"),
        (data_url(animated("WEBP"), "image/webp"), "unsupported_image_type", "animated"),
        (
            data_url(encode(random_image(0).convert("CMYK"), "JPEG"), "image/jpeg"),
            "unsupported_image_type",
            "CMYK",
        ),
        (data_url(encode(random_image(0).convert("I;16"), "PNG")), "unsupported_image_type", "colour mode"),
        ("ftp://example.com/cat.png", "url_not_allowed", "remote image URLs are disabled"),
        ("file:///etc/passwd", "url_not_allowed", "disabled"),
        ("https://example.com/cat.png", "url_not_allowed", "disabled"),
    ],
)
def test_bad_images_are_refused_with_a_named_reason(url, code, fragment):
    with pytest.raises(APIError) as info:
        _load(url)
    error = info.value
    assert error.status_code == 400
    assert error.code == code
    assert fragment in error.message
    assert error.message.startswith("messages[0].content[0].image_url.url:")
    assert error.param == "messages[0].content[0].image_url.url"


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "1"])
def test_rgb_like_modes_are_accepted(mode):
    assert _load(data_url(encode(random_image(2).convert(mode), "PNG"))).mode == mode


def test_base64_size_is_checked_before_decoding():
    # 1 MB of base64 against a 1 KB limit: refused from the length alone.
    limits = ImageLimits(max_image_bytes=1024)
    with pytest.raises(APIError, match="over the limit of 1024"):
        parse_data_url("data:image/png;base64," + "A" * 1_000_000, limits)


def test_decode_image_checks_the_declared_mime_only_when_given():
    png = encode(random_image(3), "PNG")
    assert decode_image(png, LIMITS).format == "PNG"
    with pytest.raises(APIError, match="declared as image/webp"):
        decode_image(png, LIMITS, claimed_mime=MIME["WEBP"])


@pytest.mark.parametrize(
    "host, patterns, allowed",
    [
        ("images.example.com", ["images.example.com"], True),
        ("IMAGES.example.com.", ["images.example.com"], True),
        ("a.images.example.com", ["*.example.com"], True),
        ("example.com", ["*.example.com"], False),
        ("evil-example.com", ["*.example.com"], False),
        ("example.com.evil.org", ["example.com"], False),
        ("other.org", [], False),
    ],
)
def test_host_allowlist(host, patterns, allowed):
    assert host_allowed(host, patterns) is allowed


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        # IPv6 forms that reach an embedded IPv4 address were judged as IPv6 (a review): now by that IPv4
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 to the cloud metadata address
        ("64:ff9b::808:808", True),  # NAT64 to 8.8.8.8
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
        ("::ffff:0:7f00:1", False),  # IPv4-translated 127.0.0.1
    ],
)
def test_ssrf_guard_address_classes(address, public):
    assert address_is_public(address) is public


@pytest.mark.parametrize(
    "url, limits, fragment",
    [
        ("https://cdn.example.com/a.png", ImageLimits(), "disabled"),
        (
            "https://other.org/a.png",
            ImageLimits(allowed_url_hosts=["cdn.example.com"]),
            "not in the URL allowlist",
        ),
        (
            "https://user:pw@cdn.example.com/a.png",
            ImageLimits(allowed_url_hosts=["cdn.example.com"]),
            "credentials",
        ),
        ("gopher://cdn.example.com/a.png", ImageLimits(allowed_url_hosts=["cdn.example.com"]), "http(s)"),
        ("http://127.0.0.1/a.png", ImageLimits(allowed_url_hosts=["127.0.0.1"]), "SSRF"),
        ("http://[::1]/a.png", ImageLimits(allowed_url_hosts=["::1"]), "SSRF"),
        ("http://169.254.169.254/latest", ImageLimits(allowed_url_hosts=["169.254.169.254"]), "SSRF"),
        ("http://[::1/a.png", ImageLimits(allowed_url_hosts=["::1"]), "malformed (Invalid IPv6 URL)"),
        ("http://cdn.example.com:abc/a.png", ImageLimits(allowed_url_hosts=["cdn.example.com"]), "malformed"),
        (
            "http://cdn.example.com:99999/a.png",
            ImageLimits(allowed_url_hosts=["cdn.example.com"]),
            "malformed",
        ),
        # labels the IDNA codec refuses (empty, over 63 characters): a 400, not the resolver's UnicodeError
        (
            f"http://{'a' * 64}.example.com/a.png",
            ImageLimits(allowed_url_hosts=["*.example.com"]),
            "host name",
        ),
        ("http://a..example.com/a.png", ImageLimits(allowed_url_hosts=["*.example.com"]), "host name"),
    ],
)
def test_remote_urls_refused_before_any_network_access(url, limits, fragment):
    with pytest.raises(APIError) as info:
        check_remote_url(url, limits)
    assert fragment in info.value.message
    assert info.value.status_code == 400


def test_the_resolver_turns_a_host_the_idna_codec_refuses_into_a_400():
    """Reached by a redirect to such a host (the first URL is checked before any network access)."""
    from zipvl_ray.api.images import _CheckedResolver

    async def resolve():
        resolver = _CheckedResolver(ImageLimits(allowed_url_hosts=["*.example.com"]), "image")
        try:
            return await resolver.resolve(f"{'a' * 64}.example.com", 80)
        finally:
            await resolver.close()

    with pytest.raises(APIError) as info:
        asyncio.run(resolve())
    assert info.value.status_code == 400 and info.value.code == "url_fetch_failed"


def test_allowlist_entries_are_validated():
    with pytest.raises(ValueError, match="wildcard"):
        ImageLimits(allowed_url_hosts=["images.*.com"])
    with pytest.raises(ValueError, match="host names"):
        ImageLimits(allowed_url_hosts=["https://example.com/"])


# ---------------------------------------------------------------------------------------------------
# Fetching from a real local HTTP server


@asynccontextmanager
async def image_server():
    """A local server: /ok.png, /big.png, /slow.png, /html, /missing, /redirect-out, /redirect-in."""
    png = encode(random_image(7), "PNG")

    async def ok(_):
        return web.Response(body=png, content_type="image/png")

    async def big(_):
        return web.Response(body=b"\x89PNG" + b"0" * 300_000, content_type="image/png")

    async def chunked_big(_):
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(_)
        for _i in range(50):
            await response.write(b"0" * 10_000)
        return response

    async def slow(_):
        await asyncio.sleep(5)
        return web.Response(body=png, content_type="image/png")

    async def html(_):
        return web.Response(text="<html></html>", content_type="text/html")

    async def redirect_out(_):
        raise web.HTTPFound("http://not-allowlisted.invalid/x.png")

    async def redirect_in(request):
        raise web.HTTPFound(f"http://localhost:{request.url.port}/ok.png")

    async def redirect_malformed(_):
        return web.Response(status=302, headers={"Location": "http://[::1/x.png"})

    app = web.Application()
    for path, handler in [
        ("/ok.png", ok),
        ("/big.png", big),
        ("/chunked.png", chunked_big),
        ("/slow.png", slow),
        ("/html", html),
        ("/redirect-out", redirect_out),
        ("/redirect-in", redirect_in),
        ("/redirect-malformed", redirect_malformed),
    ]:
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://localhost:{port}"
    finally:
        await runner.cleanup()


TRUSTED = ImageLimits(
    allowed_url_hosts=["localhost"],
    allow_private_networks=True,
    max_image_bytes=200_000,
    url_fetch_timeout_s=3.0,  # room for a stalled machine; /slow.png takes 5 s
)


@pytest.mark.parametrize(
    "path, limits, outcome",
    [
        ("/ok.png", TRUSTED, (40, 56)),
        ("/redirect-in", TRUSTED, (40, 56)),
        ("/ok.png", TRUSTED.model_copy(update={"allow_private_networks": False}), "SSRF"),
        ("/big.png", TRUSTED, "over the limit of 200000"),
        ("/chunked.png", TRUSTED, "over the limit of 200000"),
        ("/slow.png", TRUSTED, "longer than 3.0 s"),
        ("/html", TRUSTED, "text/html"),
        ("/missing", TRUSTED, "HTTP 404"),
        ("/redirect-out", TRUSTED, "not in the URL allowlist"),
        ("/redirect-in", TRUSTED.model_copy(update={"max_redirects": 0}), "too many redirects"),
        ("/redirect-malformed", TRUSTED, "redirected to a malformed URL"),
    ],
)
def test_remote_fetch(path, limits, outcome):
    async def run():
        async with image_server() as base:
            return await load_image(base + path, limits)

    if isinstance(outcome, tuple):
        assert run_image_size(run) == outcome
    else:
        with pytest.raises(APIError) as info:
            asyncio.run(run())
        assert outcome in info.value.message
        assert info.value.status_code == 400


def run_image_size(coroutine_factory) -> tuple[int, int]:
    return asyncio.run(coroutine_factory()).size


def _progressive_jpeg_with_extra_scans(extra: int) -> bytes:
    """A small progressive JPEG with ``extra`` copies of its smallest refinement scan appended: each copy
    costs the decoder a pass over the whole image (a scan bomb)."""
    import io
    import struct

    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    segments, i = [], 2
    while data[i + 1] != 0xD9:
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        end = i + 2 + length
        if data[i + 1] == 0xDA:  # a scan: its header, then entropy-coded data up to the next marker
            while not (data[end] == 0xFF and data[end + 1] != 0x00 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        segments.append(data[i:end])
        i = end
    scans = [s for s in segments if s[1] == 0xDA]
    return data[:2] + b"".join(segments) + min(scans[1:], key=len) * extra + b"\xff\xd9"


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding():
    assert decode_image(_progressive_jpeg_with_extra_scans(20), LIMITS).size == (64, 64)
    with pytest.raises(APIError, match="scans, over the limit of 100") as info:
        decode_image(_progressive_jpeg_with_extra_scans(2000), LIMITS)
    assert info.value.code == "invalid_image_data"


def test_exif_orientation_is_applied_and_multi_picture_jpegs_read_as_their_first_picture():
    import io

    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    random_image(4, size=(40, 20)).save(buffer, "JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), LIMITS, claimed_mime="image/jpeg").size == (20, 40)

    buffer = io.BytesIO()
    first, second = random_image(5, size=(48, 32)), random_image(6, size=(24, 16))
    first.save(buffer, "MPO", save_all=True, append_images=[second])
    image = decode_image(buffer.getvalue(), LIMITS, claimed_mime="image/jpeg")
    assert image.size == (48, 32)


def test_an_unreadable_exif_block_leaves_the_pixels_as_stored():
    """A tag stored with the wrong type (here ASCII text under 0x0118, a SHORT tag) makes PIL's EXIF
    parser raise ``struct.error`` while transposing: the image is still read, as stored."""
    import io

    image = random_image(8, size=(32, 24))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: would rotate
    exif[0x010F] = "Cam"  # Make (ASCII); its id is rewritten below
    raw = exif.tobytes()
    assert raw.count(b"\x01\x0f\x00\x02") == 1  # big-endian entry: tag 0x010F, type 2 (ASCII)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=raw.replace(b"\x01\x0f\x00\x02", b"\x01\x18\x00\x02"))
    assert decode_image(buffer.getvalue(), LIMITS, claimed_mime="image/jpeg").size == (32, 24)


def test_the_images_of_one_request_are_limited_in_pixels_together(prompt_processor):
    """Headers are read first and counted together: a few KB of headers must not declare gigabytes."""
    from zipvl_ray.api.chat import ChatPreparer, ServingSettings
    from zipvl_ray.api.schemas import ChatCompletionRequest

    limits = ImageLimits(max_image_pixels=256 * 256, max_total_pixels=3 * 256 * 256)
    with pytest.raises(ValueError, match="must be at least max_image_pixels"):
        ImageLimits(max_image_pixels=256 * 256, max_total_pixels=100)
    settings = ServingSettings(served_model_name="m", model_source="m", max_model_len=512, images=limits)
    preparer = ChatPreparer(prompt_processor, settings)

    def request(n: int) -> ChatCompletionRequest:
        parts = [
            {"type": "image_url", "image_url": {"url": data_url(png_header_only(256, 256), MIME["PNG"])}}
        ]
        return ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [{"role": "user", "content": parts * n + [{"type": "text", "text": "?"}]}],
            }
        )

    with pytest.raises(APIError, match="4 images hold 262144 pixels together, over the limit of 196608"):
        asyncio.run(preparer.load_images(request(4)))
    with pytest.raises(APIError, match="truncated or corrupt"):  # 3 pass the total; then each is decoded
        asyncio.run(preparer.load_images(request(3)))


def test_the_pixel_budget_grants_in_arrival_order_and_survives_cancellation():
    """:class:`PixelBudget`: first come, first served (a large request is not passed by small ones), a
    request over the capacity gets the whole budget, a caller cancelled while waiting takes nothing, and one
    cancelled right after its grant gives it back."""
    from zipvl_ray.api.images import PixelBudget

    async def scenario():
        budget = PixelBudget(100)
        assert await budget.acquire(60) == 60
        big = asyncio.ensure_future(budget.acquire(80))
        small = asyncio.ensure_future(budget.acquire(10))  # would fit now, but waits behind the large one
        await asyncio.sleep(0)
        assert not big.done() and not small.done() and budget.waiting == 2
        budget.release(60)
        assert await big == 80 and await small == 10 and budget.in_use == 90
        budget.release(80)
        budget.release(10)
        assert await budget.acquire(500) == 100  # over the capacity: the whole budget, when it is empty
        cancelled = asyncio.ensure_future(budget.acquire(30))
        behind = asyncio.ensure_future(budget.acquire(20))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        budget.release(100)
        assert await behind == 20 and budget.in_use == 20  # the cancelled waiter took nothing
        granted_then_cancelled = asyncio.ensure_future(budget.acquire(90))
        await asyncio.sleep(0)
        budget.release(20)  # grants it...
        granted_then_cancelled.cancel()  # ...and it is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await granted_then_cancelled
        assert budget.in_use == 0 and budget.waiting == 0

    asyncio.run(scenario())


def test_requests_prepared_at_once_hold_at_most_the_pending_pixel_budget(prompt_processor, monkeypatch):
    """Every request is within ``max_total_pixels``, but many at once held many times that decoded (a
    review: eight requests of 313 KB of JSON took 3 GB). The decoded pixels of all requests in preparation
    stay within ``max_pending_pixels`` from decoding until image preprocessing has ended; the others wait,
    and every request is answered."""
    import zipvl_ray.api.chat as chat_module
    from zipvl_ray.api.chat import ChatPreparer, ServingSettings
    from zipvl_ray.api.schemas import ChatCompletionRequest

    with pytest.raises(ValueError, match="max_pending_pixels .* must be at least max_total_pixels"):
        ImageLimits(max_image_pixels=64 * 64, max_total_pixels=4 * 64 * 64, max_pending_pixels=64 * 64)
    assert ImageLimits().pending_pixel_budget == 2 * ImageLimits().max_total_pixels
    limits = ImageLimits(
        max_image_pixels=64 * 64, max_total_pixels=2 * 64 * 64, max_pending_pixels=3 * 64 * 64
    )
    settings = ServingSettings(served_model_name="m", model_source="m", max_model_len=512, images=limits)
    preparer = ChatPreparer(prompt_processor, settings)
    held, peak = [0], [0]
    real_load, real_prepare = chat_module.load_pixels, preparer._prepare_sync

    def load_pixels(image, *, where):
        out = real_load(image, where=where)
        held[0] += out.width * out.height
        peak[0] = max(peak[0], held[0])
        return out

    def prepare_sync(request, images):
        import time

        time.sleep(0.05)  # preprocessing takes a while: the others must wait for it, not only for decoding
        try:
            return real_prepare(request, images)
        finally:
            held[0] -= sum(image.width * image.height for image in images)

    monkeypatch.setattr(chat_module, "load_pixels", load_pixels)
    monkeypatch.setattr(preparer, "_prepare_sync", prepare_sync)
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url(i, size=(64, 64))}}
                        for i in range(2)
                    ]
                    + [{"type": "text", "text": "?"}],
                }
            ],
        }
    )

    async def scenario():
        return await asyncio.gather(*(preparer.prepare(request) for _ in range(6)))

    prepared = asyncio.run(scenario())
    assert len(prepared) == 6 and all(p.prompt.num_image_tokens > 0 for p in prepared)
    assert peak[0] == 2 * 64 * 64  # one request's images at a time: two would be 4 x 64 x 64 > 3 x 64 x 64
    assert preparer.pixel_budget.in_use == 0 and held[0] == 0


def test_line_wrapped_base64_is_accepted_and_url_safe_base64_gets_a_hint():
    """GNU ``base64`` wraps its output every 76 characters; browsers' data URLs (the Fetch standard's
    forgiving-base64) ignore ASCII whitespace, so this does too (it was a bare "not valid base64"). The
    URL-safe alphabet stays refused, with a hint."""
    import base64 as b64
    import textwrap

    png = encode(random_image(3, (40, 56)), "PNG")
    wrapped = "\n".join(textwrap.wrap(b64.b64encode(png).decode(), 76)) + "\n"
    assert parse_data_url(f"data:image/png;base64,{wrapped}", LIMITS) == ("image/png", png)
    assert _load(f"data:image/png;base64,{wrapped}").size == random_image(3, (40, 56)).size
    url_safe = b64.urlsafe_b64encode(b"\xfb\xff" * 30 + png).decode()
    with pytest.raises(APIError, match="URL-safe"):
        parse_data_url(f"data:image/png;base64,{url_safe}", LIMITS)
