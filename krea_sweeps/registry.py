"""The registry of named hooks (diffusers' `HookRegistry` idea): what is attached now, by name. The session holds
one; `interventions.hooks.attach` enters each hook it installs. Plain data at the bottom of the package, so the
session does not import the interventions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator


@dataclass(frozen=True)
class AttachedOp:
    name: str
    key: str
    site: str
    op: str


@dataclass
class HookRegistry:
    """What is attached now, by name (diffusers' `HookRegistry` idea): the session's is listed by
    `Session.attached()`; each entry leaves when its `attach` scope exits, whatever happens inside."""

    entries: dict[str, AttachedOp] = field(default_factory=dict)

    @contextmanager
    def named(self, key: str, site: str, op: str, index: int | None = None) -> Iterator[AttachedOp]:
        base = f"{key}: {op} @ {site}" + ("" if index is None else f"[{index}]")
        name, n = base, 1
        while name in self.entries:
            n += 1
            name = f"{base} #{n}"
        entry = self.entries[name] = AttachedOp(name, key, site, op)
        try:
            yield entry
        finally:
            self.entries.pop(name, None)

    def names(self) -> list[str]:
        return list(self.entries)
