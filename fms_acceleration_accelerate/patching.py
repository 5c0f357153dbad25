"""The patch recorder: every change a plugin makes to a module or library attribute goes through here.

Each change is recorded with the original value, so it can be reverted (in reverse order), and summarised
in one table at start-up. Patches of module *instances* (e.g. ``model.model.layers[3].mlp.forward``) are
preferred over patches of library modules; third-party modules are never reloaded.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

_MISSING = object()
_INDEX = re.compile(r"\.\d+(?=\.|$)")


@dataclass(frozen=True)
class PatchRecord:
    """One recorded change.

    Attributes:
        plugin: name of the plugin that made it.
        target: readable name of what was changed, e.g. ``model.layers.0.mlp.forward``.
        replacement: readable name of what it was replaced with, e.g. ``fused_lora_mlp (triton)``.
        owner: the object whose attribute was changed.
        attribute: the attribute name.
        original: the previous value, or a sentinel when the attribute was not set on ``owner`` itself.
        undo: how to undo the change when the attribute was not set on ``owner`` itself and deleting it is not
            the inverse (a property whose setter stores the value elsewhere, e.g. transformers'
            ``PreTrainedModel.loss_function``); ``None``: delete the attribute.
        restore: builds the original value again on revert (the record then keeps no reference to it, e.g.
            a replaced layer whose weight memory must be released once its replacement is sharded).
        value: the replacement object itself.
        keep_later: on revert, leave the attribute as it is when it no longer holds ``value`` (something set over
            this patch later, e.g. another library's wrapper that calls this one, stays in place).
    """

    plugin: str
    target: str
    replacement: str
    owner: Any
    attribute: str
    original: Any
    undo: Callable[[], None] | None = None
    restore: Callable[[], Any] | None = None
    value: Any = field(default=None, compare=False, repr=False)
    keep_later: bool = False

    @property
    def had_own_attribute(self) -> bool:
        return self.original is not _MISSING


def _name_of(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if name is None:
        name = type(obj).__name__
    module = getattr(obj, "__module__", None)
    return f"{module}.{name}" if module and not module.startswith("builtins") else str(name)


def _own_value(owner: Any, attribute: str) -> Any:
    """The raw value of ``attribute`` set on ``owner`` itself, or ``_MISSING`` when it is inherited.

    Reads ``owner.__dict__`` (and an ``nn.Module``'s ``_modules``/``_parameters``/``_buffers``) directly rather
    than ``getattr``, so descriptors such as ``staticmethod``/``classmethod`` on a class are kept as they are
    and restored unchanged on revert.
    """
    own = getattr(owner, "__dict__", {})
    if attribute in own:
        return own[attribute]
    for registry in ("_modules", "_parameters", "_buffers"):
        values = own.get(registry) or {}
        if attribute in values:
            return values[attribute]
    return _MISSING


class PatchRecorder:
    """Records, reverts and summarises patches. One recorder per :class:`AccelerationFramework`."""

    def __init__(self) -> None:
        self._records: list[PatchRecord] = []

    @property
    def records(self) -> tuple[PatchRecord, ...]:
        return tuple(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def patch(
        self,
        owner: Any,
        attribute: str,
        replacement: Any,
        *,
        plugin: str,
        target: str | None = None,
        description: str | None = None,
        undo: Callable[[], None] | None = None,
        restore: Callable[[], Any] | None = None,
        create: bool = False,
        keep_later: bool = False,
    ) -> PatchRecord:
        """Set ``owner.attribute = replacement`` and record it.

        Args:
            owner: object to change (a module instance, a class, a Python module).
            attribute: attribute name on ``owner``.
            replacement: new value.
            plugin: name of the plugin making the change.
            target: readable name of the target (default: ``<type of owner>.<attribute>``).
            description: readable name of the replacement (default: its qualified name).
            undo: called on revert instead of deleting the attribute, when ``owner`` did not hold the attribute
                itself (see :attr:`PatchRecord.undo`); ignored when it did (the original value is restored).
            restore: returns the original value on revert, which then sets ``owner.attribute = restore()``; the
                record keeps no reference to the original (see :attr:`PatchRecord.restore`).
            create: the attribute may be new (e.g. a marker of what another library was told about ``owner``);
                revert deletes it again (or calls ``undo``).
            keep_later: on revert, leave the attribute alone when it no longer holds ``replacement``: a value set
                over this patch later and not reverted (e.g. another library's wrapper that captured this patch as
                its original) stays in place. Use it for patches of shared library classes.

        Raises:
            AttributeError: ``owner`` has no attribute ``attribute`` and ``create`` is false (patches never invent
                attributes by accident).
        """
        if not create and not hasattr(owner, attribute):
            raise AttributeError(f"{plugin}: cannot patch {_name_of(owner)}.{attribute}: no such attribute")
        original = _own_value(owner, attribute) if restore is None else _MISSING
        record = PatchRecord(
            plugin=plugin,
            target=target or f"{_name_of(owner) if isinstance(owner, type) else type(owner).__name__}.{attribute}",
            replacement=description or _name_of(replacement),
            owner=owner,
            attribute=attribute,
            original=original,
            undo=undo,
            restore=restore,
            value=replacement,
            keep_later=keep_later,
        )
        setattr(owner, attribute, replacement)
        self._records.append(record)
        return record

    def revert(self) -> int:
        """Undo every recorded patch, newest first. Returns how many were reverted."""
        count = 0
        while self._records:
            _undo(self._records.pop())
            count += 1
        return count

    def revert_record(self, record: PatchRecord) -> None:
        """Undo one recorded patch (and forget it), e.g. one that another patch made unreachable.

        Raises:
            ValueError: the record is not held here, or a later recorded patch changed the same attribute (revert
                that one first; undoing this one would clobber it).
        """
        index = next((i for i, r in enumerate(self._records) if r is record), None)
        if index is None:
            raise ValueError(f"{record.plugin}: patch of {record.target} is not recorded here (already reverted?)")
        clash = [r for r in self._records[index + 1 :] if r.owner is record.owner and r.attribute == record.attribute]
        if clash:
            raise ValueError(
                f"{record.plugin}: cannot revert the patch of {record.target} alone: {clash[0].target} was patched later"
            )
        del self._records[index]
        _undo(record)

    @contextmanager
    def reverting(self) -> Iterator[PatchRecorder]:
        """Context manager that reverts every patch recorded inside it (and before it) on exit."""
        try:
            yield self
        finally:
            self.revert()

    def summary_rows(self, records: Iterable[PatchRecord] | None = None) -> list[tuple[str, str, str, int]]:
        """Rows ``(plugin, target, replacement, count)`` of ``records`` (default: all); numeric indices in targets
        are folded to ``*``."""
        counts: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        for r in self._records if records is None else records:
            key = (r.plugin, _INDEX.sub(".*", r.target), r.replacement)
            counts[key] = counts.get(key, 0) + 1
        return [(p, t, rep, n) for (p, t, rep), n in counts.items()]

    def summary_table(self, records: Iterable[PatchRecord] | None = None) -> str:
        """A plain-text table of ``records`` (default: all patches), one row per (plugin, target pattern,
        replacement)."""
        rows = self.summary_rows(records)
        if not rows:
            return "fms-acceleration: no patches applied"
        header = ("plugin", "target", "replacement", "count")
        body = [(p, t, r, str(n)) for p, t, r, n in rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]

        def fmt(row: tuple[str, ...]) -> str:
            return "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join(["fms-acceleration patches:", fmt(header), rule, *(fmt(r) for r in body)])


def _undo(record: PatchRecord) -> None:
    if record.keep_later and _own_value(record.owner, record.attribute) is not record.value:
        return
    if record.restore is not None:
        setattr(record.owner, record.attribute, record.restore())
    elif record.had_own_attribute:
        setattr(record.owner, record.attribute, record.original)
    elif record.undo is not None:
        record.undo()
    else:
        delattr(record.owner, record.attribute)


def patch_mapping_entry(
    patches: PluginPatcher,
    owner: Any,
    attribute: str,
    key: str,
    value: Any,
    *,
    target: str,
    description: str,
) -> PatchRecord:
    """Add ``key -> value`` to the dict held in ``owner.attribute`` (e.g. a transformers ``GeneralInterface``
    class's ``_global_mapping``) as a patch recorded by the plugin's ``patches``: the dict is replaced by a copy that holds the entry.

    On revert the original dict object comes back, with whatever others registered in the copy meanwhile (the
    entry of ``key`` excepted); when someone replaced the dict after this patch and has not reverted yet, only
    ``key`` is taken out of the current one, so several frameworks may revert in any order.
    """
    before = _own_value(owner, attribute)
    if not isinstance(before, dict):
        raise TypeError(f"cannot add {key!r} to {_name_of(owner)}.{attribute}: not a dict held by that object")
    installed = {**before, key: value}

    def restore() -> dict[str, Any]:
        current = _own_value(owner, attribute)
        if current is not installed:
            return {name: entry for name, entry in current.items() if name != key}
        for name, entry in installed.items():
            if name != key and before.get(name) is not entry:
                before[name] = entry
        return before

    return patches.patch(owner, attribute, installed, target=target, description=description, restore=restore)


class PluginPatcher:
    """A plugin's view of the recorder: every patch is attributed to that plugin."""

    def __init__(self, recorder: PatchRecorder, plugin: str) -> None:
        self._recorder = recorder
        self.plugin = plugin

    def patch(
        self,
        owner: Any,
        attribute: str,
        replacement: Any,
        *,
        target: str | None = None,
        description: str | None = None,
        undo: Callable[[], None] | None = None,
        restore: Callable[[], Any] | None = None,
        keep_later: bool = False,
    ) -> PatchRecord:
        """Record-and-set, see :meth:`PatchRecorder.patch`."""
        return self._recorder.patch(
            owner,
            attribute,
            replacement,
            plugin=self.plugin,
            target=target,
            description=description,
            undo=undo,
            restore=restore,
            keep_later=keep_later,
        )

    def patch_forward(
        self, module: Any, forward: Callable[..., Any], *, target: str, description: str | None = None
    ) -> PatchRecord:
        """Replace the ``forward`` of one module *instance* (the class is untouched)."""
        return self.patch(module, "forward", forward, target=f"{target}.forward", description=description)

    def replace_child(
        self,
        parent: Any,
        child_name: str,
        new_child: Any,
        *,
        target: str,
        description: str | None = None,
        restore: Callable[[], Any] | None = None,
    ) -> PatchRecord:
        """Replace the sub-module ``parent.<child_name>`` with ``new_child``.

        ``restore`` (optional) rebuilds the original child on revert, so the record does not hold it: use it
        when the original owns memory that must go once the replacement is in use (see
        :meth:`PatchRecorder.patch`)."""
        return self.patch(parent, child_name, new_child, target=target, description=description, restore=restore)

    def revert_record(self, record: PatchRecord) -> None:
        """Undo one of this plugin's patches, see :meth:`PatchRecorder.revert_record`."""
        if record.plugin != self.plugin:
            raise ValueError(f"{self.plugin}: the patch of {record.target} belongs to {record.plugin}")
        self._recorder.revert_record(record)

    def count(self) -> int:
        """How many patches this plugin has recorded so far."""
        return sum(1 for r in self._recorder.records if r.plugin == self.plugin)

    @property
    def records(self) -> tuple[PatchRecord, ...]:
        """This plugin's records, oldest first."""
        return tuple(r for r in self._recorder.records if r.plugin == self.plugin)
