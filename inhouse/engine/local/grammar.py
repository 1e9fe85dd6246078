"""Constrained decoding: a grammar per answer schema, a matcher per sequence, a mask per row.

Owns turning an answer's JSON schema (``inhouse.engine.answer_schema``: ``response_format``'s, or the tools
envelope of a model whose template knows no tools) into an llguidance grammar (compiled grammars cached by
schema text), each constrained sequence's ``Constraint`` (its matcher), and
masking a batch's logits: a constrained row keeps only the tokens its grammar allows next (stop tokens only
once the answer is complete); unconstrained rows are not touched, and a batch without constrained rows
costs one scan of its rows.  A matcher in error masks its whole row to -inf, so the sampler fails that row
alone.  Knows nothing about sampling, scheduling or requests.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Protocol

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from inhouse.engine.answer_schema import AnswerSchema
from inhouse.errors import ErrorCode, InhouseError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # in the type stub only

__all__ = ["ConstrainedSequence", "Constraint", "Grammars", "apply_constraints"]

log = logging.getLogger("inhouse.engine")

# compact JSON: a model may not pad the answer with endless whitespace
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
_CACHED_GRAMMARS = 256


class Constraint:
    """One sequence's grammar state: what it may emit next, and whether its answer is complete."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (all zero when the matcher is in error)."""
        if self._matcher.is_error():
            bitmask[row].zero_()
            return
        target = bitmask[row]  # a contiguous CPU int32 row (llguidance.torch would import torch.compile)
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())

    def advance(self, token_id: int) -> bool:
        """Take the sampled token; True when the grammar is complete (the sequence ends with ``stop``)."""
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"token {token_id} broke the grammar: {self._matcher.get_error()}")
        return self._matcher.is_stopped()


class ConstrainedSequence(Protocol):
    """What masking reads of a sequence (``Sequence`` in the engine)."""

    @property
    def constraint(self) -> Constraint | None: ...


class Grammars:
    """The model's grammar compiler: an answer schema → grammar text (cached) → a fresh Constraint."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: frozenset[int]) -> None:
        self._tokenizer: llguidance.LLTokenizer | None = None
        if isinstance(tokenizer, PreTrainedTokenizerFast):
            self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                           eos_token=sorted(stop_ids) or None)
        self._compile = functools.lru_cache(maxsize=_CACHED_GRAMMARS)(self._compile_schema)

    @property
    def available(self) -> bool:
        """False when the tokenizer is not one llguidance reads (a slow tokenizer): response_format is a 400."""
        return self._tokenizer is not None

    def constraint(self, schema: AnswerSchema | None) -> Constraint | None:
        """A fresh Constraint for an answer that must follow ``schema`` (None: free text), or a 400 naming the
        request field the schema came from.

        Compiles on the caller's thread (a new schema takes milliseconds; call it off the event loop)."""
        if schema is None:
            return None
        if self._tokenizer is None:
            raise InhouseError(ErrorCode.INVALID_REQUEST, "this model's tokenizer cannot enforce response_format",
                               param=schema.param.split(".")[0])
        matcher = llguidance.LLMatcher(self._tokenizer, self._compile(schema.text, schema.param), log_level=0)
        if matcher.is_error():  # validated when compiled, so only a limit this matcher hit on its own
            raise _refused(schema.param, matcher.get_error())
        return Constraint(matcher)

    def _compile_schema(self, schema_text: str, param: str) -> str:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text, defaults=_JSON_OPTIONS)
            error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        except (ValueError, TypeError) as exc:
            error = str(exc)
        if error:
            raise _refused(param, error)
        return grammar


def _refused(param: str, error: str) -> InhouseError:
    what = "the tools' parameters" if param == "tools" else "response_format's JSON schema"
    return InhouseError(ErrorCode.INVALID_REQUEST, f"{what} cannot be enforced: {error[:300]}", param=param)


@torch.inference_mode()  # the runner's logits are inference tensors: masked in place, no copy
def apply_constraints(logits: torch.Tensor, seqs: Seq[ConstrainedSequence]) -> torch.Tensor:
    """``logits`` ``[rows, vocab]`` with each constrained row's disallowed tokens at -inf (in place)."""
    rows = [i for i, seq in enumerate(seqs) if seq.constraint is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    bitmask = torch.zeros(len(rows), (vocab + 31) // 32, dtype=torch.int32)
    for k, i in enumerate(rows):
        constraint = seqs[i].constraint
        assert constraint is not None
        try:
            constraint.fill(bitmask, k)
        except Exception:  # this row gets nothing allowed: the sampler fails it alone
            log.exception("the grammar mask of row %d failed", i)
            bitmask[k].zero_()
    # the bits as booleans (numpy unpacks ten times faster than shifts in torch), each row masked in place
    allowed = torch.from_numpy(np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, count=vocab,
                                             bitorder="little").view(np.bool_))
    banned = ~allowed.to(logits.device)
    for k, i in enumerate(rows):
        logits[i].masked_fill_(banned[k], float("-inf"))
    return logits
