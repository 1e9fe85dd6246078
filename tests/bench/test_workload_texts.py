"""``bench/workload_texts.py``: every prompt of the workload benchmark comes from the seed, at the sizes asked."""

from __future__ import annotations

from pathlib import Path

from bench.workload_texts import SIZES, Texts, conversation_turns, long_prompt, nonce, rag_requests


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
