"""The patch recorder: every kind of patch is recorded and reverted exactly."""

from __future__ import annotations

import types
from typing import ClassVar

import pytest
import torch
from torch import nn

from fms_acceleration_accelerate.patching import PatchRecorder, PluginPatcher, patch_mapping_entry


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


class Library:
    """Stands in for a library class whose attributes a plugin patches."""

    value = 1

    @staticmethod
    def static() -> str:
        return "static"

    @classmethod
    def klass(cls) -> str:
        return cls.__name__

    def method(self) -> str:
        return "method"


class SubLibrary(Library):
    pass


def test_module_instance_forward_patch_and_revert():
    rec = PatchRecorder()
    patcher = PluginPatcher(rec, "p")
    block, other = Block(), Block()
    x = torch.randn(2, 3)
    ref = block(x)
    patcher.patch_forward(block, lambda x: torch.zeros_like(x), target="layers.0")
    assert torch.equal(block(x), torch.zeros(2, 3))
    assert "forward" not in vars(other)  # only that instance
    assert rec.records[0].target == "layers.0.forward" and not rec.records[0].had_own_attribute
    assert rec.revert() == 1
    assert "forward" not in vars(block) and torch.allclose(block(x), ref)


def test_class_attribute_patch_keeps_descriptors():
    rec = PatchRecorder()
    static, klass, method = (Library.__dict__[n] for n in ("static", "klass", "method"))
    rec.patch(Library, "static", staticmethod(lambda: "new"), plugin="p")
    rec.patch(Library, "klass", classmethod(lambda cls: "new"), plugin="p")
    rec.patch(Library, "method", lambda self: "new", plugin="p")
    rec.patch(Library, "value", 2, plugin="p")
    obj = Library()
    assert (obj.static(), obj.klass(), obj.method(), Library.value) == ("new", "new", "new", 2)
    rec.revert()
    assert Library.__dict__["static"] is static and Library.__dict__["klass"] is klass
    assert Library.__dict__["method"] is method
    assert (obj.static(), Library.static(), obj.klass(), obj.method(), Library.value) == (
        "static",
        "static",
        "Library",
        "method",
        1,
    )


def test_inherited_class_attribute_is_removed_on_revert():
    rec = PatchRecorder()
    rec.patch(SubLibrary, "method", lambda self: "sub", plugin="p")
    assert SubLibrary().method() == "sub" and Library().method() == "method"
    rec.revert()
    assert "method" not in vars(SubLibrary) and SubLibrary().method() == "method"


def test_python_module_attribute():
    mod = types.ModuleType("fake_lib")
    mod.fn = lambda: 1
    original = mod.fn
    rec = PatchRecorder()
    rec.patch(mod, "fn", lambda: 2, plugin="p", target="fake_lib.fn", description="fast fn")
    assert mod.fn() == 2
    rec.revert()
    assert mod.fn is original


def test_nn_module_child_replacement_and_buffer():
    rec = PatchRecorder()
    patcher = PluginPatcher(rec, "p")
    block = Block()
    original = block.proj
    replacement = nn.Identity()
    patcher.replace_child(block, "proj", replacement, target="layers.0.proj", description="Identity")
    patcher.patch(block, "scale", torch.zeros(3))
    assert block.proj is replacement and dict(block.named_children())["proj"] is replacement
    assert torch.equal(block.scale, torch.zeros(3)) and "scale" in dict(block.named_buffers())
    rec.revert()
    assert block.proj is original and dict(block.named_children())["proj"] is original
    assert "proj" not in vars(block)  # still a registered child, not a plain attribute
    assert torch.equal(block.scale, torch.ones(3))


def test_double_patch_of_same_attribute_reverts_to_the_original():
    rec = PatchRecorder()
    block = Block()
    rec.patch(block, "forward", lambda x: x + 1, plugin="first")
    rec.patch(block, "forward", lambda x: x + 2, plugin="second")
    x = torch.zeros(1, 3)
    assert torch.equal(block(x), x + 2)
    assert [r.plugin for r in rec.records] == ["first", "second"]
    assert rec.records[1].had_own_attribute  # the second saw the first's replacement
    assert rec.revert() == 2
    assert "forward" not in vars(block)
    assert len(rec) == 0 and rec.revert() == 0


def test_patching_a_missing_attribute_is_refused():
    with pytest.raises(AttributeError, match="no such attribute"):
        PatchRecorder().patch(Block(), "does_not_exist", 1, plugin="p")


def test_undo_callback_for_attribute_not_held_by_owner():
    calls = []
    rec = PatchRecorder()
    obj = SubLibrary()
    rec.patch(obj, "value", 5, plugin="p", undo=lambda: calls.append("undo"))
    rec.revert()
    assert calls == ["undo"]


def test_reverting_context_manager():
    rec = PatchRecorder()
    block = Block()
    with rec.reverting():
        rec.patch(block, "forward", lambda x: x, plugin="p")
        assert "forward" in vars(block)
    assert "forward" not in vars(block)


