"""Plain-text tables for the CLI's terminal output (``--json`` is the scripts' format).

Owns column alignment only: left-aligned text, right-aligned numbers, two spaces between columns.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["render_table"]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """``headers`` over ``rows``; numbers align right, the rest left."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows if
                   row[i] is not None) and any(row[i] is not None for row in rows) for i in range(len(headers))]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric,
                                                                                 strict=True)).rstrip()

    return "\n".join([line(headers), *(line(r) for r in cells)])
