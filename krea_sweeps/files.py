"""Writes that are all-or-nothing: a reader (a resumed sweep, `collect`, another job) never sees half a file."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (same suffix, so writers that infer the format still can) and move it into
    place only if the body succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
