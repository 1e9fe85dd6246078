"""Every relative link and image in README*.md and docs/**/*.md points at a file that exists."""

from __future__ import annotations

from pathlib import Path

from tests.docs.markdown import links, pages
from tests.process import REPO


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in pages():
        for link in links(page):
            target = (page.parent / link.target.split("#", 1)[0]).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(REPO)}:{link.line}: {link.target}")
    assert broken == []


def test_the_checker_sees_links_and_skips_code(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("See [a](a.md#x), ![shot](img/s.png) and <img src=\"b.png\">, [web](https://x.org), [top](#t).\n"
                    "`[not](code.md)`\n```md\n[nor](fenced.md)\n```\n", encoding="utf-8")
    assert [link.target for link in links(page)] == ["a.md#x", "img/s.png", "b.png"]

