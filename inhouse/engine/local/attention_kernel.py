"""The compiled attention kernels for CPUs with AVX512-BF16: building them, loading them, calling them.

Owns ``AttentionKernel``: ``prefill`` (a long prompt's causal attention over its slot) and ``decode`` (a decode
step's rows of one tier, each over its own slot's positions).  The C source beside this file
(``attention_kernel.c``, which says how each computes) is compiled on this machine the first time a model loads
(``compiled.py``) and loaded with ``ctypes``.

``PackedPrompt`` keeps a prompt's keys and values in the prefill kernel's layout between its chunks, so that each
chunk packs only its own: at 2,000-3,000 tokens in, packing every earlier key again was about half of a 16-token
chunk's attention (7.7-9.4 ms of 15.5-22.2 over SmolLM2's 30 layers).

``AttentionKernel.load`` returns None, with the reason, when the kernels cannot run here: not Linux on x86-64, a
CPU without AVX512-BF16, no C compiler (``cc``), or a failed build.  The engine then runs its PyTorch attention
(``attention._in_blocks`` for prompts, ``attention._decode`` for decode rows) instead, which computes the same
thing more slowly.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from inhouse.engine.local.compiled import load

__all__ = ["AttentionKernel", "PackedLayer", "PackedPrompt"]

_SOURCE = Path(__file__).with_suffix(".c")
_LONG, _INT = ctypes.c_long, ctypes.c_int
_MOST_THREADS = 256  # the C file's MAX_THREADS


@dataclass(slots=True)
class PackedLayer:
    """One layer's packed keys and values of a prompt: ``head`` elements per kv head in each, the first ``done``
    keys packed."""

    keys: torch.Tensor
    values: torch.Tensor
    head: int
    done: int = 0


class PackedPrompt:
    """A prompt's keys and values in ``AttentionKernel.prefill``'s layout, layer by layer (each made at its first
    use), kept between the prompt's chunks: as many bytes as its slot's keys and values."""

    def __init__(self, length: int, kv_heads: int, head_dim: int) -> None:
        self.kv_heads = kv_heads
        self.head = -(-length // 64) * 64 * head_dim  # elements per kv head: the prompt's keys rounded up to 64
        self._layers: dict[int, PackedLayer] = {}

    @staticmethod
    def nbytes(length: int, kv_heads: int, head_dim: int, layers: int) -> int:
        return 2 * kv_heads * (-(-length // 64) * 64 * head_dim) * 2 * layers

    def layer(self, index: int) -> PackedLayer:
        kept = self._layers.get(index)
        if kept is None:
            keys, values = (torch.empty(self.kv_heads * self.head, dtype=torch.bfloat16) for _ in range(2))
            kept = self._layers[index] = PackedLayer(keys, values, self.head)
        return kept


class AttentionKernel:
    """bf16 attention over slots of the KV cache, for a prompt's new tokens or for decode rows (see the C source)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._run = library.prefill_attention
        self._run.restype = _INT
        self._run.argtypes = [ctypes.c_void_p, _LONG, _LONG, ctypes.c_void_p, ctypes.c_void_p, _LONG, _LONG,
                              ctypes.c_void_p, _LONG, _LONG, _INT, _INT, _INT, _INT, _INT, ctypes.c_float, _INT,
                              ctypes.c_void_p, _LONG, ctypes.c_void_p, ctypes.c_void_p, _LONG, _INT]
        self._scratch_bytes = library.prefill_scratch_bytes
        self._scratch_bytes.restype = _LONG
        self._scratch_bytes.argtypes = [_INT, _INT, _INT, _INT]
        self._decode = library.decode_attention
        self._decode.restype = _INT
        self._decode.argtypes = [ctypes.c_void_p, _LONG, _LONG, ctypes.c_void_p, ctypes.c_void_p, _LONG, _LONG, _LONG,
                                 ctypes.c_void_p, _LONG, _LONG, ctypes.c_void_p, _INT, _INT, _INT, _INT, _INT,
                                 ctypes.c_float, _INT, ctypes.c_void_p, _LONG]
        self._decode_scratch_bytes = library.decode_scratch_bytes
        self._decode_scratch_bytes.restype = _LONG
        self._decode_scratch_bytes.argtypes = [_INT, _INT, _INT, _INT]
        self._scratch = torch.empty(0, dtype=torch.uint8)

    @classmethod
    def load(cls, compiler: str | None = None) -> tuple[AttentionKernel | None, str]:
        """The kernel, built if needed (by ``compiler``, default ``cc``), or None and why it cannot run here."""
        library, why = load(_SOURCE, "attention", compiler)
        return (cls(library) if library is not None else None), why

    @staticmethod
    def takes(query: torch.Tensor, keys: torch.Tensor) -> bool:
        """Whether ``prefill`` computes this attention (else the caller runs PyTorch's): ``[heads, length,
        head_dim]`` queries over ``[kv_heads, keys, head_dim]`` keys (see ``_computes``)."""
        return _computes(query, keys, query.shape[0], keys.shape[0])

    @staticmethod
    def takes_decode(query: torch.Tensor, keys: torch.Tensor) -> bool:
        """Whether ``decode`` computes these rows: ``[rows, heads, 1, head_dim]`` queries over ``[rows, kv_heads,
        capacity, head_dim]`` keys (see ``_computes``), at most 16 query heads per kv head (the C file's
        MAX_GROUP)."""
        return _computes(query, keys, query.shape[1], keys.shape[1]) and query.shape[1] // keys.shape[1] <= 16

    def prefill(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offset: int, scale: float,
                out: torch.Tensor, kept: PackedLayer | None = None) -> None:
        """``query`` ``[heads, length, head_dim]`` (positions ``offset..``) over ``keys`` and ``values``
        ``[kv_heads, ≥ offset + length, head_dim]`` into ``out`` ``[length, heads, head_dim]``; any strides with
        the head dimension contiguous.  With ``kept`` (the prompt's packed keys and values from its earlier
        chunks, ``PackedPrompt.layer``), only the keys it does not hold yet are packed, into it."""
        heads, length, dim = query.shape
        kv_heads = keys.shape[0]
        if not (query.stride(2) == keys.stride(2) == values.stride(2) == out.stride(2) == 1
                and keys.stride() == values.stride() and out.shape == (length, heads, dim)
                and keys.shape[1] >= offset + length and values.shape == keys.shape):
            raise ValueError("prefill kernel: unexpected tensor layout")
        threads = min(torch.get_num_threads(), _MOST_THREADS)
        need = self._scratch_bytes(kv_heads, offset + length, dim, threads)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.uint8)
        packed = (kept.keys.data_ptr(), kept.values.data_ptr(), kept.head, min(kept.done, offset)) if kept else (
            None, None, 0, 0)
        status = self._run(query.data_ptr(), query.stride(0), query.stride(1), keys.data_ptr(), values.data_ptr(),
                           keys.stride(0), keys.stride(1), out.data_ptr(), out.stride(1), out.stride(0),
                           heads, kv_heads, length, offset, dim, scale, threads,
                           self._scratch.data_ptr(), self._scratch.numel(), *packed)
        if status != 0:
            raise ValueError("prefill kernel: arguments refused")
        if kept is not None:
            kept.done = offset + length

    def decode(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float,
               out: torch.Tensor) -> None:
        """Decode rows: ``query`` ``[rows, heads, 1, head_dim]`` (row i: slot i's next token) over the first
        ``lengths[i]`` positions of slot i of ``keys`` and ``values`` ``[≥ rows, kv_heads, capacity, head_dim]``
        (a tier's tensors for one layer, the new tokens' keys and values already written), into ``out``
        ``[rows, 1, heads, head_dim]``.  ``lengths``: int32 on CPU, each in ``1..capacity``."""
        rows, heads, _, dim = query.shape
        kv_heads, capacity = keys.shape[1], keys.shape[2]
        if not (query.stride(3) == keys.stride(3) == out.stride(3) == 1 and keys.stride() == values.stride()
                and keys.shape == values.shape and keys.shape[0] >= rows and out.shape == (rows, 1, heads, dim)
                and lengths.dtype == torch.int32 and lengths.is_contiguous() and lengths.shape == (rows,)):
            raise ValueError("decode kernel: unexpected tensor layout")
        threads = min(torch.get_num_threads(), _MOST_THREADS)
        need = self._decode_scratch_bytes(heads, kv_heads, capacity, threads)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.uint8)
        status = self._decode(query.data_ptr(), query.stride(0), query.stride(1), keys.data_ptr(), values.data_ptr(),
                              keys.stride(0), keys.stride(1), keys.stride(2), out.data_ptr(), out.stride(0),
                              out.stride(2), lengths.data_ptr(), rows, heads, kv_heads, dim, capacity, scale, threads,
                              self._scratch.data_ptr(), self._scratch.numel())
        if status != 0:
            raise ValueError("decode kernel: arguments refused")


def _computes(query: torch.Tensor, keys: torch.Tensor, heads: int, kv_heads: int) -> bool:
    """What both kernels take: bf16 on CPU, a head size that is a multiple of 64 up to 256, whole query groups per
    kv head."""
    return (query.dtype == keys.dtype == torch.bfloat16 and query.device.type == keys.device.type == "cpu"
            and query.shape[-1] % 64 == 0 and query.shape[-1] <= 256 and heads % kv_heads == 0)
