"""Builds tiny random-weight vision-language checkpoints offline (processor, tokenizer, config, weights).

``build_tiny_llava``: the e2e model.  ``build_tiny_idefics3``: the Idefics3 / SmolVLM family (image splitting,
pixel shuffle), for the engine's equality test.

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
