"""The compiled linear layer for CPUs with AVX512-BF16 and no AMX: building it, loading it, calling it.

Owns ``LinearKernel``: ``pack`` lays a bf16 weight out once for it, ``forward`` computes ``x @ Wᵀ + bias`` from that
layout (the C source beside this file, ``linear_kernel.c``, says how).  On such a CPU a decode step's linear
layers are mostly the time it takes to read their weights, and oneDNN's brgemm read them 1.2-1.6x slower for the
1-16 rows of a decode step (SmolLM2's shapes, this project's 2-core machines); at a prompt's hundreds or thousands
of rows both run at the same rate, within a few percent.  So where it runs it computes every row count, and the
model keeps one copy of each weight (``linears.py``).  Each output is one float32 sum in order, rounded once: a
row's bits do not depend on the rows beside it (oneDNN's do not either on such a CPU, but they are not these
bits).

``LinearKernel.load`` returns None, with the reason, when it should not or cannot run: not Linux on x86-64, a CPU
without AVX512-BF16, one with AMX (oneDNN's AMX matmuls are 8-10x faster there at a prompt's rows), no C compiler,
or a failed build.  Then the layers run oneDNN (``linears._Packed``).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from inhouse.engine.cpu import cpu_has
from inhouse.engine.local.compiled import load

__all__ = ["LinearKernel"]

_SOURCE = Path(__file__).with_suffix(".c")
_COLS = 32  # the C file's COLS: output columns a block computes
_LONG, _INT, _PTR = ctypes.c_long, ctypes.c_int, ctypes.c_void_p


class LinearKernel:
    """bf16 ``x @ Wᵀ + bias`` over weights laid out by ``pack`` (see the C source)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._pack = library.linear_pack
        self._pack.restype = None
        self._pack.argtypes = [_PTR, _LONG, _LONG, _PTR]
        self._forward = library.linear_forward
        self._forward.restype = _INT
        self._forward.argtypes = [_PTR, _LONG, _LONG, _LONG, _PTR, _LONG, _PTR, _PTR, _LONG, _INT]

    @classmethod
    def load(cls, compiler: str | None = None) -> tuple[LinearKernel | None, str]:
        """The kernel, built if needed (by ``compiler``, default ``cc``), or None and why it does not run here."""
        if cpu_has("amx_bf16"):
            return None, "the CPU has AMX, on which oneDNN's matmuls are faster"
        library, why = load(_SOURCE, "linear", compiler)
        return (cls(library) if library is not None else None), why

    @staticmethod
    def takes(weight: torch.Tensor) -> bool:
        """Whether ``pack`` lays out this weight: bf16 ``[out, in]`` on CPU, ``out`` a multiple of 32, ``in`` even."""
        return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2
                and weight.shape[0] % _COLS == 0 and weight.shape[1] % 2 == 0)

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` ``[out, in]`` laid out for ``forward``: a new bf16 tensor of the same shape (its order is the
        kernel's: not to be read as a matrix)."""
        if not self.takes(weight):
            raise ValueError("linear kernel: a weight it does not take")
        plain = weight.detach().contiguous()
        packed = torch.empty_like(plain)
        self._pack(plain.data_ptr(), plain.shape[0], plain.shape[1], packed.data_ptr())
        return packed

    def forward(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``[..., in]`` bf16 times the weight ``packed`` holds, plus ``bias`` (float32 ``[out]``, or None):
        ``[..., out]`` bf16."""
        out_features, in_features = packed.shape
        if x.dtype != torch.bfloat16 or x.shape[-1] != in_features:
            raise ValueError("linear kernel: an input it does not take")
        rows = x.reshape(-1, in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = rows.new_empty((rows.shape[0], out_features))
        if rows.shape[0]:
            status = self._forward(rows.data_ptr(), rows.stride(0), rows.shape[0], in_features, packed.data_ptr(),
                                   out_features, bias.data_ptr() if bias is not None else None, out.data_ptr(),
                                   out.stride(0), torch.get_num_threads())
            if status != 0:
                raise ValueError("linear kernel: arguments refused")
        return out.view(*x.shape[:-1], out_features)
