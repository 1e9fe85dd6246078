"""How long the local engine's steps take, and so how many prompt tokens a step may add to its decode rows.

Owns two running averages, measured on the engine thread: the time of a step that only decodes, and the time one
prompt token adds to a step.  While sequences are decoding, a step takes at most as many prompt tokens as add
``stall`` decode steps' time, so a prompt arriving, short or thousands of tokens long, slows the running streams'
next token to about ``1 + stall`` times their pace instead of stalling them for its whole prefill.  The budget is
never below ``least`` tokens nor above ``most`` (``prefill_chunk_tokens``); the scheduler lets short prompts in
whole beyond it.  Until a step has been timed, a prompt token is taken to cost a millisecond.  Holds no
sequences and no model.
"""

from __future__ import annotations

__all__ = ["Pace"]

_WEIGHT = 0.2  # of the newest measurement in a running average


class Pace:
    def __init__(self, most: int, least: int = 16, stall: float = 1.5) -> None:
        self.most = most
        self.least = min(least, most)
        self.stall = stall
        self.decode_s: float | None = None  # a step with decode rows only
        self.token_s = 1e-3  # what one prompt token adds to a step

    def ran(self, seconds: float, decode_rows: int, prompt_tokens: int) -> None:
        """A step took ``seconds`` for ``decode_rows`` rows and ``prompt_tokens`` prompt tokens."""
        if not prompt_tokens:
            if decode_rows:
                self.decode_s = _average(self.decode_s, seconds)
            return
        beyond = seconds - (self.decode_s or 0.0) if decode_rows else seconds
        self.token_s = _average(self.token_s, max(beyond, 0.0) / prompt_tokens)

    def budget(self) -> int:
        """Prompt tokens the next step may take beside the decode rows."""
        if self.decode_s is None:
            return self.least
        fits = int(self.stall * self.decode_s / max(self.token_s, 1e-9))
        return max(self.least, min(self.most, fits))


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - _WEIGHT) * old + _WEIGHT * new
