"""``bench/workload_cases.py``: a conversation resends its history with the server's answers; open-loop
capacity comes from the closed loop."""

from __future__ import annotations

import json

import httpx

from bench.common import load
from bench.workload_cases import Phase, Target, capacity, conversation


async def test_each_turn_resends_the_history_with_the_answers() -> None:
    seen: list[list[dict[str, str]]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body["messages"])
        assert body["model"] == "m" and body["stream"] is True and body["max_tokens"] == 4
        chunk = {"choices": [{"delta": {"content": f"answer {len(seen)}"}, "finish_reason": "stop"}]}
        return httpx.Response(200, text=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n")

    target = Target("http://test", 0, {"model": "m"}, 30.0)
    async with httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(answer)) as client:
        samples = await conversation(target, client, "rules", ["hi", "more"], 4)
    assert [s.content for s in samples] == ["answer 1", "answer 2"]
    assert seen[1] == [{"role": "system", "content": "rules"}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "answer 1"}, {"role": "user", "content": "more"}]


def test_capacity_is_jobs_per_second_or_long_prompts_per_second() -> None:
    level = load.summarize(1, load.Run([load.Sample(ttft_s=0.1, latency_s=1.0, output_tokens=1)], 1.0))
    assert capacity("rag", Phase("closed", level, 4, 2.0)) == 2.0
    assert capacity("mixed", Phase("closed", level, 4, 2.0, extra={"long_latency_mean_s": 4.0})) == 0.25
    assert capacity("mixed", Phase("closed", level, 4, 2.0)) is None
