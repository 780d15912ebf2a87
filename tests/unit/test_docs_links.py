"""Every relative link of the README and docs/ points at a file of the repository, and the pages hold no control
characters (a ``\\f`` or ``\\t`` written by mistake into a formula)."""

from __future__ import annotations

import re

import pytest

from helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    links = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    relative = [link.split("#")[0] for link in links if not re.match(r"[a-z]+://", link) and link.split("#")[0]]
    missing = [link for link in relative if not (page.parent / link).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_the_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert all(f"(docs/{page.name})" in readme for page in PAGES[1:])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_hold_no_control_characters(page):
    text = page.read_text()  # tabs count too: the pages indent with spaces
    lines = [text.count("\n", 0, match.start()) + 1 for match in re.finditer(r"[\x00-\x09\x0b-\x1f\x7f]", text)]
    assert not lines, f"{page.name}: control characters on lines {lines}"
