"""Per-row sampling: greedy rows, top-k/top-p masks, penalties, seeds, min_tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch

from inhouse.engine.base import Delta, SamplingParams
from inhouse.engine.collector import OutputCollector
from inhouse.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher
from inhouse.engine.local.sampler import Sampler, _filter_top_k_top_p
from inhouse.engine.local.sequence import Sequence


class _Tok:
    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def seq(params: SamplingParams, output: list[int] | None = None, seed: int | None = None) -> Sequence:
    loop = asyncio.new_event_loop()
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    s = Sequence("r", [1, 2, 3], params, 100, OutputCollector[Delta](loop), IncrementalDetokenizer(_Tok(), []),
                 StopMatcher(()), generator)
    s.output_ids = list(output or [])
    loop.close()
    return s


def test_greedy_rows_take_argmax_whatever_the_other_rows_do() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0], [3.0, 0.0, 0.0, 2.9]])
    sampler = Sampler(lambda t: str(t), frozenset({3}))
    tokens, _ = sampler.sample(logits, [seq(SamplingParams(temperature=0)), seq(SamplingParams(temperature=0))])
    assert tokens == [1, 0]


def test_top_k_and_top_p_masks() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    out = _filter_top_k_top_p(logits, [2, 0], [1.0, 0.5])
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()
    # top_p 0.5: the first token alone has probability > 0.5 here, so only it survives
    assert torch.isfinite(out[1, 0]) and torch.isinf(out[1, 1:]).all()


def test_seeded_rows_are_reproducible() -> None:
    logits = torch.zeros((1, 50))
    sampler = Sampler(lambda t: str(t), frozenset())
    draws = [sampler.sample(logits, [seq(SamplingParams(temperature=1.0), seed=5)])[0][0] for _ in range(2)]
    assert draws[0] == draws[1]
    many = {sampler.sample(logits, [seq(SamplingParams(temperature=1.0), seed=s)])[0][0] for s in range(20)}
    assert len(many) > 5


def test_penalties_change_the_choice() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0, 0.0]])
    sampler = Sampler(lambda t: str(t), frozenset())
    plain = sampler.sample(logits, [seq(SamplingParams(temperature=0), output=[0, 0])])[0]
    penalised = sampler.sample(logits, [seq(SamplingParams(temperature=0, frequency_penalty=1.0), output=[0, 0])])[0]
    # repetition penalty covers prompt ([1, 2, 3]) and output tokens; token 4 is unseen
    five = torch.tensor([[2.0, 0.0, 0.0, 0.0, 1.5]])
    repeated = sampler.sample(five, [seq(SamplingParams(temperature=0, repetition_penalty=2.0), output=[0])])[0]
    assert plain == [0] and penalised == [1] and repeated == [4]


def test_min_tokens_bans_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0]])
    sampler = Sampler(lambda t: str(t), frozenset({2}))
    assert sampler.sample(logits, [seq(SamplingParams(temperature=0, min_tokens=2))])[0] != [2]
    assert sampler.sample(logits, [seq(SamplingParams(temperature=0, min_tokens=2), output=[0, 1])])[0] == [2]


def test_logprobs_are_raw_model_logprobs() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    sampler = Sampler(lambda t: f"t{t}", frozenset())
    _, logprobs = sampler.sample(logits, [seq(SamplingParams(temperature=0, logprobs=True, top_logprobs=2))])
    entry = logprobs[0]
    assert entry is not None
    assert entry.token == "t3"
    assert entry.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[0, 3]))
    assert [t for t, _ in entry.top] == ["t3", "t2"]
