"""The docs cite tests as proof: every test a doc names must exist under tests/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFINED = {m for path in (ROOT / "tests").glob("test_*.py")
           for m in re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M)}


@pytest.mark.parametrize("doc", ["docs/security.md", "docs/runbook.md"])
def test_cited_tests_exist(doc: str) -> None:
    cited = set(re.findall(r"`(test_\w+)`", (ROOT / doc).read_text()))
    assert doc == "docs/runbook.md" or len(cited) > 50
    assert sorted(cited - DEFINED) == []
