"""The model side of the encoder's batcher: tokenize many inputs in one call, pad, run one forward pass.

On CPU a pass runs its inputs sorted by length in chunks of a few thousand padded tokens (``chunk_tokens``):
there, 8 inputs of 200 tokens at a time ran faster per input than 64 at once, and sorting limits padding.
Owns the batch tensors and what one pass returns: unit-or-not vectors for an embedding model, relevance in
[0, 1] for a cross-encoder.  Every method runs in the batcher's worker thread; nothing here is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt
import torch

from inhouse.engine.encoder.loader import LoadedEncoder
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["EmbedInput", "Encoded", "PairInput", "PairRunner", "TextRunner", "too_long"]


def too_long(index: int, tokens: int, window: int) -> InhouseError:
    """400 ``context_length_exceeded`` for input ``index`` (when the engine does not truncate)."""
    return InhouseError(
        ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        f"input {index} is {tokens} tokens, more than this model's maximum context length of {window} tokens. "
        "Please shorten it.",
        param="input",
    )


@dataclass(frozen=True, slots=True)
class EmbedInput:
    index: int  # its place in the caller's request, for error messages
    content: str | tuple[int, ...]  # text, or token ids already checked and cut to the window
    truncate: bool  # cut text longer than the window (else refuse it)


@dataclass(frozen=True, slots=True)
class PairInput:
    query: str
    document: str


@dataclass(frozen=True, slots=True)
class Encoded:
    ids: list[int]
    types: list[int] | None = None  # token type ids (pairs)


def _features(encoded: Sequence[Encoded], model: LoadedEncoder) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and (when the model takes them) token_type_ids."""
    longest = max(len(e.ids) for e in encoded)
    pad = model.tokenizer.pad_token_id or 0
    ids = np.full((len(encoded), longest), pad, dtype=np.int64)
    mask = np.zeros((len(encoded), longest), dtype=np.int64)
    types = np.zeros((len(encoded), longest), dtype=np.int64)
    for row, e in enumerate(encoded):
        ids[row, :len(e.ids)] = e.ids
        mask[row, :len(e.ids)] = 1
        if e.types is not None:
            types[row, :len(e.types)] = e.types
    features = {"input_ids": ids, "attention_mask": mask}
    if model.token_types:
        features["token_type_ids"] = types
    return {name: torch.from_numpy(array).to(model.device) for name, array in features.items()}


def _forward(batch: Sequence[Encoded], model: LoadedEncoder, output: str) -> torch.Tensor:
    """The model's ``output`` for each input, in batch order, as float32.  Inputs run sorted by length, in
    chunks of at most ``model.chunk_tokens`` padded tokens (all at once when it is 0)."""
    order = sorted(range(len(batch)), key=lambda i: len(batch[i].ids))
    chunks: list[list[int]] = [[]]
    for i in order:  # ascending: the input added is the chunk's longest
        if chunks[-1] and model.chunk_tokens and (len(chunks[-1]) + 1) * len(batch[i].ids) > model.chunk_tokens:
            chunks.append([])
        chunks[-1].append(i)
    with torch.inference_mode():
        rows = torch.cat([model.model(_features([batch[i] for i in chunk], model))[output].float()
                          for chunk in chunks])
        return rows[torch.argsort(torch.tensor(order))]  # back in batch order


class TextRunner:
    """Texts (or token ids) → vectors, as the model's own sentence-transformers modules pool them."""

    def __init__(self, model: LoadedEncoder) -> None:
        self._model = model

    def size(self, prepared: Encoded) -> int:
        return len(prepared.ids)

    def prepare(self, inputs: Sequence[EmbedInput]) -> list[Encoded | InhouseError]:
        """Token ids pass as they are; texts are tokenized together (special tokens added, the model's default
        prompt first); a text longer than the window is cut to it, or refused when the caller said so."""
        window = self._model.window
        texts = [at for at, i in enumerate(inputs) if isinstance(i.content, str)]
        prompt = self._model.prompt
        tokenized = self._tokenize([prompt + str(inputs[at].content) for at in texts], truncate=False) if texts else []
        done: dict[int, Encoded | InhouseError] = {}
        cut: list[int] = []
        for at, ids in zip(texts, tokenized, strict=True):
            if len(ids) <= window:
                done[at] = Encoded(ids)
            elif inputs[at].truncate:
                cut.append(at)
            else:
                done[at] = too_long(inputs[at].index, len(ids), window)
        if cut:
            shortened = self._tokenize([prompt + str(inputs[at].content) for at in cut], truncate=True)
            done.update((at, Encoded(ids)) for at, ids in zip(cut, shortened, strict=True))
        return [done[at] if at in done else Encoded(list(cast(tuple[int, ...], i.content)))
                for at, i in enumerate(inputs)]

    def _tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        encoded = self._model.tokenizer(texts, add_special_tokens=True, truncation=truncate,
                                        max_length=self._model.window if truncate else None,
                                        return_attention_mask=False, return_token_type_ids=False, verbose=False)
        return encoded["input_ids"]  # type: ignore[no-any-return]

    def run(self, batch: Sequence[Encoded]) -> list[npt.NDArray[np.float32]]:
        vectors = _forward(batch, self._model, "sentence_embedding")
        if self._model.normalizes:  # again in fp32: a bf16 model's unit vectors are off by ~0.3%
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return list(vectors.cpu().numpy())


class PairRunner:
    """(query, document) pairs → a cross-encoder's relevance in [0, 1]: the sigmoid of a one-label head, or the
    softmax probability of the positive class of a two-label one."""

    def __init__(self, model: LoadedEncoder) -> None:
        self._model = model

    def size(self, prepared: Encoded) -> int:
        return len(prepared.ids)

    def prepare(self, inputs: Sequence[PairInput]) -> list[Encoded | InhouseError]:
        """Tokenized as pairs, cut to the window longest-first (the longer of query and document loses tokens)."""
        encoded = self._model.tokenizer(
            [i.query for i in inputs], [i.document for i in inputs], add_special_tokens=True,
            truncation="longest_first", max_length=self._model.window, return_attention_mask=False,
            return_token_type_ids=True, verbose=False)
        return [Encoded(ids, types) for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"],
                                                           strict=True)]

    def run(self, batch: Sequence[Encoded]) -> list[float]:
        logits = _forward(batch, self._model, "scores")
        one_label = self._model.labels == 1
        scores = torch.sigmoid(logits.reshape(-1)) if one_label else torch.softmax(logits, dim=-1)[:, 1]
        return [float(s) for s in scores.cpu().tolist()]
