"""Builds tiny random-weight vision-language checkpoints offline (processor, tokenizer, config, weights).

``build_tiny_llava``: the e2e model.  ``build_tiny_idefics3``: the Idefics3 / SmolVLM family (image splitting,
pixel shuffle), and ``build_tiny_qwen2_vl``: Qwen2-VL / Qwen2.5-VL (dynamic resolution, ``image_grid_thw``, M-RoPE),
for the engine's equality tests.

The text model is the tiny Llama of ``tests.tiny_model`` (same byte-level BPE tokenizer, plus an ``<image>``
token), the vision tower a two-layer CLIP on 28×28 pixels in 14×14 patches (4 image tokens per image), the
processor transformers' own ``LlavaProcessor`` with a chat template that puts ``<image>`` where a message
has an image part.  Random weights from a fixed seed; takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

LLAVA_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IMAGE_SIZE = 28
PATCH = 14


def build_tiny_llava(target: Path, seed: int = 0) -> Path:
    """Write a tiny LLaVA checkpoint to ``target`` (created) and return it."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from tests.tiny_model import build_tiny_llama

    if (target / "config.json").is_file():
        return target
    text_dir = build_tiny_llama(target.with_name(target.name + "-text"), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", chat_template=LLAVA_CHATML,
                               image_token="<image>", num_additional_image_tokens=1)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper logits: stable greedy answers
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(8.0)  # the image visibly changes the answer
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def build_tiny_idefics3(target: Path, seed: int = 0) -> Path:
    """A tiny Idefics3 (SmolVLM's architecture and processor): 32-pixel tiles of 8-pixel patches, 4 tokens per tile."""
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    from tests.tiny_model import build_tiny_llama

    if (target / "config.json").is_file():
        return target
    text_dir = build_tiny_llama(target.with_name(target.name + "-text"), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]})
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=LLAVA_CHATML.replace("<image>\n", "<image>"))
    torch.manual_seed(seed)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id)
    model = Idefics3ForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def build_tiny_qwen2_vl(target: Path, seed: int = 0, version: str = "2", hidden: int = 128, layers: int = 2,
                        max_side: int = 32) -> Path:
    """A tiny Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``): 4-pixel patches merged 2×2, images resized to
    at most 32×32 pixels (16 image tokens for a 30×30 image), 3-D rotary positions (M-RoPE).  ``hidden``
    (a multiple of 64), ``layers`` and ``max_side`` (images up to ``max_side``² pixels) make a bigger one
    (``bench/vision.py``).

    Written as a hub checkpoint is (tokenizer, ``preprocessor_config.json``, ``processor_config.json`` naming
    the processor class, ``chat_template.jinja``) without building the processor object: transformers' Qwen
    processors also want a video processor, which needs torchvision (not installed here)."""
    import json

    import torch
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.tiny_model import build_tiny_llama

    if (target / "config.json").is_file():
        return target
    text_dir = build_tiny_llama(target.with_name(target.name + "-text"), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": max_side * max_side},
                                               patch_size=4, merge_size=2, temporal_patch_size=2)
    torch.manual_seed(seed)
    text = {"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}}
    vision = {"depth": 2, "num_heads": 2, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
    model: torch.nn.Module
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
            text_config=text, vision_config=vision | {"embed_dim": 32, "hidden_size": hidden, "mlp_ratio": 2}, **ids))
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, vision_config=vision | {"hidden_size": 32, "intermediate_size": 64, "window_size": 16,
                                                      "out_hidden_size": hidden, "fullatt_block_indexes": [1]}, **ids))
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper logits: stable greedy answers
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    image_processor.save_pretrained(target)
    processor_class = "Qwen2VLProcessor" if version == "2" else "Qwen2_5_VLProcessor"
    (target / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}))
    (target / "chat_template.jinja").write_text(LLAVA_CHATML.replace("<image>\n", QWEN_IMAGE))
    return target
