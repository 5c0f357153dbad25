"""The package's user-facing exception types and the helpers every message is built with."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_QUOTED = 200
"""Longest quoted value (characters) in a message: see :func:`quote`."""
MAX_MESSAGE = 4096
"""Longest message of an :class:`AccelerationConfigError`, problems beyond it are counted, not shown."""
_MAX_PROBLEM = 1500
_MAX_FIX = 1000
_MAX_PATH = 300

NO_PLUGINS = "No plugins could be configured. Please check the acceleration framework configuration file."
"""First sentence of :class:`NoPluginsConfiguredError` (the original framework's message, which its clients
match with ``str.startswith("No plugins could be configured")``)."""


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    # a few elements per level and a few levels: the cost is bounded even for YAML alias bombs, whose
    # expanded repr would be exponential in the number of anchors
    short.maxlevel = 3
    short.maxdict = short.maxlist = short.maxtuple = short.maxset = short.maxfrozenset = 6
    short.maxstring = short.maxother = MAX_QUOTED
    short.maxlong = 60
    return short


def truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text) - limit} more characters)"
    return text[: max(0, limit - len(note))] + note


def quote(value: object, limit: int = MAX_QUOTED) -> str:
    """A ``repr`` of ``value`` for messages, at most ``limit`` characters.

    Every value from a configuration is quoted through this function: it never expands more than a few
    elements of a few levels of a container (a 140-byte YAML file with nested aliases expands to gigabytes),
    and long strings are cut.
    """
    try:
        text = _short_repr().repr(value)
    except RecursionError:  # a self-referencing container reprlib did not catch
        text = f"<{type(value).__name__}>"
    return truncate(text, limit)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration.

    Attributes:
        path: dotted key path of the offending entry (``None`` when not tied to one key).
        problem: what is wrong.
        fix: how to fix it (may be empty).
    """

    path: str | None
    problem: str
    fix: str = ""

    def render(self) -> str:
        where = f"[{self.path}] " if self.path else ""
        text = f"{where}{self.problem}"
        return f"{text}\n  fix: {self.fix}" if self.fix else text


class AccelerationConfigError(ValueError):
    """A problem with an acceleration configuration, a plugin combination or the environment.

    Always raised before any model is loaded. The message names the full config key path (when there is
    one), what is wrong, and how to fix it. When a configuration has several problems, one error carries all
    of them (:attr:`problems`, see :meth:`combine`); its first line is still the first problem. The message is
    at most :data:`MAX_MESSAGE` characters, and its only argument (``err.args == (message,)``).

    Attributes:
        path: dotted key path of the (first) offending entry, e.g.
            ``plugins.peft.quantization.bitsandbytes.quant_type`` (``None`` when not tied to one key).
        problem: what is wrong.
        fix: how to fix it (may be empty).
        problems: every problem, the first one being ``(path, problem, fix)``.
    """

    def __init__(self, problem: str, *, path: str | None = None, fix: str = "", more: Sequence[Problem] = ()) -> None:
        self.path = truncate(path, _MAX_PATH) if path else path
        self.problem = truncate(str(problem), _MAX_PROBLEM)
        self.fix = truncate(str(fix), _MAX_FIX) if fix else ""
        self.problems: tuple[Problem, ...] = (Problem(self.path, self.problem, self.fix), *more)
        super().__init__(self._message())

    def _message(self) -> str:
        parts = [self.problems[0].render()]
        size = len(parts[0])
        shown = 1
        for problem in self.problems[1:]:
            text = problem.render()
            if size + len(text) + 1 > MAX_MESSAGE - 200:
                break
            parts.append(text)
            size += len(text) + 1
            shown += 1
        if len(self.problems) > 1:
            hidden = len(self.problems) - shown
            tail = f"({len(self.problems)} problems"
            tail += f"; {hidden} more not shown: fix these first)" if hidden else ")"
            parts.append(tail)
        return truncate("\n".join(parts), MAX_MESSAGE)

    def __reduce__(self) -> tuple:
        # keyword-only constructor: rebuild from the stored problems (errors cross process boundaries)
        return (_rebuild, (type(self), self.problems, vars(self).get("root")))

    @property
    def count(self) -> int:
        """How many problems this error reports."""
        return len(self.problems)

    @classmethod
    def combine(cls, errors: Iterable[AccelerationConfigError]) -> AccelerationConfigError | None:
        """One error reporting every problem of ``errors`` (in order, duplicates dropped); ``None`` if none.

        A single error is returned as it is (keeping its class)."""
        errors = list(errors)
        if not errors:
            return None
        if len(errors) == 1:
            return errors[0]
        seen: dict[Problem, None] = {}
        for error in errors:
            for problem in error.problems:
                seen.setdefault(problem, None)
        first, *rest = seen
        return AccelerationConfigError(first.problem, path=first.path, fix=first.fix, more=rest)


class NoPluginsConfiguredError(AccelerationConfigError):
    """No plugin activates for a configuration: its body is empty, or every section was passed through.

    The message starts with the original framework's sentence (:data:`NO_PLUGINS`), then says what was found
    and how to fix it; like every :class:`AccelerationConfigError` it is the exception's only argument."""

    def __init__(self, found: str, *, fix: str, root: str | None = None) -> None:
        self.root = root
        """Key path of the configuration body (``plugins``, ``acceleration``, ...), for messages and tests."""
        super().__init__(f"{NO_PLUGINS}\n  found: {found}", fix=fix)


def _rebuild(
    cls: type[AccelerationConfigError], problems: tuple[Problem, ...], root: str | None
) -> AccelerationConfigError:
    error = cls.__new__(cls)
    first = problems[0]
    error.path, error.problem, error.fix, error.problems = first.path, first.problem, first.fix, problems
    if root is not None:
        error.root = root
    ValueError.__init__(error, error._message())
    return error


def did_you_mean(word: object, candidates: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    word = str(word)
    if len(word) > 100:  # no key name is this long; not worth comparing
        return ""
    matches = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" Did you mean {matches[0]!r}?" if matches else ""


def join_path(*parts: str) -> str:
    """Join non-empty dotted key-path parts."""
    return ".".join(p for p in parts if p)


def key_name(key: object) -> str:
    """A key of a configuration mapping as it appears in a key path (bounded: a key may be any YAML value)."""
    return key if isinstance(key, str) and len(key) <= 80 else quote(key, 80)
