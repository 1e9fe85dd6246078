"""The model's linear layers, rewritten once at load for fast CPU inference (with oneDNN: the same results bit for
bit).

Owns two rewrites of a bf16 model's plain ``nn.Linear`` layers (inference only, no autograd):

- **packed**: oneDNN reorders each weight into its blocked layout once, rather than on every call (a third less
  time in the linear layers);
- **stacked siblings**: projections that always read the same input (an attention's ``q_proj``/``k_proj``/
  ``v_proj``, an MLP's ``gate_proj``/``up_proj``) become one matmul over their stacked weights.  Each keeps its
  own module, which returns its columns of the shared product, so the model's code, the LoRA wrappers and the
  module paths adapters name are unchanged.  A small decode step is mostly per-call cost: on SmolLM2's shapes
  q/k/v take 21 µs as one call against 49 µs as three, gate/up 37 against 51, about 1.3 ms of a 17 ms step
  over 30 layers.  Each output column is the same dot product over the same row either way, so the bits are
  the same (checked by ``tests/engine/local/test_linears.py``).

A sibling's call computes the stacked product when its input is not the tensor the group last computed it for
(or when this sibling already took its slice of it), and hands out the slice; the group drops the input and the
product once every sibling has taken its slice.  A model that gave two siblings different inputs would still get
the right answers, one stacked product each.  (Inference tensors keep no version counter, so an input changed
in place between two siblings' calls would go unseen; the decoders this targets never do that.)

Where the compiled linear kernel runs (``linear_kernel.py``: a CPU with AVX512-BF16 and no AMX), both hold its
layout of the weight instead of oneDNN's and call it for every row count (oneDNN took 1.2-1.6x as long at a
decode step's rows, the same within a few percent at a prompt's).  Its bits are its own (one float32 sum in order
per output), so a model rewritten with it gives logits close to the model's own, not equal; rows still never
affect each other.
"""

from __future__ import annotations

import torch

from inhouse.engine.local.linear_kernel import LinearKernel

__all__ = ["SIBLINGS", "fast_linears"]

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # names transformers' decoders share


def fast_linears(model: torch.nn.Module, kernel: LinearKernel | None = None) -> None:
    """Stack ``model``'s sibling projections, then pack every other plain bf16 ``nn.Linear`` (idempotent); for
    ``kernel`` where it takes the weight, else for oneDNN."""
    for parent in list(model.modules()):
        for names in SIBLINGS:
            parts = [getattr(parent, name, None) for name in names]
            if _stackable(parts):
                group = _Stacked(parts, kernel)  # type: ignore[arg-type]
                for index, name in enumerate(names):
                    setattr(parent, name, _Sibling(group, index))
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if _plain_bf16(child):
                setattr(parent, name, _Packed(child, kernel))  # type: ignore[arg-type]


def _plain_bf16(module: object) -> bool:
    return type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16


def _stackable(parts: list[object]) -> bool:
    """Plain bf16 linears over the same input size, all with a bias or none."""
    if not all(_plain_bf16(p) for p in parts):
        return False
    linears: list[torch.nn.Linear] = parts  # type: ignore[assignment]
    return (len({p.in_features for p in linears}) == 1
            and len({p.bias is None for p in linears}) == 1
            and len({p.weight.device for p in linears}) == 1)


class _Weight:
    """A weight laid out once for whoever multiplies by it: the compiled kernel where it takes it, else oneDNN."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: LinearKernel | None) -> None:
        self.kernel = kernel if kernel is not None and kernel.takes(weight) else None
        if self.kernel is not None:
            self.packed = self.kernel.pack(weight)
            self.bias = None if bias is None else bias.detach().float()  # the kernel adds it in float32
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.forward(x, self.packed, self.bias)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return out


class _Packed(torch.nn.Module):
    """A bf16 ``nn.Linear`` whose weight was laid out once (for the kernel or oneDNN) rather than on every call."""

    def __init__(self, linear: torch.nn.Linear, kernel: LinearKernel | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.matmul = _Weight(linear.weight.detach(), linear.bias, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class _Stacked:
    """Sibling linears' weights stacked and packed, and the last input's product until each sibling took its part."""

    def __init__(self, parts: list[torch.nn.Linear], kernel: LinearKernel | None = None) -> None:
        biases = [p.bias for p in parts]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases if b is not None])
        self.matmul = _Weight(torch.cat([p.weight.detach() for p in parts]), bias, kernel)
        self.in_features = parts[0].in_features
        self.widths = [p.out_features for p in parts]
        self.starts = [sum(self.widths[:i]) for i in range(len(parts))]
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._taken: set[int] = set()

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Sibling ``index``'s output for ``x``: its columns of the stacked product (a view)."""
        if self._output is None or x is not self._input or index in self._taken:
            self._input, self._taken = x, set()
            self._output = self.matmul(x)
        out = self._output[..., self.starts[index] : self.starts[index] + self.widths[index]]
        self._taken.add(index)
        if len(self._taken) == len(self.widths):
            self._input = self._output = None
        return out


class _Sibling(torch.nn.Module):
    """One of a ``_Stacked`` group's linears, as the model and the LoRA wrappers see it."""

    def __init__(self, group: _Stacked, index: int) -> None:
        super().__init__()
        self.group, self.index = group, index
        self.in_features, self.out_features = group.in_features, group.widths[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.part(self.index, x)
