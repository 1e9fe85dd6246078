"""Picks the next token of every row of a batch, each row with its own sampling parameters.

Owns penalties, temperature, top-k, top-p, seeded generators and logprobs.  Pure functions of the
logits and the sequences' own state; greedy rows never depend on what else is in the batch.  A row is
its own failure: a row whose scores are not finite (NaN, +inf, or nothing left to pick) gets no token
(None) and does not touch the others, and if one row's parameters make the batched pass raise, the rows
are sampled one by one so that only that row gets None.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq

import torch

from inhouse.engine.base import TokenLogprob
from inhouse.engine.local.sequence import Sequence

__all__ = ["Sampler"]

log = logging.getLogger("inhouse.engine")


class Sampler:
    def __init__(self, decode_token: object, stop_ids: frozenset[int]) -> None:
        self._decode_token = decode_token
        self._stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long)
        self._shared = torch.Generator()
        self._shared.seed()

    def sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """``logits`` is ``[rows, vocab]`` float32 on the model's device; returns one token per row (None: that
        row failed)."""
        logits = logits.cpu()
        try:
            return self._sample(logits, seqs)
        except Exception:
            if len(seqs) <= 1:
                log.exception("sampling failed for request %s", seqs[0].request_id if seqs else "-")
                return [None] * len(seqs), [None] * len(seqs)
        tokens: list[int | None] = []
        logprobs: list[TokenLogprob | None] = []
        for i, seq in enumerate(seqs):  # one row broke the batch: find it, sample the others as usual
            row_tokens, row_logprobs = self.sample(logits[i : i + 1], [seq])
            tokens += row_tokens
            logprobs += row_logprobs
        return tokens, logprobs

    def _sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> tuple[list[int | None], list[TokenLogprob | None]]:
        raw_logprobs = None
        if any(s.sampling.logprobs for s in seqs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_penalties(logits, seqs)
        broken = ~torch.isfinite(logits.amax(dim=-1))  # a NaN or +inf anywhere, or nothing left above -inf
        bad = broken.nonzero().flatten().tolist()
        if bad:
            logits = logits.masked_fill(broken.view(-1, 1), 0.0)  # keeps the batch's arithmetic finite
        tokens: list[int | None] = logits.argmax(dim=-1).tolist()  # right for every greedy row
        sampled_rows = [i for i, seq in enumerate(seqs) if not seq.sampling.greedy]
        if sampled_rows:
            for i, token in zip(sampled_rows, self._sample_rows(logits, seqs, sampled_rows), strict=True):
                tokens[i] = token
        for i in bad:
            log.warning("request %s: the model's scores are not finite; failing it alone", seqs[i].request_id)
            tokens[i] = None
        return tokens, self._logprobs(raw_logprobs, seqs, tokens)

    def _apply_penalties(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        needs_copy = True
        for i, seq in enumerate(seqs):
            p = seq.sampling
            ban_stop = len(seq.output_ids) < p.min_tokens and len(self._stop_ids) > 0
            if not (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or ban_stop):
                continue
            if needs_copy:
                logits, needs_copy = logits.clone(), False
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)), dtype=torch.long)
                values = row[seen]
                row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
                ids, counts = torch.unique(torch.tensor(seq.output_ids, dtype=torch.long), return_counts=True)
                row[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(row.dtype)
            if ban_stop:
                row[self._stop_ids] = float("-inf")
        return logits

    def _sample_rows(self, logits: torch.Tensor, seqs: Seq[Sequence], rows: list[int]) -> list[int]:
        sub = logits[rows]
        temps = torch.tensor([max(seqs[i].sampling.temperature, 1e-5) for i in rows]).view(-1, 1)
        sub = sub / temps
        top_k = [seqs[i].sampling.top_k for i in rows]
        top_p = [seqs[i].sampling.top_p for i in rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            sub = _filter_top_k_top_p(sub, top_k, top_p)
        probs = torch.softmax(sub, dim=-1)
        out = []
        for row, i in enumerate(rows):
            generator = seqs[i].generator or self._shared
            out.append(int(torch.multinomial(probs[row], 1, generator=generator)))
        return out

    def _logprobs(
        self, raw: torch.Tensor | None, seqs: Seq[Sequence], tokens: list[int | None]
    ) -> list[TokenLogprob | None]:
        result: list[TokenLogprob | None] = [None] * len(seqs)
        if raw is None:
            return result
        decode = self._decode_token
        for i, seq in enumerate(seqs):
            if not seq.sampling.logprobs:
                continue
            top: tuple[tuple[str, float], ...] = ()
            token = tokens[i]
            if token is None:
                continue
            if seq.sampling.top_logprobs > 0:
                values, ids = torch.topk(raw[i], min(seq.sampling.top_logprobs, raw.shape[-1]))
                top = tuple((decode(int(t)), float(v)) for t, v in zip(ids, values, strict=True))  # type: ignore[operator]
            result[i] = TokenLogprob(decode(token), float(raw[i, token]), top)  # type: ignore[operator]
        return result


def _filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab).view(1, -1)
    k = torch.tensor([min(kk, vocab) if kk > 0 else vocab for kk in top_k]).view(-1, 1)
    drop = ranks >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    drop |= before > torch.tensor(top_p).view(-1, 1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
