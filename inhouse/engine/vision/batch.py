"""Several vision jobs through one call of transformers' ``generate``.

Owns which waiting jobs may share a call (``compatible_groups``: the same sampling shape, unseeded) and running
one such group (``generate_batch``): the prompts padded on the left into one batch by the model's processor, each
row with its own completion budget, minimum length, stop strings and abort (a stopping criterion per row and a
logits processor that keeps a row's end tokens out until its minimum), and each row's tokens streamed to its own
job as ``generate`` makes them.  A row that is done is finished at once (``on_done``) while the others go on.
Holds no state between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from collections.abc import Sequence as Seq
from typing import Any

import torch

from inhouse.engine.vision.job import TextStream, VisionJob
from inhouse.engine.vision.processor import model_inputs

__all__ = ["compatible_groups", "generate_batch"]


def sampling_shape(job: VisionJob) -> Hashable:
    """Jobs with equal shapes can share one ``generate`` call (its sampling options are per call, not per row)."""
    s = job.sampling
    if s.seed is not None and not s.greedy:
        return ("seeded", id(job))  # torch's random generator is process-wide: a seeded job runs alone
    if s.greedy:
        return ("greedy", s.repetition_penalty)
    return ("sample", s.temperature, s.top_p, s.top_k, s.repetition_penalty)


def compatible_groups(jobs: Seq[VisionJob], limit: int) -> list[list[VisionJob]]:
    """``jobs`` split into groups that can share a call, at most ``limit`` each, in order of arrival."""
    groups: dict[Hashable, list[list[VisionJob]]] = {}
    order: list[list[VisionJob]] = []
    for job in jobs:
        chain = groups.setdefault(sampling_shape(job), [])
        if not chain or len(chain[-1]) >= limit:
            chain.append([])
            order.append(chain[-1])
        chain[-1].append(job)
    return order


def generate_batch(model: Any, processor: Any, streams: Seq[TextStream], stop_ids: list[int],
                   on_done: Callable[[TextStream], None]) -> None:
    """Run the streams' jobs as one batch; ``on_done(stream)`` once for each row as soon as it is done (also
    for the rows still going when ``generate`` returns).  Raises what ``generate`` or the processor raises."""
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    jobs = [stream.job for stream in streams]
    if len(jobs) == 1:
        inputs = dict(jobs[0].inputs)
    else:
        inputs = model_inputs(processor, [job.text for job in jobs], [job.images for job in jobs])
    prompt_length = int(inputs["input_ids"].shape[1])
    reported = [False] * len(streams)

    class _RowsDone(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            done = [stream.done for stream in streams]
            for row, stream in enumerate(streams):
                if done[row] and not reported[row]:
                    reported[row] = True
                    on_done(stream)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    minimums = [job.max_tokens if job.sampling.ignore_eos else job.sampling.min_tokens for job in jobs]

    class _MinTokens(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            made = int(input_ids.shape[1]) - prompt_length
            rows = [row for row, minimum in enumerate(minimums) if made < minimum]
            if rows and stop_ids:
                scores[torch.tensor(rows).view(-1, 1), torch.tensor(stop_ids).view(1, -1)] = float("-inf")
            return scores

    sampling = jobs[0].sampling  # the group's shape: equal for every job in it
    options: dict[str, Any] = {"max_new_tokens": max(job.max_tokens for job in jobs), "do_sample": not sampling.greedy,
                               "eos_token_id": stop_ids or None, "repetition_penalty": sampling.repetition_penalty}
    if not sampling.greedy:
        options |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or None}
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # best effort: torch's RNG is process-wide
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        model.generate(**inputs, streamer=_Rows(streams), stopping_criteria=StoppingCriteriaList([_RowsDone()]),
                       logits_processor=LogitsProcessorList([_MinTokens()]),
                       pad_token_id=stop_ids[0] if stop_ids else None, **options)
    for row, stream in enumerate(streams):
        if not reported[row]:
            reported[row] = True
            on_done(stream)


class _Rows:
    """A ``generate`` streamer for a batch: each step's tokens (one per row) to the rows' own streams."""

    def __init__(self, streams: Seq[TextStream]) -> None:
        self._streams = streams
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate's first call is the prompt
            self._prompt_seen = True
            return
        for stream, token in zip(self._streams, value.reshape(len(self._streams), -1)[:, -1].tolist(), strict=True):
            stream.add(int(token))

    def end(self) -> None:
        pass
