"""How long the local engine's steps take, and so how many prompt tokens a step may add to its decode rows.

Owns a model of a step's time, fitted on the engine thread from the steps it runs: a step that only decodes takes
``decode_s`` (a running average); prompt tokens beside its decode rows add ``token_s`` each (the model's layers)
and ``pair_s`` for each query-key pair their attention reads (every earlier token of their prompt).  The second
term is what makes a chunk far into a long prompt expensive whatever its size: at 3,000 tokens in, its attention
costs a small model as much as its layers.  The two costs are a least-squares fit over the recent steps, pulled
towards a millisecond a token and a microsecond a pair until steps tell them apart.

While sequences are decoding, a step takes at most as many prompt tokens as add ``stall`` decode steps' time, so a
prompt arriving, short or thousands of tokens long, slows the running streams' next token to about ``1 + stall``
times their pace instead of stalling them for its whole prefill.  That delay is paid by every decoding stream,
once per step, so it is sized for ``share`` of them: fewer streams may be held longer, ``stall * share /
streams`` decode steps (one stream: 4 × 1.5 = 6), so the streams lose about the same in all per step while a
new prompt gets its first token in a few steps instead of dozens.  With one or two streams running (a RAG app's
few users), small chunks would make the prompt and the streams take turns instead of decoding together, which
costs both of them throughput.

The budget is never below ``least`` tokens nor above ``most`` (``prefill_chunk_tokens``).  Holds no sequences and
no model.
"""

from __future__ import annotations

import math

__all__ = ["Pace"]

_WEIGHT = 0.2  # of the newest decode step in the running average
_FORGET = 0.9  # each step's weight in the fit, against the one before it
_PRIOR = (1e-3, 1e-3)  # seconds a prompt token, seconds a thousand query-key pairs, before steps tell
_PRIOR_WEIGHT = 50.0  # the prior counts as this many squared tokens (a step of 7 tokens)


class Pace:
    def __init__(self, most: int, least: int = 16, stall: float = 1.5, share: int = 4) -> None:
        self.most = most
        self.least = min(least, most)
        self.stall = stall
        self.share = share
        self.decode_s: float | None = None  # a step with decode rows only
        self.token_s, self.pair_s = _PRIOR[0], _PRIOR[1] / 1000  # what a prompt token, a pair add to a step
        self._sums = [0.0] * 5  # decayed sums of tokens², tokens·kpairs, kpairs², tokens·excess, kpairs·excess

    def ran(self, seconds: float, decode_rows: int, prompt_tokens: int, pairs: float = 0.0) -> None:
        """A step took ``seconds`` for ``decode_rows`` rows and ``prompt_tokens`` prompt tokens whose attention read
        ``pairs`` query-key pairs."""
        if not prompt_tokens:
            if decode_rows:
                self.decode_s = seconds if self.decode_s is None else (1 - _WEIGHT) * self.decode_s + _WEIGHT * seconds
            return
        if not decode_rows or self.decode_s is None:
            return  # a prompt alone pays the weights' read a decode step pays: not what a prompt adds to one
        excess, k = max(seconds - self.decode_s, 0.0), pairs / 1000
        new = (prompt_tokens**2, prompt_tokens * k, k * k, prompt_tokens * excess, k * excess)
        self._sums = [_FORGET * old + x for old, x in zip(self._sums, new, strict=True)]
        self.token_s, kpair_s = _fit(*self._sums)
        self.pair_s = kpair_s / 1000

    def budget(self, streams: int, offset: int = 0, tokens: int = 0, pairs: float = 0.0) -> int:
        """Prompt tokens the next step may add to a prompt whose first ``offset`` tokens are in the cache, beside
        ``streams`` decode rows and ``tokens`` prompt tokens already in it (``pairs`` pairs)."""
        if self.decode_s is None:
            return self.least
        allowed = self.stall * max(1.0, self.share / max(streams, 1)) * self.decode_s
        left = allowed - self.token_s * tokens - self.pair_s * pairs
        if left <= 0:
            return self.least
        # n tokens at offset o add token_s·n + pair_s·(n·o + n²/2): the largest n within what is left
        linear, half = self.token_s + self.pair_s * offset, self.pair_s / 2
        fits = left / linear if half <= 0 else (math.sqrt(linear**2 + 4 * half * left) - linear) / (2 * half)
        return max(self.least, min(self.most, int(fits)))


def _fit(tt: float, tk: float, kk: float, ty: float, ky: float) -> tuple[float, float]:
    """Least squares of excess ≈ token_s·tokens + kpair_s·kpairs, with the prior's weight; neither cost below 0."""
    tt, kk = tt + _PRIOR_WEIGHT, kk + _PRIOR_WEIGHT
    ty, ky = ty + _PRIOR_WEIGHT * _PRIOR[0], ky + _PRIOR_WEIGHT * _PRIOR[1]
    det = tt * kk - tk * tk
    token_s, kpair_s = (ty * kk - ky * tk) / det, (ky * tt - ty * tk) / det
    if kpair_s < 0:
        return max(ty / tt, 0.0), 0.0
    if token_s < 0:
        return 0.0, max(ky / kk, 0.0)
    return token_s, kpair_s
