"""Wire pieces shared by the chat and completion endpoints."""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

__all__ = ["INT32_MAX", "LogprobEntry", "SamplingFields", "StreamOptions", "TokenId", "WireModel", "usage"]


class LogprobEntry(Protocol):
    """One sampled token's log-probability and its top alternatives, as the logprob renderers read it
    (the engine's TokenLogprob has this shape; protocol/ does not import engine/)."""

    @property
    def token(self) -> str: ...

    @property
    def logprob(self) -> float: ...

    @property
    def top(self) -> tuple[tuple[str, float], ...]: ...


class WireModel(BaseModel):
    """Unknown fields are ignored, never rejected: Dify and SDKs send extras (contract pitfall 9)."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(WireModel):
    include_usage: bool = False


INT32_MAX = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
StopString = Annotated[str, Field(max_length=512)]


class SamplingFields(WireModel):
    """The sampling fields chat and completions share, with OpenAI's (and vLLM's) ranges.

    Every number has both bounds, so nothing out of range reaches an engine: an engine batches many
    requests, and one request's bad value must be its own 400, not everyone's 500.  How many choices
    (``n`` × prompts) a call may ask for is the server's ``max_choices`` setting, checked by the route.
    """

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=16)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10.0)] | None = None
    n: Annotated[int, Field(ge=1, le=INT32_MAX)] = 1
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0

    @field_validator("min_tokens")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        most = info.data.get("max_tokens")
        if most is not None and value > most:
            raise ValueError(f"min_tokens ({value}) must not exceed max_tokens ({most})")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` (the prompt tokens served from a prefix
    cache) only when the engine counted them (None: it did not say, and the field is left out)."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out
