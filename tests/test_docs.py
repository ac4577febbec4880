"""The README and docs/ stay a usable guide: every relative link leads somewhere, the README stays short and keeps
its sections and the commands other files run from it.

Links are markdown links ``[text](target)`` outside code blocks and inline code; a target is a path relative to the
file (checked to exist in the repository) with an optional ``#anchor`` (checked against the target's headings, by
GitHub's rules: lower case, punctuation dropped, spaces to ``-``, ``-1``, ``-2`` ... for repeated headings). Web
links (``https://``, ``mailto:``) are not followed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 220
# The README's sections, in this order (a heading starts with these words).
README_SECTIONS = (
    "What it is",
    "Install and the two commands",
    "Real COCO",
    "Your own COCO-format data",
    "PicoSAM2 or PicoSAM3",
    "On a GPU",
    "Sharing with teammates",
    "Troubleshooting",
    "More",
)
# Commands other files run from the README, word for word: .ci/run (the test command) and tests/test_dvc_sharing.py.
README_COMMANDS = (
    "make test      # creates/refreshes .venv, then the fast tests: unit tests and one small end-to-end run (<= 5 min)",
    "make test-all  # creates/refreshes .venv, then every test, the slow ones too (what CI runs, via .ci/run)",
    "<!-- sharing-recipe: tests/test_dvc_sharing.py runs the commands of this block word for word -->",
)

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    text = re.sub(r"[*_]{1,2}(\S.*?)[*_]{1,2}", r"\1", text)  # emphasis
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def headings(path: Path) -> list[str]:
    """The headings of a markdown file, in order (their text)."""
    return [m.group(2) for _, line in prose_lines(path.read_text()) if (m := HEADING.match(line))]


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of ``path`` (repeats get ``-1``, ``-2``, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for text in headings(path):
        base = slug(text)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """``(line number, target)`` of every markdown link in the prose of ``path``."""
    out = []
    for number, line in prose_lines(path.read_text()):
        out.extend((number, m.group(1)) for m in LINK.finditer(without_code(line)))
    return out


def without_code(line: str) -> str:
    """``line`` with its inline code dropped (code holds no link), except a code span that is a link's text."""
    return INLINE_CODE.sub(lambda m: "x" if line[m.end() : m.end() + 1] == "]" else "", line)


def test_slug_follows_githubs_rules() -> None:
    assert slug("Sharing with teammates (DVC remote)") == "sharing-with-teammates-dvc-remote"
    assert slug("2. The GPU suite: every GPU figure in one call") == "2-the-gpu-suite-every-gpu-figure-in-one-call"
    assert slug("Without a clone: `picosam-pipeline init`") == "without-a-clone-picosam-pipeline-init"
    assert slug("Two teachers (PicoSAM3: SAM2 and SAM3)") == "two-teachers-picosam3-sam2-and-sam3"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_files_and_headings(page: Path) -> None:
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(REPO)}:{number}: {target}"
        if not dest.is_relative_to(REPO) or not dest.exists():
            broken.append(f"{where}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_short_guide_with_its_sections_in_order() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, f"README.md has {len(text.splitlines())} lines"
    found = headings(README)
    positions = []
    for section in README_SECTIONS:
        at = [i for i, h in enumerate(found) if h.startswith(section)]
        assert at, f"README.md has no section {section!r}; its headings: {found}"
        positions.append(at[0])
    assert positions == sorted(positions), f"README.md sections out of order: {found}"


def test_readme_has_no_history_and_keeps_the_commands_others_run() -> None:
    lines = README.read_text().splitlines()
    assert not [line for line in lines if "(was " in line], "the README describes the present, not what was"
    for command in README_COMMANDS:
        assert command in lines, f"README.md lost the line {command!r} (.ci/run or a test runs it)"
