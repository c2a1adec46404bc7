"""Where a benchmark's JSON goes: a file (``--out PATH``) or standard output (``--out -``)."""

from __future__ import annotations

from pathlib import Path


def save(text: str, out: str) -> Path | None:
    """Write ``text`` to ``out`` (creating its directory) and return the path; print it for ``-`` (None)."""
    if out == "-":
        print(text)
        return None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path
