"""One request's generation state inside the local engine.

Owns a sequence's token ids, its KV-cache tier and slot, its detokenizer, stop matcher and grammar constraint, and
the collector that hands its output to the waiting request.  Touched only by the engine thread after admission.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from inhouse.engine.base import Delta, SamplingParams, TokenLogprob, Usage
from inhouse.engine.collector import OutputCollector
from inhouse.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher
from inhouse.engine.local.grammar import Constraint

__all__ = ["Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    collector: OutputCollector[Delta]
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopMatcher
    generator: torch.Generator | None = None
    constraint: Constraint | None = None  # response_format's grammar
    adapter: str | None = None  # the LoRA adapter its rows run with (None: the bare base)
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    tier: int = -1  # where its keys and values are: a tier of the KV cache (kv_tiers.py) and a slot in it
    slot: int = -1
    charge: int = 0  # tokens of KV memory it may come to hold, counted against the budget while it runs
    cached: int = 0  # prompt tokens whose keys and values are in the slot (the prefix cache's, earlier chunks')
    prefix_hit: int = 0  # prompt tokens the prefix cache supplied when it was placed (its usage's cached_tokens)

    @property
    def length(self) -> int:
        """Tokens whose keys and values are (or are about to be) in the cache."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def append(self, token_id: int, stop_ids: frozenset[int], logprob: TokenLogprob | None) -> bool:
        """Record a sampled token and send its text on.  Returns True when the sequence is finished (a stop, the
        length, or a constrained answer that is complete)."""
        complete = self.constraint is not None and self.constraint.advance(token_id)
        self.output_ids.append(token_id)
        finish: str | None = None
        is_stop_token = ((token_id in stop_ids and not self.sampling.ignore_eos)
                         or token_id in self.sampling.stop_token_ids)
        text = "" if is_stop_token else self.detokenizer.add(token_id)
        text, hit_stop = self.stop_matcher.feed(text)
        if hit_stop or is_stop_token or complete:
            finish = "stop"
        elif len(self.output_ids) >= self.max_tokens:
            finish = "length"
        if finish is not None and not hit_stop:
            tail, hit_stop = self.stop_matcher.feed(self.detokenizer.flush())
            text += tail if hit_stop else tail + self.stop_matcher.flush()
            if hit_stop:
                finish = "stop"
        self.collector.put(
            Delta(
                text=text,
                token_count=1,
                logprobs=[logprob] if logprob is not None else None,
                finish_reason=finish,
                usage=(Usage(len(self.prompt_ids), len(self.output_ids), self.prefix_hit)
                       if finish is not None else None),
            )
        )
        if finish is not None:
            self.status = SequenceStatus.FINISHED
        return finish is not None
