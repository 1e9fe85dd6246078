"""How big a checkpoint's weights are in memory, read from file headers without loading a tensor.

Owns the parameter count of a checkpoint (safetensors headers, a GGUF file's tensor table) and the estimate
``parameters × bytes per parameter`` of the dtype it would load in; a format it cannot read (``.bin``,
``.pt``) counts its file size.  ``inhouse doctor`` sets this against the free memory.  Holds no state.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

__all__ = ["parameter_count", "weights_in_memory"]

_OTHER_WEIGHTS = (".bin", ".pt", ".pth")


def _safetensors_parameters(file: Path) -> int:
    with file.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100 * 1024 * 1024:
            raise ValueError(f"{file}: not a safetensors file (header of {size} bytes)")
        header = json.loads(f.read(size))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def _gguf_parameters(file: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(str(file))
    return sum(math.prod(int(x) for x in t.shape) for t in reader.tensors)


def parameter_count(source: Path) -> tuple[int, int]:
    """(parameters read from headers, bytes of weight files whose headers cannot be read) of a checkpoint
    directory or a .gguf / .safetensors file.  ValueError when a file is not what its name says."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    parameters = other = 0
    for file in files:
        try:
            if file.suffix == ".safetensors":
                parameters += _safetensors_parameters(file)
            elif file.suffix == ".gguf":
                parameters += _gguf_parameters(file)
            elif file.suffix in _OTHER_WEIGHTS:
                other += file.stat().st_size
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
            raise ValueError(f"{file} cannot be read as {file.suffix[1:]}: {exc}") from None
    return parameters, other


def weights_in_memory(source: Path, bytes_per_parameter: int) -> int:
    """Bytes the checkpoint's weights take once loaded in a dtype of ``bytes_per_parameter``."""
    parameters, other = parameter_count(source)
    return parameters * bytes_per_parameter + other
