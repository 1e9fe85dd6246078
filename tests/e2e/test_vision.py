"""Vision through the real CLI: a tiny random LLaVA (built offline) answers image prompts exactly as transformers'
own ``generate`` does; bad images get clean 400/413 errors naming the part; a text model still refuses images;
a gateway forwards images to an upstream that declares ``vision``; Dify's own client classes send an uploaded
image to both."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TINY
from tests.e2e.dify import Dify
from tests.process import ServerProcess
from tests.tiny_vlm import build_tiny_llava, build_tiny_qwen2_vl

pytestmark = pytest.mark.slow

VLM = "tiny-vlm"
QWEN = "tiny-qwen2-vl"
QUESTION = "What is in this picture?"


def png(color: str, size: tuple[int, int] = (40, 30), kind: str = "PNG") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=kind)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = QUESTION, detail: str | None = None) -> dict[str, Any]:
    image: dict[str, Any] = {"url": url} | ({"detail": detail} if detail else {})
    return {"role": "user", "content": [{"type": "image_url", "image_url": image}, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def vlm_dir(cache_dir: Path) -> Path:
    return build_tiny_llava(cache_dir / "tiny-llava-c28")


@pytest.fixture(scope="module")
def qwen_dir(cache_dir: Path) -> Path:
    return build_tiny_qwen2_vl(cache_dir / "tiny-qwen2-vl-p4")


@pytest.fixture(scope="module")
def server(vlm_dir: Path, qwen_dir: Path, tiny_model_dir: Path, cache_dir: Path, logs_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("vision") / "inhouse.yaml"
    config.write_text(f"""
images: {{max_bytes: 30000, max_images: 2, max_pixels: 40000}}
models:
  - {{name: {VLM}, path: "{vlm_dir}", engine: auto, dtype: float32, max_waiting: 4}}
  - {{name: {TINY}, path: "{tiny_model_dir}", engine: transformers, dtype: float32}}
  - {{name: {QWEN}, path: "{qwen_dir}", dtype: float32}}
