"""Every relative link in the user-facing docs points at a file of the repository (a moved
result or doc must not leave the README pointing at nothing)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "benchmarks/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    text = (ROOT / doc).read_text()
    targets = [t for t in LINK.findall(text) if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in targets if not ((ROOT / doc).parent / t).exists()]
    assert missing == [], f"{doc} links to missing files: {missing}"


def test_the_link_pattern_finds_links():
    assert LINK.findall("see [JSON](results/a.json) and [b](docs/b.md#x), [w](https://x.org)") == \
        ["results/a.json", "docs/b.md", "https://x.org"]