def test_summary_table_folds_layer_indices():
    rec = PatchRecorder()
    patcher = PluginPatcher(rec, "fused-ops")
    blocks = [Block() for _ in range(3)]
    for i, block in enumerate(blocks):
        patcher.patch_forward(block, lambda x: x, target=f"model.layers.{i}.mlp", description="fused_mlp (triton)")
    other = PluginPatcher(rec, "peft")
    other.patch(Library, "value", 3, description="3")
    assert patcher.count() == 3 and other.count() == 1
    assert rec.summary_rows() == [
        ("fused-ops", "model.layers.*.mlp.forward", "fused_mlp (triton)", 3),
        ("peft", f"{__name__}.Library.value", "3", 1),
    ]
    table = rec.summary_table().splitlines()
    assert table[0] == "fms-acceleration patches:"
    assert table[1].split() == ["plugin", "target", "replacement", "count"]
    assert table[3].split()[-1] == "3"
    rec.revert()
    assert PatchRecorder().summary_table() == "fms-acceleration: no patches applied"


def test_replace_child_with_restore_keeps_no_reference_to_the_original():
    import gc
    import weakref

    parent = torch.nn.Sequential(torch.nn.Linear(4, 4))
    original = parent[0]
    gone = weakref.ref(original)
    spec = (original.in_features, original.out_features)
    rec = PatchRecorder()
    patcher = PluginPatcher(rec, "p")
    rebuilt = []

    def restore():
        rebuilt.append(torch.nn.Linear(*spec))
        return rebuilt[-1]

    patcher.replace_child(parent, "0", torch.nn.Identity(), target="0", restore=restore)
    del original
    gc.collect()
    assert gone() is None  # the record does not keep the replaced module (nor its memory) alive
    assert len(rec) == 1 and not rec.records[0].had_own_attribute
    assert rec.revert() == 1
    assert parent[0] is rebuilt[0] and isinstance(parent[0], torch.nn.Linear)


def test_keep_later_leaves_a_wrapper_set_over_the_patch_and_reverts_otherwise():
    class Shared:
        def method(self) -> str:
            return "library"

    original = vars(Shared)["method"]
    rec = PatchRecorder()

    def ours(self: Shared) -> str:
        return "ours:" + original(self)

    rec.patch(Shared, "method", ours, plugin="p", keep_later=True)

    def wrapper(self: Shared) -> str:  # another library wraps our patch, outside the recorder
        return "wrapped:" + ours(self)

    Shared.method = wrapper
    assert Shared().method() == "wrapped:ours:library"
    assert rec.revert() == 1
    assert vars(Shared)["method"] is wrapper  # not clobbered by the revert

    # nothing over it: revert restores the original, as without the option
    rec.patch(Shared, "method", ours, plugin="p", keep_later=True)
    rec.patch(Shared, "method", lambda self: "plain", plugin="q")  # a recorded patch over it reverts first
    assert rec.revert() == 2
    assert vars(Shared)["method"] is wrapper

    del Shared.method
    Shared.method = original
    rec.patch(Shared, "method", ours, plugin="p", keep_later=True)
    assert Shared().method() == "ours:library"
    rec.revert()
    assert vars(Shared)["method"] is original
    # without the option a wrapper set over the patch is replaced by the original
    rec.patch(Shared, "method", ours, plugin="p")
    Shared.method = wrapper
    rec.revert()
    assert vars(Shared)["method"] is original


def test_patch_mapping_entry_reverts_in_any_order_and_keeps_others_entries():
    class Registry:
        _global_mapping: ClassVar[dict[str, int]] = {"a": 1}

    original = Registry._global_mapping
    first = PluginPatcher(PatchRecorder(), "first")
    second = PluginPatcher(PatchRecorder(), "second")
    patch_mapping_entry(first, Registry, "_global_mapping", "ours", 2, target="Registry[ours]", description="x")
    assert Registry._global_mapping == {"a": 1, "ours": 2} and original == {"a": 1}
    Registry._global_mapping["added_meanwhile"] = 3  # someone registers into our copy
    patch_mapping_entry(second, Registry, "_global_mapping", "theirs", 4, target="Registry[theirs]", description="y")
    first._recorder.revert()  # reverted first although the other framework patched after it
    assert Registry._global_mapping == {"a": 1, "added_meanwhile": 3, "theirs": 4}
    second._recorder.revert()
    assert Registry._global_mapping == {"a": 1, "added_meanwhile": 3}

    # in order: the original dict object itself comes back, holding what was registered meanwhile
    patch_mapping_entry(first, Registry, "_global_mapping", "ours", 2, target="Registry[ours]", description="x")
    before = Registry._global_mapping
    Registry._global_mapping["late"] = 5
    first._recorder.revert()
    assert Registry._global_mapping is not before and "ours" not in Registry._global_mapping
    assert Registry._global_mapping["late"] == 5

    with pytest.raises(TypeError, match="not a dict"):
        patch_mapping_entry(first, Registry, "missing", "k", 1, target="t", description="d")
