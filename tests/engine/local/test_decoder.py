"""The Llama family's forward written out (``inhouse.engine.local.decoder``) against the model's own ``forward``,
through the runner: a step of two prompts (one long enough for the blocked prefill), a fused step (decode rows and
a third prompt in one row) and decode steps give the same logits bit for bit, in bf16 (packed, stacked linears)
and float32."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from inhouse.engine.local.attention import BLOCKED_FROM, register
from inhouse.engine.local.decoder import DirectForward
from inhouse.engine.local.kv_tiers import KVTiers
from inhouse.engine.local.runner import ModelRunner
from inhouse.engine.local.sequence import Sequence
from tests.engine.local.test_scheduler import seq

FAMILY = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}  # Qwen2: q/k/v with a bias


def _model(kind: str, dtype: torch.dtype) -> Any:
    torch.manual_seed(0)
    config_class, model_class = FAMILY[kind]
    config = config_class(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    config._attn_implementation = register()
    model = model_class(config)
    for p in model.parameters():  # random norms and biases too
        torch.nn.init.normal_(p, std=0.3)
    return model.to(dtype).eval()


def _steps(runner: ModelRunner) -> list[torch.Tensor]:
    """Logits of a step of two prompts packed in one row, a fused step (their decode rows and a third prompt), then
    two decode steps of all three; each sequence appends its argmax."""
    tiers = runner.tiers
    short, long_, late = seq("short", 40), seq("long", BLOCKED_FROM + 44), seq("late", 30)
    for s in (short, long_):
        tiers.place(s, s.length)
    logits = [runner.prefill([short, long_])]
    running: list[Sequence] = [short, long_]
    for fused in (True, False, False):
        for s, row in zip(running, logits[-1], strict=True):
            s.cached = len(s.prompt_ids)
            s.output_ids.append(int(row.argmax()))
        running = tiers.prepare_decode()
        if fused:
            tiers.place(late, late.length)
            logits.append(runner.run(running, [late]))
            running = [*running, late]
        else:
            logits.append(runner.decode(running))
    return logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", sorted(FAMILY))
def test_the_written_out_forward_gives_the_models_own_logits(kind: str, dtype: torch.dtype) -> None:
    model = _model(kind, dtype)
    runners = [ModelRunner(model, KVTiers(num_layers=2, kv_heads=2, head_dim=32, max_length=1024, dtype=dtype,
                                          device=torch.device("cpu")), torch.device("cpu")) for _ in range(2)]
    direct, own = runners
    assert direct.direct is not None
    own.direct = None  # the model's own forward
    got, want = _steps(direct), _steps(own)
    assert [g.shape[0] for g in got] == [2, 3, 3, 3]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_other_architectures_keep_their_own_forward() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert DirectForward.for_model(gpt2) is None
    assert DirectForward.for_model(_model("llama", torch.float32)) is not None
