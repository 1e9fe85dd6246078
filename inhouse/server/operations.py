"""Which models serve which operation: the 400 that names the right kind of model, and the typed engine.

A route asks ``require`` before it routes (a chat model asked for embeddings is the caller's mistake, not
a 500), and its attempt narrows the chosen deployment's engine with ``generator``/``embedder``/``reranker``
(a fallback of another kind is refused the same way).
"""

from __future__ import annotations

from inhouse.engine.base import Capability, Embedder, Engine, Generator, Reranker
from inhouse.errors import ErrorCode, InhouseError
from inhouse.gateway.registry import ModelRegistry

__all__ = ["GENERATION", "embedder", "generator", "require", "reranker"]

GENERATION = frozenset({Capability.CHAT, Capability.COMPLETION})
_WORDS = {Capability.CHAT: "chat completions", Capability.COMPLETION: "text completions",
          Capability.EMBEDDINGS: "embeddings", Capability.RERANK: "rerank"}


def require(registry: ModelRegistry, model: str, wanted: frozenset[Capability]) -> None:
    """404 for an unknown model; 400 ``model_not_supported`` when it serves none of ``wanted``, naming the
    models that do."""
    capabilities = registry.get(model).engine.info.capabilities
    if capabilities & wanted:
        return
    raise _refused(model, capabilities, wanted, registry)


def _refused(model: str, capabilities: frozenset[Capability], wanted: frozenset[Capability],
             registry: ModelRegistry | None = None) -> InhouseError:
    operation = " or ".join(sorted(_WORDS[c] for c in wanted))
    serves = ", ".join(sorted(_WORDS[c] for c in capabilities if c in _WORDS)) or "nothing of this API"
    message = f"The model '{model}' does not serve {operation} (it serves {serves})."
    if registry is not None:
        others = [n for n in registry.names() if registry.get(n).engine.info.capabilities & wanted]
        message += (f" Models that do: {', '.join(sorted(others))}." if others else
                    f" No model on this server serves {operation}.")
    return InhouseError(ErrorCode.WRONG_MODEL_KIND, message, param="model")


def _check(engine: Engine, name: str, wanted: Capability) -> None:
    if wanted not in engine.info.capabilities:
        raise _refused(name, engine.info.capabilities, frozenset({wanted}))


def generator(engine: Engine, name: str) -> Generator:
    if not (engine.info.capabilities & GENERATION) or not isinstance(engine, Generator):
        raise _refused(name, engine.info.capabilities, GENERATION)
    return engine


def embedder(engine: Engine, name: str) -> Embedder:
    _check(engine, name, Capability.EMBEDDINGS)
    if not isinstance(engine, Embedder):
        raise _refused(name, frozenset(), frozenset({Capability.EMBEDDINGS}))
    return engine


def reranker(engine: Engine, name: str) -> Reranker:
    _check(engine, name, Capability.RERANK)
    if not isinstance(engine, Reranker):
        raise _refused(name, frozenset(), frozenset({Capability.RERANK}))
    return engine
