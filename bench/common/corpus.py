"""The benchmarks' own prose (``bench/data/``) cut into chunks of model tokens, as a knowledge-base indexer does.

Owns reading the corpus files (paragraphs separated by blank lines, ``#`` lines are comments), splitting them
into sentences and packing whole sentences into chunks of at most N tokens of a given tokenizer.  It must not
know a model or a benchmark: the caller passes the token counter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["DATA", "chunks", "sentences"]

DATA = Path(__file__).resolve().parents[1] / "data"


def sentences(path: Path) -> list[tuple[str, bool]]:
    """(sentence, starts a paragraph) in file order; lines starting with # are comments."""
    text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#"))
    out = []
    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text)):
        parts = [s for s in re.split(r"(?<=[.!?])\s+|(?<=[。！？；])", paragraph.replace("\n", " ")) if s.strip()]
        out += [(s.strip(), i == 0) for i, s in enumerate(parts)]
    return out


def chunks(path: Path, count_tokens: Callable[[str], int], joiner: str, max_tokens: int) -> list[str]:
    """Whole sentences packed greedily into chunks of at most ``max_tokens`` model tokens, as an indexer does;
    a short tail (under half a chunk) is dropped."""
    out: list[str] = []
    current = ""
    for sentence, new_paragraph in sentences(path):
        candidate = sentence if not current else current + ("\n" if new_paragraph else joiner) + sentence
        if current and count_tokens(candidate) > max_tokens:
            out.append(current)
            candidate = sentence
        current = candidate
    if current and count_tokens(current) >= max_tokens // 2:
        out.append(current)
    return out
