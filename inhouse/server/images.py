"""Images in chat messages: from ``image_url`` parts to decoded PIL images, within the configured limits.

Owns the rules every vision engine relies on: ``data:`` URLs (base64 PNG, JPEG or WebP, checked by decoding
them with Pillow), ``http(s)`` URLs only from ``images.allowed_hosts`` (fetched with a timeout and a size
limit; the server never fetches from anywhere else), at most ``images.max_images`` per request,
``images.max_bytes`` per image and ``images.max_pixels`` per image.  Errors are OpenAI-shaped with
``param: messages.N.content.M``: 413 for a too large image (with the numbers), 400 for everything else.

The decoded images (RGB ``PIL.Image.Image``) go to the engine in ``GenerateRequest.images``, in order of
appearance; the message parts keep their URLs (an upstream engine forwards them as sent).  Holds no state.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from inhouse.config import ImageSettings
from inhouse.engine.base import GenerateRequest
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["FORMATS", "decode_image", "image_parts", "with_images", "without_image_data"]

FORMATS = ("PNG", "JPEG", "WEBP")
_DETAILS = ("auto", "low", "high")


def image_parts(messages: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(param, image_url object) of every image part, in order: ``messages.N.content.M``."""
    out: list[tuple[str, dict[str, Any]]] = []
    for n, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            out.extend((f"messages.{n}.content.{m}", part["image_url"]) for m, part in enumerate(content)
                       if part.get("type") == "image_url")
    return out


def without_image_data(message: dict[str, Any]) -> dict[str, Any]:
    """A wire message (as dumped) with each ``data:`` image URL shortened to its header and size, for the audit
    log's kept text: the prompt's words are kept, megabytes of base64 are not."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        image = part.get("image_url") if isinstance(part, dict) else None
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(url, str) and url[:5].lower() == "data:":
            header, _, payload = url.partition(",")
            short = f"{header},[{len(payload)} characters]"
            part = {**part, "image_url": {**image, "url": short} if isinstance(image, dict) else short}
        parts.append(part)
    return {**message, "content": parts}


async def with_images(requests: list[GenerateRequest], settings: ImageSettings) -> list[GenerateRequest]:
    """The requests with their messages' images decoded (every choice shares the same messages), or an error."""
    if not requests or not requests[0].messages:
        return requests
    parts = image_parts(requests[0].messages)
    if not parts:
        return requests
    if len(parts) > settings.max_images:
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"this request has {len(parts)} images; this server takes at "
                           f"most {settings.max_images} per request (images.max_images)", param=parts[-1][0])
    images = []
    for param, image_url in parts:
        data = await _image_bytes(param, image_url, settings)
        images.append(await asyncio.to_thread(decode_image, data, param, settings))
    return [replace(request, images=tuple(images)) for request in requests]


async def _image_bytes(param: str, image_url: dict[str, Any], settings: ImageSettings) -> bytes:
    url = image_url.get("url")
    detail = image_url.get("detail", "auto")
    if detail not in _DETAILS:
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"image detail must be one of {', '.join(_DETAILS)}, "
                           f"not {detail!r}", param=param)
    if not isinstance(url, str) or not url:
        raise InhouseError(ErrorCode.INVALID_REQUEST, "an image_url part needs a url", param=param)
    if url[:5].lower() == "data:":
        return _data_url(url, param, settings)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise InhouseError(ErrorCode.INVALID_REQUEST, "an image url must be a data: URL (base64 PNG, JPEG or WebP)"
                           f"{' or http(s)' if settings.allowed_hosts else ''}, not {scheme or 'a relative'} URL",
                           param=param)
    host = (urlsplit(url).hostname or "").lower()
    if host not in {h.lower() for h in settings.allowed_hosts}:
        allowed = ", ".join(settings.allowed_hosts)
        raise InhouseError(ErrorCode.INVALID_REQUEST,
                           f"this server does not fetch images from {host or 'that URL'}; send the image inline as a "
                           "data: URL (base64)" + (f", or from one of: {allowed} (images.allowed_hosts)" if allowed
                                                   else " (no image hosts are allowed: images.allowed_hosts)"),
                           param=param)
    return await _fetch(url, param, settings)


def _too_large(size: str, param: str, settings: ImageSettings) -> InhouseError:
    return InhouseError(ErrorCode.BODY_TOO_LARGE, f"this image is {size}; this server takes images of at most "
                        f"{settings.max_bytes} bytes (images.max_bytes)", param=param)


def _data_url(url: str, param: str, settings: ImageSettings) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise InhouseError(ErrorCode.INVALID_REQUEST, "an image data: URL must be base64 "
                           "(data:image/png;base64,...)", param=param)
    payload = payload.strip()
    size = len(payload) * 3 // 4 - (len(payload) - len(payload.rstrip("=")))  # the decoded size, before decoding
    if size > settings.max_bytes:
        raise _too_large(f"{size} bytes", param, settings)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InhouseError(ErrorCode.INVALID_REQUEST, "this image's data: URL is not valid base64",
                           param=param) from None
    if len(data) > settings.max_bytes:
        raise _too_large(f"{len(data)} bytes", param, settings)
    return data


async def _fetch(url: str, param: str, settings: ImageSettings) -> bytes:
    """GET an image from an allowed host, at most ``max_bytes`` of it, within ``fetch_timeout_s``."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=settings.fetch_timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise InhouseError(ErrorCode.INVALID_REQUEST, f"fetching the image answered HTTP {response.status}",
                                   param=param)
            data = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                data += chunk
                if len(data) > settings.max_bytes:
                    raise _too_large(f"more than {settings.max_bytes} bytes", param, settings)
            return bytes(data)
    except (aiohttp.ClientError, TimeoutError):
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"the image could not be fetched within "
                           f"{settings.fetch_timeout_s:g} s", param=param) from None


def decode_image(data: bytes, param: str, settings: ImageSettings) -> Any:
    """The image in ``data`` as an RGB PIL image, or a 400 (not an image, a format other than PNG, JPEG, WebP)
    or a 413 (more pixels than ``max_pixels``)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind, (width, height) = probe.format, probe.size
            if kind in FORMATS and width * height <= settings.max_pixels:
                probe.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InhouseError(ErrorCode.INVALID_REQUEST, "this image could not be decoded; send a PNG, JPEG or WebP "
                           "image", param=param) from None
    if kind not in FORMATS:
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"images in {kind} format are not supported; send PNG, JPEG "
                           "or WebP", param=param)
    if width * height > settings.max_pixels:
        raise InhouseError(ErrorCode.BODY_TOO_LARGE, f"this image is {width}×{height} = {width * height} pixels; this "
                           f"server takes at most {settings.max_pixels} pixels per image (images.max_pixels)",
                           param=param)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError):
        raise InhouseError(ErrorCode.INVALID_REQUEST, "this image could not be decoded; send a PNG, JPEG or WebP "
                           "image", param=param) from None