""", encoding="utf-8")
    with ServerProcess(["--config", str(config)], cache_dir, logs_dir / "vision.log", ready_timeout=600) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def reference(vlm_dir: Path, color: str, max_new_tokens: int) -> tuple[str, int]:
    """transformers' own answer (greedy) and prompt length for one image and ``QUESTION``."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(vlm_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32, local_files_only=True).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(io.BytesIO(png(color))).convert("RGB")
    inputs = processor(text=[text], images=[[image]], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    prompt = inputs["input_ids"].shape[1]
    return processor.decode(out[0, prompt:], skip_special_tokens=True), int(prompt)


def assert_error(response: httpx.Response, status: int, param: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error


def test_the_card_says_vision(http: httpx.Client) -> None:
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert "vision" in cards[VLM]["capabilities"], cards[VLM]
    assert cards[VLM]["engine"] == "transformers-vision"
    assert "vision" not in cards[TINY]["capabilities"]


@pytest.mark.parametrize("color", ["red", "navy"])
def test_greedy_answer_equals_transformers_generate(client: openai.OpenAI, vlm_dir: Path, color: str) -> None:
    expected, prompt_tokens = reference(vlm_dir, color, 12)
    result = client.chat.completions.create(model=VLM, messages=[image_message(data_url(png(color)))],  # type: ignore[list-item]
                                            max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert result.choices[0].message.content == expected
    assert result.usage is not None
    assert result.usage.prompt_tokens == prompt_tokens  # image tokens included
    assert result.usage.completion_tokens == 12


def test_qwen2_vl_answers_as_transformers_generate_also_when_batched(client: openai.OpenAI, qwen_dir: Path) -> None:
    """Qwen2-VL through the CLI (its processor without the video half); 3 requests at once keep their answers."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from inhouse.engine.vision.processor import load_processor

    model = AutoModelForImageTextToText.from_pretrained(qwen_dir, dtype=torch.float32, local_files_only=True).eval()
    processor = load_processor(qwen_dir, model.config.model_type)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def expected(color: str) -> tuple[str, int]:
        inputs = processor(text=[text], images=[[Image.open(io.BytesIO(png(color))).convert("RGB")]],
                           return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        prompt = int(inputs["input_ids"].shape[1])
        return processor.decode(out[0, prompt:], skip_special_tokens=True), prompt

    def ask(color: str) -> tuple[str | None, int]:
        result = client.chat.completions.create(model=QWEN, messages=[image_message(data_url(png(color)))],  # type: ignore[list-item]
                                                max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
        assert result.usage is not None
        return result.choices[0].message.content, result.usage.prompt_tokens

    from concurrent.futures import ThreadPoolExecutor

    colors = ["red", "navy", "olive"]
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(ask, colors)) == [expected(c) for c in colors]


def test_the_image_changes_the_answer(client: openai.OpenAI) -> None:
    answers = {client.chat.completions.create(
        model=VLM, messages=[image_message(data_url(png(c)))], max_tokens=8, temperature=0,  # type: ignore[list-item]
        extra_body={"ignore_eos": True}).choices[0].message.content for c in ("red", "navy", "white")}
    assert len(answers) > 1


def test_streaming_gives_the_same_text_and_usage(client: openai.OpenAI, vlm_dir: Path) -> None:
    expected, prompt_tokens = reference(vlm_dir, "red", 10)
    chunks = list(client.chat.completions.create(
        model=VLM, messages=[image_message(data_url(png("red")), detail="low")], max_tokens=10,  # type: ignore[list-item]
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed, not one block


def test_concurrent_image_requests_keep_their_answers(client: openai.OpenAI) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def ask(color: str) -> str | None:
        return client.chat.completions.create(
            model=VLM, messages=[image_message(data_url(png(color)))], max_tokens=10, temperature=0,  # type: ignore[list-item]
            extra_body={"ignore_eos": True}).choices[0].message.content

    colors = ["red", "navy", "white", "olive"]
    alone = [ask(c) for c in colors]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, colors))
    assert together == alone


def test_jpeg_and_webp_are_taken(client: openai.OpenAI) -> None:
    for kind, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        result = client.chat.completions.create(model=VLM, messages=[image_message(  # type: ignore[list-item]
            data_url(png("green", kind=kind), mime))], max_tokens=3, temperature=0)
        assert result.usage is not None and result.usage.prompt_tokens > 10


def test_text_only_chat_works_on_the_vision_model(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=VLM, messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=3, temperature=0)
    assert result.usage is not None and result.usage.completion_tokens >= 1


def chat(http: httpx.Client, model: str, *messages: dict[str, Any]) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": list(messages), "max_tokens": 2})


def test_bad_images_get_clean_errors_naming_the_part(http: httpx.Client) -> None:
    good = image_message(data_url(png("red")))
    system = {"role": "system", "content": "Look closely."}
    assert_error(chat(http, VLM, system, image_message("data:image/png;base64,not base64!!")), 400,
                 "messages.1.content.0", "base64")
    assert_error(chat(http, VLM, image_message(data_url(b"this is text, not a picture"))), 400,
                 "messages.0.content.0", "decoded")
    assert_error(chat(http, VLM, image_message(data_url(png("red", kind="GIF"), "image/gif"))), 400,
                 "messages.0.content.0", "GIF")
    noisy = bytes(range(256)) * 200  # > max_bytes (30000) once decoded
    assert_error(chat(http, VLM, image_message(data_url(noisy))), 413, "messages.0.content.0", "30000")
    assert_error(chat(http, VLM, image_message(data_url(png("red", (300, 300))))), 413,
                 "messages.0.content.0", "90000", "40000")
    assert_error(chat(http, VLM, good, {"role": "assistant", "content": "ok"}, good, good), 400,
                 "messages.3.content.0", "3 images", "at most 2")
    assert_error(chat(http, VLM, image_message("https://example.com/cat.png")), 400, "messages.0.content.0",
                 "example.com", "data: URL")
    assert_error(chat(http, VLM, image_message(data_url(png("red")), detail="ultra")), 400,
                 "messages.0.content.0", "detail")


def test_a_text_model_still_refuses_images(http: httpx.Client) -> None:
    response = chat(http, TINY, image_message(data_url(png("red"))))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "unsupported_feature"


def test_tools_are_refused_by_the_local_vision_engine(http: httpx.Client) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    response = http.post("/v1/chat/completions", json={"model": VLM, "messages": [image_message(data_url(png("red")))],
                                                         "tools": [tool]})
    assert_error(response, 400, "tools", "tools")


@pytest.fixture(scope="module")
def gateway(server: ServerProcess, cache_dir: Path, logs_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("vision-gateway") / "inhouse.yaml"
    config.write_text(f"""
models:
  - {{name: remote-vlm, engine: upstream, base_url: "{server.url}/v1", upstream_model: {VLM},
     capabilities: [chat, vision]}}
""", encoding="utf-8")
    with ServerProcess(["--config", str(config)], cache_dir, logs_dir / "vision-gateway.log") as s:
        yield s


def test_the_gateway_forwards_images_to_an_upstream_vlm(gateway: ServerProcess, client: openai.OpenAI) -> None:
    message = image_message(data_url(png("navy")))
    direct = client.chat.completions.create(model=VLM, messages=[message], max_tokens=6, temperature=0,  # type: ignore[list-item]
                                            extra_body={"ignore_eos": True})
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as sdk:
        card = next(m for m in sdk.models.list().data if m.id == "remote-vlm")
        assert "vision" in card.model_dump()["capabilities"]
        relayed = sdk.chat.completions.create(model="remote-vlm", messages=[message], max_tokens=6,  # type: ignore[list-item]
                                              temperature=0, extra_body={"ignore_eos": True})
    assert relayed.choices[0].message.content == direct.choices[0].message.content
    assert relayed.usage is not None and direct.usage is not None
    assert relayed.usage.prompt_tokens == direct.usage.prompt_tokens


@pytest.mark.parametrize("mode", ["blocking", "stream"])
def test_dify_vision_against_the_local_vlm_and_through_the_gateway(
        dify: Dify, server: ServerProcess, gateway: ServerProcess, client: openai.OpenAI, tmp_path: Path,
        mode: str) -> None:
    """Dify's own client classes (``OAICompatLargeLanguageModel``, "Vision Support" on) with an uploaded image in
    the user message: the answer and usage are the server's own for the same message, with no GPT-2 estimate."""
    picture = tmp_path / "upload.png"
    picture.write_bytes(png("navy"))
    message = image_message(data_url(png("navy")), detail="low")
    direct = client.chat.completions.create(model=VLM, messages=[message], max_tokens=8,  # type: ignore[list-item]
                                            temperature=0)
    assert direct.choices[0].message.content  # a non-empty answer to compare
    stream = ("--stream",) if mode == "stream" else ()
    for url, model in ((server.url + "/v1", VLM), (gateway.url + "/v1", "remote-vlm")):
        result = dify.ok("vision", url, model, "--image-file", str(picture), "--prompt", QUESTION,
                         "--max-tokens", "8", *stream)
        sent = result["wire"][0]
        assert sent["status"] == 200
        assert sent["body"]["messages"] == [message]  # Dify sent the image inline, as a data: URL
        assert result["text"] == direct.choices[0].message.content
        assert direct.usage is not None and result["usage"]["prompt_tokens"] == direct.usage.prompt_tokens
        assert result["estimations"] == 0
