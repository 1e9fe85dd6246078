"""Loads a model's weights and tokenizer for the transformers engine, from local files only.

Owns dtype/device choice and the model's stop ids; where the checkpoint is (and the GGUF conversion) is
``inhouse.engine.checkpoint``'s, shared with the vLLM engine.  Never contacts a hub.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inhouse.config import LocalSpec
from inhouse.engine.base import ModelLoadError
from inhouse.engine.checkpoint import resolve_checkpoint
from inhouse.engine.loading import WEIGHTS_LOCK, pick_device, pick_dtype
from inhouse.engine.progress import Steps

__all__ = ["LoadedModel", "load_model"]

log = logging.getLogger("inhouse.loader")

@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    context_length: int
    device: torch.device
    dtype: torch.dtype
    stop_ids: frozenset[int]


def load_model(spec: LocalSpec, cache_dir: Path, attn_implementation: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = resolve_checkpoint(spec, cache_dir)
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device)
    log.info("loading %s from %s (%s, %s)", spec.name, checkpoint, device, str(dtype).removeprefix("torch."))
    model: Any
    with Steps(f"loading {spec.name}", ("tokenizer", "weights", f"to {device}"), log) as steps:
        try:
            steps.step("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
            steps.step("weights")
            with WEIGHTS_LOCK:  # from_pretrained sets torch's process-wide default dtype while it builds
                model = AutoModelForCausalLM.from_pretrained(
                    checkpoint, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
                )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"model {spec.name!r}: cannot load {checkpoint}: {exc} (fix: check the model's "
                                 "'path' points at a complete HF checkpoint: config.json, tokenizer files and "
                                 "*.safetensors)") from exc
        steps.step(f"to {device}")
        model.to(device).eval()
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or 2048
    context_length = min(spec.context_length, limit) if spec.context_length else limit
    stop_ids = _stop_ids(tokenizer, model)
    return LoadedModel(model, tokenizer, context_length, device, dtype, stop_ids)


def _stop_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    return frozenset(ids)
