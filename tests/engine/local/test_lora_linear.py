"""LoraLinear alone: the stacked decode product gives each row exactly its own adapter's update, PEFT's way."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from inhouse.engine.local.lora import AdapterWeights, LoraContext, LoraLinear

IN, OUT = 24, 40


def adapter(name: str, rank: int, scale: float, seed: int, targets: bool = True) -> AdapterWeights:
    generator = torch.Generator().manual_seed(seed)
    modules = {"proj": (torch.randn(rank, IN, generator=generator), torch.randn(OUT, rank, generator=generator),
                        scale)} if targets else {}
    return AdapterWeights(name, modules)


def peft_rows(base: torch.nn.Linear, x: torch.Tensor, rows: list[AdapterWeights | None]) -> torch.Tensor:
    """Each row as PEFT computes it: base output, plus ``(x A^T) B^T * scale`` in float32, rounded once.  Every
    product runs over the whole batch (a matrix product's last bits depend on its shape), then rows are picked."""
    out = base(x)
    want = out.clone()
    for i, weights in enumerate(rows):
        if weights is not None and "proj" in weights.modules:
            a, b, scale = weights.modules["proj"]
            delta = F.linear(F.linear(x.to(a.dtype), a), b) * scale
            want[i] = (out[i] + delta[i]).to(out.dtype)
    return want


def run(layer: LoraLinear, context: LoraContext, x: torch.Tensor, rows: list[AdapterWeights | None]) -> torch.Tensor:
    order = sorted({w.name: w for w in rows if w is not None}.values(), key=lambda w: w.name)
    position = {w.name: i for i, w in enumerate(order)}
    slots = torch.tensor([position[w.name] if w is not None else -1 for w in rows])
    context.set([((slots == i).nonzero().view(-1), w) for i, w in enumerate(order)], slots)
    try:
        return layer(x)
    finally:
        context.clear()


def test_each_row_gets_exactly_its_own_adapter_in_a_mixed_pass() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT, bias=False).to(torch.bfloat16)
    context = LoraContext()
    layer = LoraLinear(base, "proj", context)
    # a scale of 2 or 0.5 is folded into the stacked A (exact), 0.75 is multiplied after B
    first, second, third = adapter("a", 8, 2.0, 1), adapter("b", 16, 0.75, 2), adapter("d", 4, 0.5, 7)
    untargeted = adapter("c", 4, 1.0, 3, targets=False)  # targets other modules, not this one
    rows: list[AdapterWeights | None] = [first, None, second, untargeted, first, third, None, second]
    x = torch.randn(len(rows), IN).to(torch.bfloat16)
    with torch.inference_mode():
        got = run(layer, context, x.clone(), rows)
        want = peft_rows(base, x, rows)
    for i in range(len(rows)):
        assert torch.equal(got[i], want[i]), f"row {i}"


def test_one_adapter_on_every_row_and_a_scale_per_adapter() -> None:
    torch.manual_seed(1)
    base = torch.nn.Linear(IN, OUT, bias=False)
    context = LoraContext()
    layer = LoraLinear(base, "proj", context)
    only = adapter("a", 8, 3.0, 4)
    x = torch.randn(4, IN)
    with torch.inference_mode():
        got = run(layer, context, x.clone(), [only] * 4)
        want = peft_rows(base, x, [only] * 4)
    assert torch.equal(got, want)
    assert not torch.equal(got, base(x))  # the adapter did change the output


def test_stacked_weights_follow_the_adapters_in_the_pass() -> None:
    """The stack kept from the last pass is rebuilt when another adapter (or a reloaded copy) runs."""
    torch.manual_seed(2)
    base = torch.nn.Linear(IN, OUT, bias=False)
    context = LoraContext()
    layer = LoraLinear(base, "proj", context)
    x = torch.randn(2, IN)
    first, other = adapter("a", 8, 1.0, 5), adapter("a", 8, 1.0, 6)  # same name: a reloaded, changed adapter
    with torch.inference_mode():
        for rows in ([first, None], [other, None], [None, first]):
            assert torch.equal(run(layer, context, x.clone(), rows), peft_rows(base, x, rows))
        layer.forget()
        assert torch.equal(run(layer, context, x.clone(), [first, first]), peft_rows(base, x, [first, first]))
