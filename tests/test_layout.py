"""The test suite's own layout (issue 22): a test module imports helpers from `conftest` or
`helpers`, never from another test module (importing one runs its module-level set-up and
ties the two files' fixtures together)."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_another():
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(from\s+test_\w+\s+import|import\s+test_\w+)", line):
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert not found, "move the helper into tests/helpers.py:\n" + "\n".join(found)


def test_every_relative_link_in_the_docs_resolves():
    """README and docs/ link each other and the repository's files by relative paths; a moved
    file or section must not leave a dead link behind."""
    root = TESTS.parent
    dead = []
    for doc in [root / "README.md", root / "SECURITY.md", root / "BENCHMARKS.md", *sorted((root / "docs").glob("*.md"))]:
        for m in re.finditer(r"\]\(([^)#\s]+)(#[^)]*)?\)", doc.read_text()):
            target = m.group(1)
            if target.startswith(("http:", "https:", "mailto:")):
                continue
            if not (doc.parent / target).exists():
                dead.append(f"{doc.relative_to(root)}: {target}")
    assert not dead, "dead links:\n" + "\n".join(dead)
