"""The sentence-transformers engine: embeddings and rerank from a local encoder, micro-batched across requests.

``engine`` (the Engine behind the protocol) ← ``batcher`` (queue, batch choice, worker thread; model-agnostic)
← ``runner`` (tokenize, pad, forward pass) ← ``loader`` (path, task, dtype, facts read off the model).
"""
