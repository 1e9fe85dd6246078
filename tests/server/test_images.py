"""inhouse.server.images: data: URLs decoded and checked, limits with their numbers, http(s) only from allowed hosts
(fetched from a real loopback server), errors naming ``messages.N.content.M``."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from inhouse.config import ImageSettings
from inhouse.engine.base import GenerateRequest, SamplingParams
from inhouse.errors import ErrorCode, InhouseError
from inhouse.server.images import image_parts, with_images, without_image_data


def picture(color: str = "red", size: tuple[int, int] = (20, 10), kind: str = "PNG") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=kind)
    return out.getvalue()


def url_of(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def requests(*urls: str, choices: int = 1) -> list[GenerateRequest]:
    messages = ({"role": "system", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "look"}] + [
                    {"type": "image_url", "image_url": {"url": u}} for u in urls]})
    return [GenerateRequest(f"r-{i}", SamplingParams(), messages=messages) for i in range(choices)]


async def refused(reqs: list[GenerateRequest], settings: ImageSettings | None = None) -> InhouseError:
    with pytest.raises(InhouseError) as caught:
        await with_images(reqs, settings or ImageSettings())
    return caught.value


async def test_images_are_decoded_in_order_for_every_choice() -> None:
    out = await with_images(requests(url_of(picture("red")), url_of(picture("blue", kind="JPEG"), "image/jpeg"),
                                     choices=2), ImageSettings())
    assert len(out) == 2
    for request in out:
        assert [image.size for image in request.images] == [(20, 10), (20, 10)]
        assert request.images[0].mode == "RGB"
        assert request.images[0].getpixel((0, 0)) == (255, 0, 0)
        assert request.messages == out[0].messages  # the parts keep their URLs


async def test_text_only_requests_are_returned_as_they_are() -> None:
    reqs = [GenerateRequest("r", SamplingParams(), messages=({"role": "user", "content": "hello"},))]
    assert await with_images(reqs, ImageSettings()) is reqs


def test_image_parts_name_their_place() -> None:
    assert [p for p, _ in image_parts(requests(url_of(b"x"), url_of(b"y"))[0].messages or ())] == [
        "messages.1.content.1", "messages.1.content.2"]


@pytest.mark.parametrize(("url", "status", "words"), [
    ("data:image/png;base64,@@@@", 400, "base64"),
    ("data:image/png,rawbytes", 400, "base64"),
    (url_of(b"plain text"), 400, "decoded"),
    (url_of(picture(kind="GIF"), "image/gif"), 400, "GIF"),
    (url_of(picture(kind="BMP"), "image/bmp"), 400, "BMP"),
    ("ftp://files/cat.png", 400, "data: URL"),
    ("http://10.0.0.5/cat.png", 400, "10.0.0.5"),
])
async def test_bad_images_are_400_naming_the_part(url: str, status: int, words: str) -> None:
    error = await refused(requests(url))
    assert (error.code, error.param) == (ErrorCode.INVALID_REQUEST, "messages.1.content.1")
    assert words in error.message


async def test_limits_give_their_numbers() -> None:
    big = await refused(requests(url_of(picture(size=(200, 200)))), ImageSettings(max_pixels=10000))
    assert big.code is ErrorCode.BODY_TOO_LARGE and "40000" in big.message and "10000" in big.message
    heavy = await refused(requests(url_of(bytes(5000))), ImageSettings(max_bytes=1000))
    assert heavy.code is ErrorCode.BODY_TOO_LARGE and "5000" in heavy.message and "1000" in heavy.message
    many = await refused(requests(*[url_of(picture())] * 3), ImageSettings(max_images=2))
    assert many.code is ErrorCode.INVALID_REQUEST and "3 images" in many.message
    assert many.param == "messages.1.content.3"


async def test_detail_is_accepted_and_checked() -> None:
    reqs = requests(url_of(picture()))
    assert reqs[0].messages is not None
    part: dict[str, Any] = reqs[0].messages[1]["content"][1]
    for detail in ("low", "high", "auto"):
        part["image_url"]["detail"] = detail
        assert len((await with_images(reqs, ImageSettings()))[0].images) == 1
    part["image_url"]["detail"] = "max"
    assert "detail" in (await refused(reqs)).message


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A loopback HTTP server: /cat.png is a picture, /big.png is 100 kB, anything else 404."""
    body = picture("green")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            payload = {"/cat.png": body, "/big.png": bytes(100_000)}.get(self.path)
            self.send_response(200 if payload is not None else 404)
            self.send_header("Content-Length", str(len(payload or b"")))
            self.end_headers()
            self.wfile.write(payload or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


async def test_allowed_hosts_are_fetched_within_limits(image_host: str) -> None:
    allowed = ImageSettings(allowed_hosts=("127.0.0.1",), max_bytes=50_000)
    out = await with_images(requests(image_host + "/cat.png"), allowed)
    assert out[0].images[0].getpixel((0, 0)) == (0, 128, 0)
    assert (await refused(requests(image_host + "/big.png"), allowed)).code is ErrorCode.BODY_TOO_LARGE
    assert "404" in (await refused(requests(image_host + "/nothing.png"), allowed)).message
    assert "127.0.0.1" in (await refused(requests(image_host + "/cat.png"))).message  # not allowed by default


def test_the_audit_text_keeps_words_and_drops_image_data() -> None:
    url = url_of(picture())
    message = {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                           {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                                           {"type": "image_url", "image_url": "https://intranet/cat.png"}]}
    kept = without_image_data(message)
    assert kept["content"][0] == message["content"][0]
    assert kept["content"][1]["image_url"] == {"url": f"data:image/png;base64,[{len(url) - 22} characters]",
                                               "detail": "low"}
    assert kept["content"][2] == message["content"][2]
    assert without_image_data({"role": "user", "content": "hi"}) == {"role": "user", "content": "hi"}
