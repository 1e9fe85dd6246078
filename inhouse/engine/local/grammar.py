"""Constrained decoding for ``response_format``: a grammar per schema, a matcher per sequence, a mask per row.

Owns turning OpenAI's ``response_format`` into an llguidance grammar (compiled grammars cached by schema
text; ``json_object`` is any JSON object), each constrained sequence's ``Constraint`` (its matcher), and
masking a batch's logits: a constrained row keeps only the tokens its grammar allows next (stop tokens only
once the answer is complete); unconstrained rows are not touched, and a batch without constrained rows
costs one scan of its rows.  A matcher in error masks its whole row to -inf, so the sampler fails that row
alone.  Knows nothing about sampling, scheduling or requests beyond their ``response_format``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any, Protocol

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from inhouse.errors import ErrorCode, InhouseError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # in the type stub only

__all__ = ["ConstrainedSequence", "Constraint", "Grammars", "apply_constraints"]

log = logging.getLogger("inhouse.engine")

_SCHEMA_PARAM = "response_format.json_schema.schema"
_ANY_OBJECT = '{"type": "object"}'
# compact JSON: a model may not pad the answer with endless whitespace
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
_CACHED_GRAMMARS = 256
_BITS = torch.arange(32, dtype=torch.int32)


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
    """The model's grammar compiler: response_format → grammar text (cached) → a fresh Constraint."""

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

    def constraint(self, response_format: dict[str, Any] | None) -> Constraint | None:
        """The Constraint a request's ``response_format`` asks for (None: free text), or a 400.

        Compiles on the caller's thread (a new schema takes milliseconds; call it off the event loop)."""
        kind = (response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if self._tokenizer is None:
            raise InhouseError(ErrorCode.INVALID_REQUEST, "this model's tokenizer cannot enforce response_format",
                               param="response_format")
        if kind == "json_object":
            schema_text = _ANY_OBJECT
        else:
            schema = ((response_format or {}).get("json_schema") or {}).get("schema", {})
            if not isinstance(schema, dict):
                raise InhouseError(ErrorCode.INVALID_REQUEST, "the schema must be a JSON object", param=_SCHEMA_PARAM)
            schema_text = json.dumps(schema, separators=(",", ":"))  # key order is the answer's order
        matcher = llguidance.LLMatcher(self._tokenizer, self._compile(schema_text), log_level=0)
        if matcher.is_error():  # validated when compiled, so only a limit this matcher hit on its own
            raise InhouseError(ErrorCode.INVALID_REQUEST,
                               f"response_format's JSON schema cannot be enforced: {matcher.get_error()[:300]}",
                               param=_SCHEMA_PARAM)
        return Constraint(matcher)

    def _compile_schema(self, schema_text: str) -> str:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text, defaults=_JSON_OPTIONS)
            error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        except (ValueError, TypeError) as exc:
            error = str(exc)
        if error:
            raise InhouseError(ErrorCode.INVALID_REQUEST,
                               f"response_format's JSON schema cannot be enforced: {error[:300]}", param=_SCHEMA_PARAM)
        return grammar


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
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).view(len(rows), -1)[:, :vocab].bool()
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits
