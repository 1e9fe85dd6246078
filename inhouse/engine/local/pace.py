"""How long the local engine's steps take, and so how many prompt tokens a step may add to its decode rows.

Owns a model of a step's time, fitted on the engine thread from the steps it runs: a step that only decodes takes
``decode_s`` (a running average); prompts beside its decode rows add ``fixed_s`` (whatever any prompt costs a
step), ``token_s`` for each prompt token (the model's layers) and ``pair_s`` for each query-key pair their
attention reads (every earlier token of their prompt).  The pair term is what makes a chunk far into a long
prompt expensive whatever its size: at 3,000 tokens in, its attention costs a small model as much as its
layers.  The three costs are a least-squares fit over the recent steps (none below 0), pulled towards nothing
fixed, a millisecond a token and a microsecond a pair until steps tell them apart.

While three or more sequences are decoding, a step takes at most as many prompt tokens as fit the time it may
hold the running streams back, so a prompt arriving, short or thousands of tokens long, slows their next token by a
fraction of a step instead of stalling them for its whole prefill.  That delay is paid by every decoding stream,
once per step, so it is a total shared among them: ``total`` decode steps' time in all, but never less than
``stall`` each (three streams: 2 decode steps; four: 1.5; five: 1.2; six or more: 1).  Each stream's next token
then stays within about ``1 + stall`` times its pace, at the median: the steps' own spread (a decode step's p99 was
1.6x its median on a 2-core machine, the client on it too) comes on top, so the floor is 1, not the 1.5 it was.  In
the mixed workload's open loop (six streams, 3,000-token prompts arriving), 1.5 gave chunk steps of 2.2x a decode
step at the median and 3.8x at their p99, the streams' inter-token p99 at 3.13-3.42x their p50; 1 gave 2.0x and
3.3x, the p99 at 2.55x, for a long prompt's first token 16-18% later (9.5 s against 8.0-8.2).  (Before chunks kept
their packed keys, ``attention_kernel.PackedPrompt``, a lower floor only shrank chunks already at ``least``: 1.2
gave 70 against 72 ms and nearly doubled that wait.)

Prompts waiting for their first token are held back too, a whole step each: when more of them wait than streams
decode, a step takes what it takes beside few streams (a ``most``-token chunk), the waiting being the majority.  A
burst of 28 chats arriving beside three streams (the engine benchmark's 32 users starting together) otherwise went
in 16 tokens a step, four steps a chat, the last answered 5-8 s later (TTFT p99 at c = 32: 5.2-8.1 s against
vLLM's 1.6 s); its steps left no decode-only step to time, so the pace kept the decode step of three rows (25 ms)
against the 55 ms those steps took, and took the difference for the prompts' cost.

With ``few`` streams or fewer (one or two: a RAG app's few users), a step takes a whole ``most``-token chunk: they
wait one chunk's time, the bound chunked prefill promises, and no more.  Small chunks beside them paid a step's
fixed cost again and again: the prompt took longer to its first token, and the engine to its answers.  Medium
RAG in the closed loop (two users, the same server, three pairs of runs back to back): 28.4, 24.1 and 25.6 s
against 32.5, 29.6 and 27.1 s, time to first token p50 853, 731 and 840 ms against 1,284, 1,361 and 1,142; the
answer's longest gap is then a chunk's time (inter-token p99 494 against 294 ms).  Where the model says more than
``most`` tokens fit in ``wait`` seconds of a step (a fast CPU: one with AMX prefilled 2,000 tokens in 0.6 s,
where ``most`` was chosen on one that took 1.2), the chunk is what fits, up to twice ``most``: a RAG prompt
of 2,000 new tokens beside one decoding answer took four 512-token steps and reached its first token 1.3-3x
later than vLLM's one step did.

The budget is never below ``least`` tokens nor above ``most`` (``prefill_chunk_tokens``) beside three streams or
more.  Holds no sequences and no model.
"""

from __future__ import annotations

import math

__all__ = ["Pace"]

_WEIGHT = 0.2  # of the newest decode step in the running average
_FORGET = 0.9  # each step's weight in the fit, against the one before it
_PRIOR = (0.0, 1e-3, 1e-3)  # seconds fixed, a prompt token, a thousand query-key pairs, before steps tell
_PRIOR_WEIGHT = (0.1, 5.0, 5.0)  # the prior weighs as a tenth of a step (of 2 tokens, 2 kpairs): steps soon outweigh it


