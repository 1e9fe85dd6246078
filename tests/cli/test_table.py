"""``render_table``: columns padded to their widest cell, numbers right-aligned, None as a dash."""

from __future__ import annotations

from inhouse.cli.table import render_table


def test_columns_align_and_numbers_go_right() -> None:
    out = render_table(["NAME", "TOK/S", "NOTE"], [["a", 12.345, None], ["longer", 3, "x"]])
    assert out.splitlines() == [
        "NAME    TOK/S  NOTE",
        "a        12.3  -",
        "longer      3  x",
    ]
