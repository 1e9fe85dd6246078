"""VisionEngine in process on the tiny LLaVA: chosen for VLM checkpoints, card, messages for the template,
streamed answers with image tokens counted, aborts ending ``generate``, 429 when its queue is full, stop strings,
and a tiny Idefics3 (the SmolVLM family), Qwen2-VL and Qwen2.5-VL answering exactly as transformers' own
``generate``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from inhouse.config import model_spec
from inhouse.engine.base import Capability, GenerateRequest, SamplingParams
from inhouse.engine.factory import build_engine
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.vision.detect import is_vision_checkpoint
from inhouse.engine.vision.engine import VisionEngine, chat_messages
from inhouse.errors import ErrorCode, InhouseError
from tests.tiny_vlm import build_tiny_idefics3, build_tiny_llava, build_tiny_qwen2_vl


@pytest.fixture(scope="module")
def vlm_dir(cache_dir: Path) -> Path:
    return build_tiny_llava(cache_dir / "tiny-llava-c28")


@pytest.fixture(scope="module")
async def engine(vlm_dir: Path, cache_dir: Path) -> AsyncIterator[VisionEngine]:
    spec = model_spec(name="vlm", path=str(vlm_dir), engine="transformers", dtype="float32", max_num_seqs=1,
                      max_waiting=0)
    built = build_engine(spec, cache_dir)
    assert isinstance(built, VisionEngine)
    await built.start()
    yield built
    await built.close()


def image_request(request_id: str, max_tokens: int, color: str = "red") -> GenerateRequest:
    messages = ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                             {"type": "text", "text": "What is it?"}]},)
    return GenerateRequest(request_id, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                           messages=messages, images=(Image.new("RGB", (30, 30), color),))


def test_vision_checkpoints_are_detected(vlm_dir: Path, tiny_model_dir: Path, cache_dir: Path) -> None:
    assert is_vision_checkpoint(model_spec(name="v", path=str(vlm_dir)))
    assert not is_vision_checkpoint(model_spec(name="t", path=str(tiny_model_dir)))
    assert not is_vision_checkpoint(model_spec(name="b", path="builtin:smollm2-135m-instruct"))
    text = build_engine(model_spec(name="t", path=str(tiny_model_dir), engine="transformers"), cache_dir)
    assert isinstance(text, LocalEngine)
    auto = build_engine(model_spec(name="v", path=str(vlm_dir), engine="auto"), cache_dir)
    assert isinstance(auto, VisionEngine)
    assert Capability.VISION in auto.info.capabilities  # known before it loads


def test_chat_messages_turn_every_content_into_parts() -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "see"},
                                             {"type": "image_url", "image_url": {"url": "data:x"}}]}]
    assert chat_messages(messages) == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image"}]}]


async def test_an_image_request_streams_and_counts_image_tokens(engine: VisionEngine) -> None:
    [generation] = await engine.submit([image_request("a", 6)])
    deltas = [d async for d in generation]
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage is not None
    assert deltas[-1].usage.completion_tokens == 6 == sum(d.token_count for d in deltas)
    assert deltas[-1].usage.prompt_tokens == generation.prompt_tokens
    text_only = GenerateRequest("b", SamplingParams(max_tokens=1), messages=(
        {"role": "user", "content": "What is it?"},))
    [plain] = await engine.submit([text_only])
    async for _ in plain:
        pass
    assert generation.prompt_tokens == plain.prompt_tokens + 4 + 1  # 4 image tokens and the "\n" after them


async def test_a_full_engine_refuses_with_429_and_an_abort_frees_it(engine: VisionEngine) -> None:
    [long] = await engine.submit([image_request("long", 400)])
    with pytest.raises(InhouseError) as caught:
        await engine.submit([image_request("more", 2)])
    assert caught.value.code is ErrorCode.QUEUE_FULL
    long.abort()
    deadline = time.monotonic() + 60
    while (engine.stats().running or engine.stats().waiting) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # running: in the generate call; waiting: admitted, not yet in one
    assert engine.stats().running == engine.stats().waiting == 0
    [after] = await engine.submit([image_request("after", 2)])
    assert [d async for d in after][-1].finish_reason == "length"


async def test_tools_and_logprobs_are_refused(engine: VisionEngine) -> None:
    tool = {"type": "function", "function": {"name": "f"}}
    asks = [GenerateRequest("t", SamplingParams(), messages=({"role": "user", "content": "x"},), tools=(tool,)),
            GenerateRequest("l", SamplingParams(logprobs=True), messages=({"role": "user", "content": "x"},)),
            GenerateRequest("p", SamplingParams(), prompt="x")]
    for request, param in zip(asks, ("tools", "logprobs", "prompt"), strict=True):
        with pytest.raises(InhouseError) as caught:
            await engine.submit([request])
        assert (caught.value.code, caught.value.param) == (ErrorCode.UNSUPPORTED, param)


async def answer(engine: VisionEngine, request: GenerateRequest) -> tuple[str, str | None]:
    [generation] = await engine.submit([request])
    deltas = [d async for d in generation]
    return "".join(d.text for d in deltas), deltas[-1].finish_reason


async def test_a_stop_string_cuts_the_answer_where_it_starts(engine: VisionEngine) -> None:
    full, _ = await answer(engine, image_request("full", 16, "navy"))
    stop = full[4:6]
    assert len(stop) == 2 and full.find(stop) >= 1
    cut = image_request("cut", 16, "navy")
    cut = GenerateRequest(cut.request_id, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                                         stop=(stop,)), messages=cut.messages, images=cut.images)
    assert await answer(engine, cut) == (full[:full.find(stop)], "stop")


async def test_an_idefics3_model_answers_as_transformers_generate(cache_dir: Path) -> None:
    """The SmolVLM family (Idefics3: image splitting into tiles, pixel shuffle) through the same engine."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = build_tiny_idefics3(cache_dir / "tiny-idefics3-t32")
    engine = build_engine(model_spec(name="idefics3", path=str(path), dtype="float32"), cache_dir)
    assert isinstance(engine, VisionEngine)
    await engine.start()
    try:
        request = image_request("i", 8, "teal")
        request = GenerateRequest("i", request.sampling, messages=request.messages,
                                  images=(Image.new("RGB", (50, 40), "teal"),))
        [generation] = await engine.submit([request])
        deltas = [d async for d in generation]
    finally:
        await engine.close()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    text = processor.apply_chat_template(chat_messages(request.messages or ()), add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=[text], images=[list(request.images)], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    prompt = int(inputs["input_ids"].shape[1])
    assert "".join(d.text for d in deltas) == processor.decode(out[0, prompt:], skip_special_tokens=True)
    assert deltas[-1].usage is not None and deltas[-1].usage.prompt_tokens == prompt == generation.prompt_tokens
    assert prompt > 40  # the tiles' image tokens are counted


@pytest.mark.parametrize("version", ["2", "2.5"])
async def test_a_qwen2_vl_model_answers_as_transformers_generate(cache_dir: Path, version: str) -> None:
    """Qwen2-VL / Qwen2.5-VL (dynamic resolution, ``image_grid_thw``, 3-D rotary positions) through the same
    engine; their processor loads without its video half (no torchvision here)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from inhouse.engine.vision.processor import load_processor

    path = build_tiny_qwen2_vl(cache_dir / f"tiny-qwen{version}-vl-p4", version=version)
    engine = build_engine(model_spec(name="qwen", path=str(path), dtype="float32"), cache_dir)
    assert isinstance(engine, VisionEngine) and Capability.VISION in engine.info.capabilities
    await engine.start()
    try:
        request = image_request("q", 8, "olive")
        [generation] = await engine.submit([request])
        deltas = [d async for d in generation]
    finally:
        await engine.close()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    processor = load_processor(path, model.config.model_type)
    text = processor.apply_chat_template(chat_messages(request.messages or ()), add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=[text], images=[list(request.images)], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]  # 30×30 → 32×32 pixels: 8×8 patches of 4
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    prompt = int(inputs["input_ids"].shape[1])
    assert "".join(d.text for d in deltas) == processor.decode(out[0, prompt:], skip_special_tokens=True)
    assert deltas[-1].usage is not None and deltas[-1].usage.prompt_tokens == prompt == generation.prompt_tokens
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == 16  # 8×8 patches merged 2×2, all counted in prompt_tokens
