"""The docs: the generated params page is current, the README stays short and starts with its two
commands, and every link of the README, CONTRIBUTING.md and docs/ stays inside the repository."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from gpu_training.docs import params_markdown

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_FILES = sorted([README, REPO / "CONTRIBUTING.md", *(REPO / "docs").glob("*.md")])
README_MAX_LINES = 160

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_AUTOLINK = re.compile(r"<((?:https?|ftp|mailto):[^>\s]+)>")
_BARE_URL = re.compile(r"\b(?:https?|ftp)://[^\s)>\]`'\"]+")
_LOCAL_HOSTS = {"localhost", "127.0.0.1"}


def prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans: what a renderer turns into links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    return _LINK.findall(prose(text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces as '-',
    a repeated heading suffixed -1, -2 ..."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in _FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match[1]).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def test_params_page_is_what_make_docs_generates() -> None:
    committed = (REPO / "docs" / "params.md").read_text()
    assert committed == params_markdown(), (
        "docs/params.md differs from PARAM_SPECS (plugins/gpu_training/params.py): run `make docs` "
        "(python -m gpu_training.docs params --output docs/params.md) and commit it"
    )


def test_the_readme_is_short_and_starts_with_its_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move detail into docs/"
    body = [line for line in lines[1:] if line.strip()]
    assert lines[0].startswith("# ") and body[0].startswith("```"), "the README opens with its set-up commands"
    assert body[1].startswith("make demo ") and body[2].startswith("make test "), body[:3]
    assert body[3] == "```"
    assert "fresh Debian machine with Python 3.11 and nothing else" in README.read_text()


def test_the_readme_links_nowhere_outside_the_repository() -> None:
    text = prose(README.read_text())
    outside = [target for target in links(README.read_text()) if urlsplit(target).scheme]
    outside += _AUTOLINK.findall(text)
    outside += [url for url in _BARE_URL.findall(text) if urlsplit(url).hostname not in _LOCAL_HOSTS]
    assert outside == [], f"README.md links outside the repository: {outside}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_into_the_repository(doc: Path) -> None:
    broken = []
    for target in links(doc.read_text()):
        parts = urlsplit(target)
        if parts.scheme:
            continue  # an address elsewhere: only the README must have none
        path = (doc.parent / unquote(parts.path)).resolve() if parts.path else doc
        if not path.is_relative_to(REPO) or not path.exists():
            broken.append(f"{target}: no such file in the repository")
        elif parts.fragment and path.suffix == ".md" and parts.fragment not in anchors(path):
            broken.append(f"{target}: no heading #{parts.fragment} in {path.relative_to(REPO)}")
    assert broken == [], f"{doc.relative_to(REPO)}: {broken}"
