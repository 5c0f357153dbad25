"""The package's one user-facing exception type."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AccelerationConfigError(ValueError):
    """A problem with an acceleration configuration, a plugin combination or the environment.

    Always raised before any model is loaded. The message names the full config key path (when there is
    one), what is wrong, and how to fix it.

    Attributes:
        path: dotted key path of the offending entry, e.g. ``plugins.peft.quantization.bitsandbytes.quant_type``
            (``None`` when the problem is not tied to one key).
        problem: what is wrong.
        fix: how to fix it (may be empty).
    """

    def __init__(self, problem: str, *, path: str | None = None, fix: str = "") -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        where = f"[{path}] " if path else ""
        message = f"{where}{problem}"
        if fix:
            message = f"{message}\n  fix: {fix}"
        super().__init__(message)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" Did you mean {matches[0]!r}?" if matches else ""


def join_path(*parts: str) -> str:
    """Join non-empty dotted key-path parts."""
    return ".".join(p for p in parts if p)
