"""A vision-language model's processor: loading it offline, and turning requests into the model's inputs.

Owns three things: ``load_processor`` (transformers' ``AutoProcessor``, or, when the processor also wants a
video processor that cannot load here — Qwen2-VL's and Qwen2.5-VL's need torchvision — the same processor class
without its video half: images and text are all this engine takes), ``chat_messages`` (OpenAI messages as
image-text-to-text chat templates take them), and ``model_inputs`` (one prompt, or several left-padded into one
batch, with their images).  Holds no state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from PIL.Image import Image

__all__ = ["chat_messages", "load_processor", "model_inputs"]

log = logging.getLogger("inhouse.engine")


def chat_messages(messages: Seq[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as image-text-to-text chat templates take them: every content a list of parts,
    ``{"type": "text", "text": ...}`` or ``{"type": "image"}`` (the image itself goes to the processor)."""
    out = []
    for message in messages:
        content = message.get("content") or ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [
            {"type": "image"} if part.get("type") == "image_url" else {"type": "text", "text": part.get("text") or ""}
            for part in content]
        out.append({"role": message["role"], "content": parts})
    return out


def load_processor(checkpoint: Path, model_type: str) -> Any:
    """The checkpoint's processor, offline.  A processor whose video half cannot load (its video processor needs
    torchvision) loads without it; any other failure is the caller's to report."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(checkpoint, local_files_only=True)  # type: ignore[no-untyped-call]
    except ImportError as exc:
        if "video" not in str(exc).lower():
            raise
        log.info("%s: the processor's video half cannot load (%s); loading it for images and text only",
                 checkpoint, str(exc).strip().splitlines()[0])
    return _image_only(model_type).from_pretrained(checkpoint, local_files_only=True)


def _image_only(model_type: str) -> Any:
    """``model_type``'s processor class with no video processor among its parts (``get_attributes`` reads the
    parts from ``__init__``'s parameters, so a subclass whose ``__init__`` leaves it out loads without it)."""
    from transformers.models.auto.processing_auto import (  # type: ignore[attr-defined]
        PROCESSOR_MAPPING_NAMES,
        processor_class_from_name,
    )

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    base = processor_class_from_name(name) if name else None
    if base is None:
        raise ImportError(f"no processor class for model type {model_type!r}")

    def init(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
             **kwargs: Any) -> None:
        base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                      chat_template=chat_template, **kwargs)

    return type(base.__name__, (base,), {"__init__": init, "__module__": __name__})


def model_inputs(processor: Any, texts: Seq[str], images: Seq[Seq[Image]]) -> dict[str, Any]:
    """The processor's tensors for prompts (already through the chat template) and their images, one list per
    prompt; several prompts are padded on the left into one batch."""
    nested = [list(i) for i in images] if any(images) else None
    if len(texts) == 1:
        return dict(processor(text=list(texts), images=nested, return_tensors="pt"))
    return dict(processor(text=list(texts), images=nested, padding=True, padding_side="left", return_tensors="pt"))