class Pace:
    def __init__(self, most: int, least: int = 16, stall: float = 1.0, total: float = 6.0, few: int = 2,
                 wait: float = 0.4) -> None:
        self.most = most
        self.least = min(least, most)
        self.few = few  # streams that may wait a whole chunk's time
        self.wait = wait  # ... or, when more than ``most`` tokens fit it, this many seconds of a step
        self.stall = stall  # decode steps' time a step may hold each stream back, at least
        self.total = total  # ... and all of them together, when that is more
        self.decode_s: float | None = None  # a step with decode rows only
        self.fixed_s, self.token_s, self.pair_s = _PRIOR[0], _PRIOR[1], _PRIOR[2] / 1000  # what prompts add
        self._xx = [[0.0] * 3 for _ in range(3)]  # decayed sums of x·xᵀ and x·excess, x = (1, tokens, kpairs)
        self._xy = [0.0] * 3

    def ran(self, seconds: float, decode_rows: int, prompt_tokens: int, pairs: float = 0.0) -> None:
        """A step took ``seconds`` for ``decode_rows`` rows and ``prompt_tokens`` prompt tokens whose attention read
        ``pairs`` query-key pairs."""
        if not prompt_tokens:
            if decode_rows:
                self.decode_s = seconds if self.decode_s is None else (1 - _WEIGHT) * self.decode_s + _WEIGHT * seconds
            return
        if not decode_rows or self.decode_s is None:
            return  # a prompt alone pays the weights' read a decode step pays: not what a prompt adds to one
        x, excess = (1.0, float(prompt_tokens), pairs / 1000), max(seconds - self.decode_s, 0.0)
        for i in range(3):
            self._xy[i] = _FORGET * self._xy[i] + x[i] * excess
            for j in range(3):
                self._xx[i][j] = _FORGET * self._xx[i][j] + x[i] * x[j]
        self.fixed_s, self.token_s, kpair_s = _fit(self._xx, self._xy)
        self.pair_s = kpair_s / 1000

    def budget(self, streams: int, offset: int = 0, tokens: int = 0, pairs: float = 0.0, waiting: int = 0) -> int:
        """Prompt tokens the next step may add to a prompt whose first ``offset`` tokens are in the cache, beside
        ``streams`` decode rows and ``tokens`` prompt tokens already in it (``pairs`` pairs), ``waiting`` prompts
        not yet at their first token: what fits (``room``), but 0 when tokens already in it leave no room for
        ``least`` more, and never below ``least`` when none are, so a lone prompt goes on."""
        room = self.room(streams, offset, tokens, pairs, waiting)
        if tokens:
            return room if room >= self.least else 0
        return max(self.least, room)

    def room(self, streams: int, offset: int = 0, tokens: int = 0, pairs: float = 0.0, waiting: int = 0) -> int:
        """The prompt tokens that fit (at least 0; see ``budget``): with ``few`` streams or fewer, ``most`` less
        those already in the step, or what fits ``wait`` when that is more (up to twice ``most``); with more, what
        fits their shared stall, up to ``most`` in all, or ``least`` in all until a decode step has been timed; but
        as with few streams when more prompts wait for their first token than streams decode (``waiting``)."""
        cap = self.most - tokens
        if streams <= self.few or waiting > streams:
            fits = self.most - tokens
            if self.decode_s is not None:  # a fast machine may take more in the same wait
                fits = max(fits, self._fits_in(self.wait - self.decode_s, offset, tokens, pairs))
                cap = 2 * self.most - tokens
        elif self.decode_s is None:
            fits = self.least - tokens
        else:
            fits = self._fits(streams, offset, tokens, pairs)
        return max(0, min(cap, fits))

    def _fits(self, streams: int, offset: int, tokens: int, pairs: float) -> int:
        """The prompt tokens that fit the time the step may hold ``streams`` streams back (decode steps timed)."""
        assert self.decode_s is not None
        return self._fits_in(max(self.stall, self.total / streams) * self.decode_s, offset, tokens, pairs)

    def _fits_in(self, allowed: float, offset: int, tokens: int, pairs: float) -> int:
        """The prompt tokens whose cost, beside ``tokens`` already in the step, fits ``allowed`` seconds."""
        left = allowed - self.fixed_s - self.token_s * tokens - self.pair_s * pairs
        # n tokens at offset o add token_s·n + pair_s·(n·o + n²/2): the largest n within what is left
        linear, half = self.token_s + self.pair_s * offset, self.pair_s / 2
        if left <= 0:
            return 0
        if half <= 0:
            return int(left / max(linear, 1e-12))
        return int((math.sqrt(linear**2 + 4 * half * left) - linear) / (2 * half))


def _fit(xx: list[list[float]], xy: list[float]) -> tuple[float, float, float]:
    """Least squares of excess ≈ fixed_s + token_s·tokens + kpair_s·kpairs with the prior's weight, a cost that
    comes out below 0 left out and the rest fitted again."""
    free = [0, 1, 2]
    while True:
        a = [[xx[i][j] + (_PRIOR_WEIGHT[i] if i == j else 0.0) for j in free] for i in free]
        b = [xy[i] + _PRIOR_WEIGHT[i] * _PRIOR[i] for i in free]
        solved = _solve(a, b)
        if all(c >= 0 for c in solved) or len(free) == 1:
            out = [0.0, 0.0, 0.0]
            for i, c in zip(free, solved, strict=True):
                out[i] = max(c, 0.0)
            return out[0], out[1], out[2]
        free = [i for i, c in zip(free, solved, strict=True) if c >= 0] or free[:1]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """``a``·x = ``b`` by Gaussian elimination (``a`` small, symmetric, positive definite: the prior makes it so)."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
