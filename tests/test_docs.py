"""The docs cannot go stale: every error message the troubleshooting page lists still exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
SHORTEST = 6
"""Fragments shorter than this ('s', ' of ') say nothing about where a message comes from."""


def _string_texts(path: Path) -> list[str]:
    """Every string literal of a Python file, each replacement field (f-string or format) as a NUL."""
    texts, parts = [], set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.JoinedStr):
            texts.append("".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values))
            parts.update(id(v) for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
            texts.append(re.sub(r"\{[^{}]*\}", "\0", node.value))  # str.format templates, as click's
    return texts


def _messages(markdown: str) -> list[tuple[str, str]]:
    """(section, message template) for the first cell of every table row."""
    found, section = [], ""
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("| `"):
            cell = line.split(" | ")[0][2:]
            found += [(section, m) for m in re.findall(r"`([^`]+)`", cell)]
    return found


def _fragments(template: str) -> list[str]:
    """The literal pieces of a template: between placeholders (<file>), ellipses and alternatives.

    A piece glued to a placeholder (``<out>.state: no training state``) loses its
    glued word, which is part of the name the placeholder stands for.
    """
    pieces = re.split(r"(<[^<>]*>|\.\.\.|…)", template)
    found = []
    for i in range(0, len(pieces), 2):
        piece = pieces[i]
        if i > 0 and pieces[i - 1].startswith("<") and piece[:1].isalnum() or piece[:1] == ".":
            piece = piece.partition(" ")[2]
        if i + 1 < len(pieces) and pieces[i + 1].startswith("<") and piece[-1:].isalnum():
            piece = piece.rpartition(" ")[0]
        piece = piece.strip(" '\"()[]:,.")
        if len(piece) >= SHORTEST:
            found.append(piece)
    return found


def _composed_of(fragment: str, texts: list[str]) -> bool:
    """Whether the fragment is one literal piece of the code's strings, or is composed of them.

    Messages are composed (``f"{a} and {b} overlap: both hold {what}"`` with
    ``what = f"tensor {name!r}"``) and hold values (caps, lists of choices), so
    a fragment may span several literals: the end of one, then whole ones or
    values (a constant such as ``head`` of a list of choices, or a chunk
    without letters: numbers, punctuation), then the start of another.
    """
    pieces = {p for t in texts for p in t.split("\0") if p}
    joined = "\1" + "\1".join(pieces) + "\1"  # one substring search instead of one per piece
    constants = {t for t in texts if "\0" not in t}
    if fragment in joined:
        return True
    n = len(fragment)

    def known(chunk: str, first: bool, last: bool) -> bool:
        bare = chunk.strip(" ,'\"[]()")
        if not re.search(r"[A-Za-z]", chunk) or bare in constants or bare.strip("./-") in constants:
            return True
        return ("" if first else "\1") + chunk + ("" if last else "\1") in joined

    reach = [True] + [False] * n
    for start in range(n):
        if reach[start]:
            for end in range(start + 1, n + 1):
                if not reach[end] and known(fragment[start:end], start == 0, end == n):
                    reach[end] = True
    return reach[n]


def test_every_troubleshooting_message_occurs_in_the_code():
    sources = list((ROOT / "slotsmith").rglob("*.py"))
    code = [t for p in sources for t in _string_texts(p)]
    # Usage errors (exit 2) are click's own messages.
    click_code = [t for p in Path(click.__file__).parent.rglob("*.py") for t in _string_texts(p)]
    messages = _messages(TROUBLESHOOTING.read_text(encoding="utf-8"))
    assert len(messages) > 100, "the page's tables were not found"
    stale = []
    for section, message in messages:
        haystack = click_code + code if section.startswith("Usage errors") else code
        for fragment in _fragments(message):
            if not _composed_of(fragment, haystack):
                stale.append(f"{section}: {fragment!r} (from {message!r})")
    assert not stale, "messages in docs/troubleshooting.md no longer in the code:\n" + "\n".join(stale)


@pytest.mark.parametrize("doc", sorted(p.name for p in (ROOT / "docs").glob("*.md")) + ["../README.md"])
def test_links_between_docs_resolve(doc):
    path = (ROOT / "docs" / doc).resolve()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
        assert (path.parent / target).exists(), f"{doc}: link to missing {target}"
