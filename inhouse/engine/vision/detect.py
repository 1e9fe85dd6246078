"""Whether a checkpoint is a vision-language model (transformers' image-text-to-text architectures).

Owns only that test, read from the checkpoint's ``config.json`` (no weights, no hub), so the engine factory
can pick the vision engine and its card can say ``vision`` before anything loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from inhouse.config import LocalSpec

__all__ = ["is_vision_checkpoint"]


def is_vision_checkpoint(spec: LocalSpec) -> bool:
    """True when ``spec.path`` is an HF directory whose ``model_type`` is one of transformers'
    image-text-to-text models (LLaVA, Qwen2-VL, Idefics3, SmolVLM, ...) with a vision config."""
    config = Path(spec.path) / "config.json"
    if spec.path.startswith("builtin:") or not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return (isinstance(data, dict) and data.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and "vision_config" in data)
