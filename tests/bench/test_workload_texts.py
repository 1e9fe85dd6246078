"""``bench/workload_texts.py``: every prompt of the workload benchmark comes from the seed, at the sizes asked."""

from __future__ import annotations

from pathlib import Path

from bench.workload_texts import (
    SIZES,
    Texts,
    cold_prompts,
    conversation_turns,
    knowledge_prompt,
    long_prompt,
    long_prompts,
    nonce,
    rag_requests,
)


def test_texts_are_the_same_every_run_and_near_their_sizes(tiny_model_dir: Path) -> None:
    sizes = SIZES["smoke"]
    texts, again = Texts(tiny_model_dir, sizes), Texts(tiny_model_dir, sizes)
    assert texts.system == again.system and texts.topics == again.topics and len(texts.topics) == sizes.topics
    assert texts.count(texts.system) <= sizes.system_tokens + 2  # cut to the budget (decoding may merge a pair)
    low, _high = sizes.context_tokens
    assert all(texts.count(topic) >= low for topic in texts.topics)
    assert len(texts.chunks) > 5 and texts.chunks == again.chunks  # whole sentences: one may pass the budget
    assert texts.stats()["chunks"] == len(texts.chunks)


def test_workload_messages_are_seeded_per_variant(tiny_model_dir: Path) -> None:
    texts = Texts(tiny_model_dir, SIZES["smoke"])
    closed = rag_requests(texts, "closed")
    assert closed == rag_requests(texts, "closed") and len(closed) == texts.sizes.rag_requests
    assert all(m[0]["role"] == "system" and texts.system in m[0]["content"] and "<context>" in m[0]["content"]
               for m in closed)
    turns = conversation_turns(texts, "open", 1)
    assert len(turns) == texts.sizes.turns and turns[0].startswith("Ticket open-2: ")
    assert nonce("a") == nonce("a") != nonce("b")
    [message] = long_prompt(texts, "long-0")
    assert message["content"].startswith(nonce("long-0"))
    assert message["content"].endswith("Summarise the document above.")


def test_a_retry_sends_the_same_work_behind_first_lines_no_earlier_attempt_sent(tiny_model_dir: Path) -> None:
    """``bench/workload.py --retries``: a phase measured again finds no more in a prefix cache than its first
    attempt did, so a disturbed contender's second try is not a warmer one."""
    texts = Texts(tiny_model_dir, SIZES["smoke"])

    def first_lines(attempt: int) -> dict[str, set[str]]:
        return {
            "rag": {m[0]["content"].splitlines()[0] for m in rag_requests(texts, "closed", attempt)},
            "multiturn": {conversation_turns(texts, "closed", c, attempt)[0] for c in range(3)},
            "knowledge": {knowledge_prompt(texts, attempt)[0].splitlines()[0]},
            "cold": {p[0]["content"].splitlines()[0] for p in cold_prompts(texts, attempt)},
            "mixed": {p[0]["content"].splitlines()[0] for p in long_prompts(texts, "open", attempt)},
        }

    first, second, third = first_lines(0), first_lines(1), first_lines(2)
    for workload in first:
        assert not second[workload] & first[workload] and not third[workload] & (first[workload] | second[workload])
    # the first attempt's prompts are the ones every earlier run sent
    assert first["rag"] == {texts.system.splitlines()[0]}
    assert conversation_turns(texts, "closed", 0)[0].startswith("Ticket closed-1: ")
    assert conversation_turns(texts, "closed", 0, 1)[0].startswith("Ticket closed-retry1-1: ")
    assert long_prompts(texts, "open") == [long_prompt(texts, f"long-open-{i}") for i in range(texts.sizes.mixed_long)]
    assert knowledge_prompt(texts)[0].startswith(nonce("knowledge") + "\n")
    # the rest is the same work: the same topics and questions, the same turns after the first line
    for a, b in zip(rag_requests(texts, "closed", 0), rag_requests(texts, "closed", 1), strict=True):
        assert b[0]["content"].split("\n", 1)[1] == a[0]["content"] and b[1] == a[1]
    assert conversation_turns(texts, "closed", 2, 1)[1:] == conversation_turns(texts, "closed", 2)[1:]
    assert knowledge_prompt(texts, 1)[1] == knowledge_prompt(texts)[1]
    assert abs(texts.count(knowledge_prompt(texts, 1)[0]) - texts.count(knowledge_prompt(texts)[0])) <= 2


def test_medium_is_reduced_with_three_times_the_samples() -> None:
    """The same shapes (prompt lengths, answer lengths, concurrency of RAG and the streams), so a medium run
    measures what a reduced one does, over more requests."""
    reduced, medium = SIZES["reduced"], SIZES["medium"]
    shapes = ("system_tokens", "chunk_tokens", "context_tokens", "rag_concurrency", "max_tokens", "turns",
              "mixed_streams", "stream_tokens", "long_tokens", "knowledge_tokens", "knowledge_max_tokens",
              "cold_tokens")
    assert all(getattr(medium, name) == getattr(reduced, name) for name in shapes)
    samples = ("rag_requests", "topics", "conversations", "mixed_long")
    assert all(getattr(medium, name) >= 2 * getattr(reduced, name) for name in samples)
    assert medium.rag_requests / medium.topics == reduced.rag_requests / reduced.topics  # the same share of repeats
