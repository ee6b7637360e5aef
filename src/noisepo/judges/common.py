"""What every judge module shares: the item types, the model-folder fingerprint, failure reasons.

Its own module so that the scorer modules and the registry (`base.py`) import it and never each
other: judges/ has no import circle (tests/judges/test_imports.py checks it).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

Item = tuple[str, str]  # (prompt, response): what a pointwise scorer judges
PairItem = tuple[str, str, str]  # (prompt, response_a, response_b): what a pairwise judge compares

UNPARSABLE = "unparsable"  # a reply that is not the bare answer asked for (a failure reason)


def fingerprint(path: str | None) -> str:
    """A short hash of a local model folder's file names, sizes and modification times, so that
    cached scores of old weights are not reused after the folder is overwritten; hub names are
    used as they are."""
    folder = Path(path) if path else None
    if folder is None or not folder.is_dir():
        return "-"
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16]
