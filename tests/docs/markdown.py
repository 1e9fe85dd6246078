"""Reads the project's Markdown: which pages there are, their relative links, and their runnable code blocks.

A fenced block is runnable when its info string says so: ```` ```bash runnable ```` or
```` ```python runnable expect="Paris" ```` (``expect`` may repeat: each text must appear in the output).
Renderers take the first word as the language and ignore the rest.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from tests.process import REPO

__all__ = ["Block", "Link", "links", "pages", "runnable_blocks"]

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>.*)$")
_LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HTML = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"(?P<target>[^\"]+)\"")
_INLINE_CODE = re.compile(r"`[^`]*`")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    expect: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


@dataclass(frozen=True)
class Link:
    path: Path
    line: int
    target: str


def pages(root: Path = REPO) -> list[Path]:
    """README.md, README.zh-CN.md and every page under docs/."""
    return sorted([*root.glob("README*.md"), *root.glob("docs/**/*.md")])


def _blocks(path: Path) -> list[tuple[int, str, list[str]]]:
    """(opening line, info string, lines) of every fenced block."""
    out: list[tuple[int, str, list[str]]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, start, body = m["fence"], i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(m["indent"]):])
            i += 1
        out.append((start + 1, m["info"].strip(), body))
        i += 1
    return out


def runnable_blocks(path: Path) -> list[Block]:
    found = []
    for line, info, body in _blocks(path):
        words = shlex.split(info) if info else []
        if "runnable" not in words[1:]:
            continue
        expect = tuple(w.removeprefix("expect=") for w in words if w.startswith("expect="))
        found.append(Block(path, line, words[0], "\n".join(body) + "\n", expect))
    return found


def links(path: Path) -> list[Link]:
    """Relative links and image sources outside code (http(s), mailto and pure #anchors left out)."""
    fenced = {n for line, _, body in _blocks(path) for n in range(line, line + len(body) + 2)}
    found = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if n in fenced:
            continue
        text = _INLINE_CODE.sub("", text)
        for m in [*_LINK.finditer(text), *_HTML.finditer(text)]:
            target = m["target"]
            if not re.match(r"^(?:[a-z]+:|#)", target):
                found.append(Link(path, n, target))
    return found
