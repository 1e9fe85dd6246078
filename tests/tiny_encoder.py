"""Builds tiny random-weight encoder checkpoints offline, for fast tests: a sentence-transformers embedding
model (BERT → mean pooling → Normalize) and a cross-encoder (BertForSequenceClassification, one label).

The WordPiece vocabulary is written on the fly: common English words, every ASCII letter and digit (alone
and as a ``##`` continuation, so any English word tokenizes without [UNK]) and the CJK characters of a
small corpus.  Fixed seeds; a second or two each.  Both windows are small (``WINDOW`` tokens) so tests can
overflow them with a sentence or two.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import string
from pathlib import Path

WINDOW = 64  # max_seq_length of both tiny models
POSITIONS = 128  # their position tables (more than the window, as real checkpoints have)
HIDDEN = 32

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = """
the a an of to in and is are was were be for on with as at by it this that from or not but what which who how
when where why can will do does did have has had you we they he she i my your our their capital city france paris
china beijing weather today sunny rain cat cats dog dogs love like machine learning model models data text search
query document hello world quick brown fox jumps over lazy
"""
_CJK = "你好世界北京是中国的首都今天天气很好我们学习机器和自然语言处理猫狗喜欢东京日本"


def _vocab() -> list[str]:
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    continuations = ["##" + c for c in string.ascii_lowercase + string.digits]
    words = [w for w in dict.fromkeys(_WORDS.split()) if w not in pieces]
    return _SPECIALS + pieces + continuations + words + list(dict.fromkeys(_CJK))


def _tokenizer() -> object:
    from transformers import BertTokenizer

    vocab = {token: i for i, token in enumerate(_vocab())}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=WINDOW)


def _config(vocab_size: int, initializer_range: float, **extra: object) -> object:
    """A larger initializer_range than BERT's 0.02 makes random attention peaky, so outputs depend on the input
    visibly; too large and bf16 rounding moves them (0.2 keeps the cross-encoder's bf16 scores within 0.002)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=POSITIONS, pad_token_id=0,
                      initializer_range=initializer_range, **extra)


def _staging(target: Path) -> Path:
    """A build directory of this process's own (test sessions may build the same model at once)."""
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _publish(built: Path, target: Path, staging: Path) -> Path:
    """Move the built model into place, unless another process got there first; clean up either way."""
    if not (target / "config.json").is_file():
        shutil.rmtree(target, ignore_errors=True)  # a half-written target (no config.json) of a crashed build
        with contextlib.suppress(OSError):  # lost the race: the other build is as good
            built.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_embedder(target: Path, seed: int = 0) -> Path:
    """Write a sentence-transformers embedding model to ``target`` (created; kept once built) and return it."""
    if (target / "config.json").is_file():
        return target
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertModel

    staging = _staging(target)
    hf_dir = staging / "hf"
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    BertModel(_config(len(tokenizer), 0.5)).save_pretrained(hf_dir)  # type: ignore[arg-type]
    tokenizer.save_pretrained(hf_dir)  # type: ignore[attr-defined]
    transformer = Transformer(str(hf_dir), max_seq_length=WINDOW)
    model = SentenceTransformer(modules=[transformer, Pooling(HIDDEN, "mean"), Normalize()], device="cpu")
    model.save(str(staging / "model"))
    return _publish(staging / "model", target, staging)


def build_tiny_cross_encoder(target: Path, seed: int = 1) -> Path:
    """Write a cross-encoder checkpoint to ``target`` as the hub's cross-encoders are laid out (an HF
    ``BertForSequenceClassification`` with one label and its tokenizer; no sentence-transformers files)."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import BertForSequenceClassification

    staging = _staging(target)
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    model = BertForSequenceClassification(_config(len(tokenizer), 0.2, num_labels=1))  # type: ignore[arg-type]
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)  # type: ignore[attr-defined]
    return _publish(staging, target, staging)
