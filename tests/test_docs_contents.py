"""The contents list the scripts keep at the top of a generated docs file (scripts/report.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from report import heading_anchors, with_contents  # noqa: E402

_LINK = re.compile(r"^- \[(?P<title>.+)\]\(#(?P<anchor>[^)]+)\) \(`(?P<name>[^`]+)`\)$", re.M)


def _section(name: str, title: str, body: str = "text") -> str:
    return f"<!-- BEGIN {name} -->\n## {title}\n\n{body}\n<!-- END {name} -->\n"


@pytest.mark.parametrize("name", ["results.md", "benchmarks.md"])
def test_a_generated_file_lists_every_section_with_a_link_that_resolves(name: str) -> None:
    text = (ROOT / "docs" / name).read_text()
    assert with_contents(text) == text, f"docs/{name}: contents not current; rerun with_contents"
    links = _LINK.findall(text)
    sections = re.findall(r"^<!-- BEGIN (\S+) -->\n## ", text, re.M)
    assert [link[2] for link in links] == sections
    anchors = {anchor for _line, anchor in heading_anchors(text)}
    assert all(link[1] in anchors for link in links)


def test_repeated_titles_link_to_their_own_heading_and_fences_hold_no_heading() -> None:
    text = "# doc\n\n" + "".join(
        [
            _section("a", "Edits, run (`scripts/x.py`)", "```bash\n# not a heading\n```"),
            "## Notes\n\n",
            _section("b", "Edits, run (`scripts/x.py`)"),
            _section("c", "heretic 1.4 beside steer"),
        ]
    )
    made = with_contents(text)
    assert _LINK.findall(made) == [
        ("Edits, run (`scripts/x.py`)", "edits-run-scriptsxpy", "a"),
        ("Edits, run (`scripts/x.py`)", "edits-run-scriptsxpy-1", "b"),
        ("heretic 1.4 beside steer", "heretic-14-beside-steer", "c"),
    ]
    assert [anchor for _line, anchor in heading_anchors(made)] == [
        "doc",
        "edits-run-scriptsxpy",
        "notes",
        "edits-run-scriptsxpy-1",
        "heretic-14-beside-steer",
    ]
    assert with_contents(made) == made
    assert made.startswith("# doc\n\n<!-- BEGIN contents -->\n")
    assert made.endswith(text.removeprefix("# doc\n\n"))


def test_a_file_with_few_sections_gets_no_contents_and_loses_a_stale_one() -> None:
    text = "# doc\n\n" + _section("a", "One") + _section("b", "Two")
    assert with_contents(text) == text
    three = text + _section("c", "Three")
    listed = with_contents(three)
    assert "<!-- BEGIN contents -->" in listed
    shrunk = listed.replace(_section("c", "Three"), "")
    assert with_contents(shrunk) == text
