"""The load-time rewrite of a bf16 model's linear layers (``inhouse.engine.local.linears``): packed weights and
stacked sibling projections give the model's own logits bit for bit with oneDNN, and within bf16 rounding with the
compiled linear kernel (where it runs), each row's the same whatever rows share the call; and hold nothing between
calls."""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from inhouse.engine.local.linear_kernel import LinearKernel
from inhouse.engine.local.linears import fast_linears


def _model(kind: str) -> Any:
    torch.manual_seed(0)
    shape = dict(vocab_size=300, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = (LlamaForCausalLM(LlamaConfig(**shape)) if kind == "llama"  # type: ignore[arg-type]
             else Qwen2ForCausalLM(Qwen2Config(**shape)))  # type: ignore[arg-type]  # q/k/v with a bias
    for p in model.parameters():  # random biases and norms, so a slice off by one column would show
        torch.nn.init.normal_(p, std=0.5)
    return model.to(torch.bfloat16).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_rewritten_model_gives_the_same_logits_bit_for_bit(kind: str) -> None:
    model = _model(kind)
    fast = copy.deepcopy(model)
    fast_linears(fast)
    attention, mlp = fast.model.layers[0].self_attn, fast.model.layers[0].mlp
    assert {type(m).__name__ for m in (attention.q_proj, attention.k_proj, attention.v_proj)} == {"_Sibling"}
    assert {type(m).__name__ for m in (mlp.gate_proj, mlp.up_proj)} == {"_Sibling"}
    assert type(attention.o_proj).__name__ == type(mlp.down_proj).__name__ == "_Packed"
    assert attention.q_proj.group is attention.v_proj.group is not mlp.up_proj.group
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = model(input_ids=ids).logits, fast(input_ids=ids).logits
    assert torch.equal(got, want)


def test_rewriting_twice_changes_nothing() -> None:
    model = _model("llama")
    fast_linears(model)
    before = [type(m).__name__ for m in model.modules()]
    fast_linears(model)
    assert [type(m).__name__ for m in model.modules()] == before


def test_a_group_lets_go_of_its_input_once_every_sibling_took_its_part() -> None:
    model = _model("llama")
    fast_linears(model)
    attention = model.model.layers[0].self_attn
    with torch.inference_mode():
        x = torch.randn(2, 5, 128).to(torch.bfloat16)
        held = weakref.ref(x)
        q, k = attention.q_proj(x), attention.k_proj(x)
        assert attention.q_proj.group._input is x  # v_proj has yet to take its part
        v = attention.v_proj(x)
        del x
        gc.collect()
    assert held() is None
    assert (q.shape[-1], k.shape[-1], v.shape[-1]) == (128, 64, 64)


def test_siblings_given_different_inputs_each_get_their_own_product() -> None:
    model = _model("llama")
    plain = copy.deepcopy(model.model.layers[0].self_attn)
    fast_linears(model)
    attention = model.model.layers[0].self_attn
    a, b = torch.randn(4, 128).to(torch.bfloat16), torch.randn(4, 128).to(torch.bfloat16)
    with torch.inference_mode():
        got = [attention.q_proj(a), attention.k_proj(b), attention.q_proj(a), attention.v_proj(a)]
        want = [plain.q_proj(a), plain.k_proj(b), plain.q_proj(a), plain.v_proj(a)]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_with_the_compiled_kernel_the_logits_are_the_models_within_bf16_rounding(kind: str) -> None:
    kernel, why = LinearKernel.load()
    if kernel is None:
        pytest.skip(f"the linear kernel does not run here: {why}")
    model = _model(kind)
    fast = copy.deepcopy(model)
    fast_linears(fast, kernel)
    attention, mlp = fast.model.layers[0].self_attn, fast.model.layers[0].mlp
    assert attention.q_proj.group.matmul.kernel is kernel and mlp.down_proj.matmul.kernel is kernel
    assert fast.lm_head.matmul.kernel is None  # 300 outputs: not the kernel's layout, so oneDNN's
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = model(input_ids=ids).logits, fast(input_ids=ids).logits
        alone = fast(input_ids=ids[1:2]).logits
    assert torch.equal(alone[0], got[1])  # a row's logits do not depend on the rows beside it
    scale = want.float().abs().max()
    assert float((got.float() - want.float()).abs().max()) <= 0.05 * float(scale)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
