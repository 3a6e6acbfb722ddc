"""The auditors' list of requirement IDs (docs/auditors.md) with an end-to-end test is the tests' own tags (issue 21
item 15): every ID an e2e test names on its `def` line is listed, nothing else is, and every
ID is one of ../shared/spec/REQUIREMENTS.md. Like the refusal-code table, a claim that cannot
drift from what is tested."""
from __future__ import annotations

import re

from conftest import ROOT

ID = re.compile(r"\b([A-Z]+-\d+)\b")


def spec_ids() -> set[str]:
    text = (ROOT.parent / "shared/spec/REQUIREMENTS.md").read_text()
    return set(re.findall(r"^\| ([A-Z]+-\d+) \|", text, re.M))


def tagged_ids() -> dict[str, list[str]]:
    tagged: dict[str, list[str]] = {}
    for f in sorted((ROOT / "tests").glob("test_*.py")):
        for m in re.finditer(r"^def (test_\w+)\(.*?\):[ \t]*#([^\n]*)", f.read_text(), re.M):
            for i in ID.findall(m.group(2)):
                tagged.setdefault(i, []).append(f"{f.name}::{m.group(1)}")
    return tagged


def listed_ids() -> tuple[set[str], set[str]]:
    text = (ROOT / "docs/auditors.md").read_text()
    start = text.index("Requirement IDs with an end-to-end test")
    end = text.find("\n\n", start)
    para = text[start:] if end < 0 else text[start:end]
    covered, _, missing = para.partition("Not yet:")
    return set(ID.findall(covered)), set(ID.findall(missing))


def test_auditors_doc_lists_exactly_the_ids_the_tests_assert():
    spec = spec_ids()
    tagged = tagged_ids()
    assert set(tagged) <= spec, f"tests name IDs the standard does not have: {set(tagged) - spec}"
    covered, missing = listed_ids()
    assert covered == set(tagged), (f"docs/auditors.md lists untested IDs {covered - set(tagged)}; "
                                    f"tested but not listed: {set(tagged) - covered}")
    assert missing == spec - set(tagged), f"docs/auditors.md's 'not yet' is off by {missing ^ (spec - set(tagged))}"
