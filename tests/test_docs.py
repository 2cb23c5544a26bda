"""docs/: every citation `docs/<note>.md, "<section>"` in the code, recipes and tests names a note and a section
that exist."""

import re

from tests.conftest import REPO

CITATION = re.compile(r'docs/(\w+)\.md,\s+((?:"[^"]+"(?:,\s*)?)+)')


def test_every_cited_section_exists():
    headings = {
        note.stem: {line[3:].strip() for line in note.read_text(encoding="utf-8").splitlines() if line.startswith("## ")}
        for note in (REPO / "docs").glob("*.md")
    }
    cited = []
    for folder in ("dsv3", "flows", "benchmarks", "recipes", "tests"):
        for file in (REPO / folder).rglob("*"):
            if file.suffix in (".py", ".yaml") and file.name != "test_docs.py":
                for note, sections in CITATION.findall(file.read_text(encoding="utf-8")):
                    cited += [(file.name, note, s) for s in re.findall(r'"([^"]+)"', sections)]
    assert len(cited) > 40
    assert [c for c in cited if c[2] not in headings.get(c[1], ())] == []
