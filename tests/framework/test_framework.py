"""Plugin resolution: AND/OR paths, passthrough, order, conflicts, loaders, hooks, env var, isolation."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fms_acceleration_accelerate import AccelerationConfigError, AccelerationFramework, AccelerationPlugin
from fms_acceleration_accelerate.config import ENV_CONFIG_FILE, option
from fms_acceleration_accelerate.errors import NoPluginsConfiguredError
from fms_acceleration_accelerate.framework import check_requirements
from fms_acceleration_accelerate.registry import PluginRegistry

from .helpers import (
    AndPlugin,
    Backend,
    Exclusive,
    KernelPlugin,
    QuantLoader,
    registry,
    write_fake_distribution,
)

QUANT = {"peft": {"quantization": {"testquant": {"quant_type": "fp4"}}}}
KERNELS = {"training": {"test_kernels": {"fast_rms_layernorm": True}}}


def make(config, *plugins, **kwargs) -> AccelerationFramework:
    return AccelerationFramework(config, registry=registry(*plugins), **kwargs)


# ------------------------------------------------------------------------------------------ activation
def test_or_path_activates_with_either_path():
    for cfg in (
        {"training": {"test_kernels": {"fast_loss": True}}},
        {"peft": {"quantization": {"test_kernels": {"fast_loss": True}}}},
    ):
        fw = make({"plugins": cfg})
        assert fw.active_plugin_names == ("kernels",)
        assert fw.plugin("kernels").config.fast_loss is True
        assert len(fw.plugin("kernels").matched_paths) == 1


def test_and_path_needs_all_sections():
    both = {"training": {"alpha": {"quant_type": "fp4"}, "beta": {"group_size": 32}}}
    fw = make(both)
    plugin = fw.plugin("and-plugin")
    assert plugin.matched_paths == ("training.alpha", "training.beta")
    # options of every AND section reach the config
    assert (plugin.config.quant_type, plugin.config.group_size) == ("fp4", 32)

    # one AND section alone activates nothing: passed through next to an active plugin, refused alone
    only_one = make({"training": {"alpha": {}, "test_kernels": {}}})
    assert only_one.active_plugin_names == ("kernels",)
    assert [s.path for s in only_one.passthrough] == ["training.alpha"]
    assert "missing: training.beta" in only_one.passthrough[0].reason
    with pytest.raises(NoPluginsConfiguredError) as err:
        make({"training": {"alpha": {}}})
    assert (
        "training.alpha (plugin 'and-plugin' activates only when all of its sections are present; missing: "
        "training.beta)" in str(err.value)
    )


def test_and_sections_may_not_set_an_option_twice():
    with pytest.raises(AccelerationConfigError, match=r"option 'group_size' is set twice") as err:
        make({"training": {"alpha": {"group_size": 1}, "beta": {"group_size": 2}}})
    assert err.value.path == "training.beta.group_size"


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"plugins": None},
        {"plugins": {}},
        {"acceleration": None},
        {"acceleration": {}},
        {"acceleration": {"plugins": {}}},
    ],
)
def test_empty_config_raises_the_original_frameworks_error(cfg):
    """The original framework's message, as its clients match it: one argument starting with the sentence."""
    with pytest.raises(ValueError) as err:
        make(cfg)
    assert isinstance(err.value, NoPluginsConfiguredError)
    (message,) = err.value.args
    assert message.startswith("No plugins could be configured. Please check the acceleration framework configuration")
    assert "fix: put at least one plugin section under" in message


def test_empty_yaml_file_raises_the_original_frameworks_error(tmp_path):
    for text in ("", "# nothing here\n", "plugins:\n", "plugins: {}\n", "distributed_type: 'NO'\nacceleration:\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(NoPluginsConfiguredError) as err:
            AccelerationFramework(path, registry=registry())
        (message,) = err.value.args
        assert message.startswith("No plugins could be configured") and str(path) in message, text


def test_deterministic_order_independent_of_config_and_registry_order():
    cfg_a = {**QUANT, "training": {"test_kernels": {}, "alpha": {}, "beta": {}}}
    cfg_b = {"training": {"beta": {}, "alpha": {}, "test_kernels": {}}, **QUANT}
    expected = ("quant-loader", "and-plugin", "kernels")
    assert make(cfg_a).active_plugin_names == expected
    assert make(cfg_b).active_plugin_names == expected
    shuffled = PluginRegistry([KernelPlugin, AndPlugin, QuantLoader])
    assert AccelerationFramework(cfg_b, registry=shuffled).active_plugin_names == expected


def test_equal_order_breaks_ties_by_name():
    class Zeta(AccelerationPlugin):
        configuration_or_paths = ("training.zeta",)
        order = 5

    class Alpha(AccelerationPlugin):
        configuration_or_paths = ("training.alpha_x",)
        order = 5

    fw = AccelerationFramework({"training": {"zeta": {}, "alpha_x": {}}}, registry=PluginRegistry([Zeta, Alpha]))
    assert fw.active_plugin_names == ("Alpha", "Zeta")


def test_incompatible_plugins_refused():
    with pytest.raises(AccelerationConfigError, match="cannot be combined") as err:
        make({"training": {"exclusive": {}, "test_kernels": {}}})
    assert "remove either" in str(err.value)


def test_check_compatibility_hook_error_has_full_path():
    with pytest.raises(AccelerationConfigError, match="picky cannot run") as err:
        make({"plugins": {**QUANT, "training": {"picky": {}}}})
    assert err.value.path == "plugins.training.picky"


def test_at_most_one_model_loader():
    cfg = {"peft": {"quantization": {"testquant": {}, "otherquant": {}}}}
    with pytest.raises(AccelerationConfigError, match="more than one active plugin loads the model") as err:
        make(cfg)
    assert "quant-loader" in str(err.value) and "other-loader" in str(err.value)


def test_missing_required_package_names_install_command():
    with pytest.raises(AccelerationConfigError, match="pip install fms-nonexistent-package-xyz") as err:
        make({"training": {"needs_missing": {}}})
    assert "is not installed" in str(err.value)
    # the check can be turned off (tests only)
    assert make({"training": {"needs_missing": {}}}, check_packages=False).active_plugin_names == ("needs-missing",)


def test_check_requirements_versions_and_markers():
    check_requirements(["pyyaml>=1"], who="t", path="p", install_hint="")
    check_requirements(['fms-nonexistent-package-xyz; python_version < "3"'], who="t", path="p", install_hint="")
    with pytest.raises(AccelerationConfigError, match=r"needs pyyaml>=9999 but pyyaml is \d") as err:
        check_requirements(["pyyaml>=9999"], who="t", path="x.y", install_hint="")
    assert "pip install 'pyyaml>=9999'" in str(err.value)
    with pytest.raises(TypeError, match="invalid requirement"):
        check_requirements(["not a requirement !!"], who="t", path="p", install_hint="")


# ------------------------------------------------------------------------------------------ passthrough
def test_known_section_without_plugin_is_passed_through_with_one_log_line(caplog):
    cfg = {"plugins": {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"}}}, **KERNELS}}
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_accelerate"):
        fw = AccelerationFramework(cfg, registry=PluginRegistry([KernelPlugin]))
    assert fw.active_plugin_names == ("kernels",)
    assert [s.path for s in fw.passthrough] == ["plugins.peft.quantization.bitsandbytes"]
    lines = [r.getMessage() for r in caplog.records if r.name == "fms_acceleration_accelerate"]
    assert len(lines) == 1
    assert "plugins.peft.quantization.bitsandbytes" in lines[0]
    assert "pip install fms-acceleration-accelerate-peft" in lines[0]
    assert any("pass through plugins.peft.quantization.bitsandbytes" in line for line in fw.describe())


def test_unknown_third_party_section_is_passed_through():
    fw = make({"plugins": {"vendor": {"turbo": {"x": 1}}, **KERNELS}})
    assert fw.active_plugin_names == ("kernels",)
    assert [s.path for s in fw.passthrough] == ["plugins.vendor"]
    assert "no installed plugin registers this section" in fw.passthrough[0].reason


def test_only_passthrough_sections_raise_the_original_frameworks_error(caplog):
    cfg = {"plugins": {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"}}}, "vendor": {"turbo": {}}}}
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_accelerate"), pytest.raises(ValueError) as err:
        AccelerationFramework(cfg, registry=PluginRegistry([KernelPlugin]))
    (message,) = err.value.args
    assert message.startswith("No plugins could be configured. Please check the acceleration framework configuration")
    assert (
        "plugins.peft.quantization.bitsandbytes (its plugin is not installed; enable it with: pip install " in message
    )
    assert "plugins.vendor (no installed plugin registers this section)" in message
    assert (
        "installed plugins register: plugins.peft.quantization.test_kernels, plugins.training.test_kernels" in message
    )
    assert not caplog.records  # refused, not logged as passed through


def test_passthrough_logged_only_on_main_process(caplog, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_accelerate"):
        AccelerationFramework({"peft": {"quantization": {"bitsandbytes": {}}}, **KERNELS}, registry=registry())
    assert not [r for r in caplog.records if r.name == "fms_acceleration_accelerate"]


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A folder holding a fake installed plugin distribution, put on sys.path (and removed after)."""
    site = tmp_path / "site"
    module = f"fake_accel_plugin_{abs(hash(str(tmp_path)))}"
    write_fake_distribution(
        site,
        module=module,
        entry_points={
            "fake": f"{module}:FakePlugin",
            "broken-module": "fms_no_such_module_xyz:Plugin",
            "broken-attr": f"{module}:NoSuchClass",
            "not-a-plugin": f"{module}:NOT_A_PLUGIN",
        },
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop(module, None)


def test_entry_point_discovery_of_installed_distribution(fake_site):
    reg = PluginRegistry.discover()
    fake = next(e for e in reg.entries if e.name == "fake")
    assert (fake.distribution, fake.version) == ("fake-accel-plugin", "1.2.3")
    assert reg.paths["training.fake"] is fake
    errors = {e.name: e.load_error for e in reg.failed()}
    assert "ModuleNotFoundError" in errors["broken-module"]
    assert "AttributeError" in errors["broken-attr"]
    assert errors["not-a-plugin"] == "not an AccelerationPlugin"

    fw = AccelerationFramework({"plugins": {"training": {"fake": {"speed": 3}}}})
    assert fw.active_plugin_names == ("fake",)
    assert fw.plugin("fake").config.speed == 3
    assert any("fake-accel-plugin 1.2.3" in line for line in fw.describe())


def test_same_section_passes_through_when_distribution_not_installed(caplog):
    reg = PluginRegistry.discover()
    assert "training.fake" not in reg.paths
    cfg = {"plugins": {"training": {"fake": {"speed": 3}}}}
    with pytest.raises(NoPluginsConfiguredError, match=r"plugins\.training\.fake \(no installed plugin registers"):
        AccelerationFramework(cfg, registry=reg)
    extended = PluginRegistry([*(e.plugin_class for e in reg.entries if e.plugin_class), KernelPlugin])
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_accelerate"):
        fw = AccelerationFramework(
            {"plugins": {"training": {"fake": {"speed": 3}, "test_kernels": {"fast_loss": True}}}}, registry=extended
        )
    assert fw.active_plugin_names == ("kernels",)
    assert [s.path for s in fw.passthrough] == ["plugins.training.fake"]
    assert sum("plugins.training.fake" in r.getMessage() for r in caplog.records) == 1


def test_registry_refuses_two_plugins_for_one_path():
    class Clash(AccelerationPlugin):
        configuration_or_paths = ("training.test_kernels",)

    with pytest.raises(AccelerationConfigError, match="claimed by both"):
        PluginRegistry([KernelPlugin, Clash])
    with pytest.raises(AccelerationConfigError, match="two plugins are named"):
        PluginRegistry([KernelPlugin, KernelPlugin])


# ------------------------------------------------------------------------------------------ seed API
def test_seed_register_plugin_api():
    @dataclass(frozen=True)
    class GptqOptions:
        kernel: str = option("triton_v2", help="kernel")

    class GptqPlugin(AccelerationPlugin):
        config_class = GptqOptions

    returned = AccelerationPlugin.register_plugin(
        GptqPlugin, configuration_and_paths=["peft.quantization.auto_gptq"], required_packages=["pyyaml"]
    )
    assert returned is GptqPlugin
    assert GptqPlugin.configuration_and_paths == ("peft.quantization.auto_gptq",)
    assert GptqPlugin.required_packages == ("pyyaml",)
    fw = AccelerationFramework(
        {"plugins": {"peft": {"quantization": {"auto_gptq": {"kernel": "exllama"}}}}},
        registry=PluginRegistry([GptqPlugin]),
    )
    assert fw.active_plugin_names == ("GptqPlugin",)
    assert fw.plugin("GptqPlugin").config.kernel == "exllama"


def test_register_plugin_rejects_bad_declarations_and_leaves_class_unchanged():
    class P(AccelerationPlugin):
        configuration_or_paths = ("training.p",)

    with pytest.raises(TypeError, match="unknown plugin attribute 'colour'"):
        AccelerationPlugin.register_plugin(P, colour="red")
    with pytest.raises(TypeError, match="must be a list of strings"):
        AccelerationPlugin.register_plugin(P, configuration_or_paths="training.q")
    with pytest.raises(TypeError, match="both AND and OR"):
        AccelerationPlugin.register_plugin(P, configuration_and_paths=["training.q"])
    assert P.configuration_or_paths == ("training.p",) and P.configuration_and_paths == ()
    with pytest.raises(TypeError, match="invalid configuration path"):
        AccelerationPlugin.register_plugin(P, configuration_or_paths=["training..q"])
    with pytest.raises(TypeError, match="supported_model_types must be a tuple of strings"):
        AccelerationPlugin.register_plugin(P, supported_model_types=[1])
    with pytest.raises(TypeError, match="AccelerationPlugin subclass"):
        AccelerationPlugin.register_plugin(object)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ env var
def test_config_from_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "accel.yaml"
    path.write_text("plugins:\n  training:\n    test_kernels:\n      fast_loss: true\n", encoding="utf-8")
    monkeypatch.setenv(ENV_CONFIG_FILE, str(path))
    fw = AccelerationFramework(registry=registry())
    assert fw.active_plugin_names == ("kernels",) and fw.config.origin == str(path)
    monkeypatch.delenv(ENV_CONFIG_FILE)
    with pytest.raises(AccelerationConfigError, match=ENV_CONFIG_FILE):
        AccelerationFramework(registry=registry())


def test_accelerate_config_section_and_redirect(tmp_path):
    (tmp_path / "body.yaml").write_text("plugins:\n  training:\n    test_kernels: {fast_loss: true}\n")
    accel = tmp_path / "accelerate.yaml"
    accel.write_text("distributed_type: 'NO'\nnum_processes: 1\nacceleration: body.yaml\n")
    fw = make(accel)
    assert fw.active_plugin_names == ("kernels",) and fw.config.origin == str(tmp_path / "body.yaml")
    inline = tmp_path / "inline.yaml"
    inline.write_text("distributed_type: 'NO'\nacceleration:\n  plugins:\n    training:\n      test_kernels: {}\n")
    fw = make(inline)
    assert fw.config.root == "acceleration.plugins" and fw.active_plugin_names == ("kernels",)


# ------------------------------------------------------------------------------------------ hooks
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_augmentation_runs_in_order_and_returns_modifiable_args():
    torch.manual_seed(0)
    net = TinyNet()
    x = torch.randn(2, 4)
    before = net(x)
    fw = make({"plugins": {**QUANT, **KERNELS}})
    assert fw.requires_augmentation and fw.requires_agumentation  # upstream spelling kept
    net.config = type("Cfg", (), {"model_type": "llama"})()
    model, (peft_config, other) = fw.augmentation(net, None, modifiable_args=("lora", "keep"))
    assert model is net
    assert peft_config is None and other == "keep"  # consumed by quant-loader, passed on by kernels
    assert torch.allclose(net(x), 4 * before - 2 * net.b.bias, atol=1e-5)  # b(2 a(x)) doubled
    assert torch.allclose(net.a(x), 2 * nn.functional.linear(x, net.a.weight, net.a.bias))
    assert len(fw.patches) == 2
    fw.revert()
    assert torch.allclose(net(x), before)


def test_augmentation_checks_model_type_first():
    net = TinyNet()
    net.config = type("Cfg", (), {"model_type": "gpt2"})()
    fw = make({"plugins": {**QUANT, **KERNELS}})
    with pytest.raises(AccelerationConfigError, match="does not support model type 'gpt2'") as err:
        fw.augmentation(net, None, modifiable_args=(None,))
    assert err.value.path == "plugins.peft.quantization.testquant"
    assert "supported model types: llama" in str(err.value)
    assert len(fw.patches) == 0


def test_augmentation_result_shape_is_checked():
    class Bad(AccelerationPlugin):
        configuration_or_paths = ("training.bad",)

        def augmentation(self, model, train_args, modifiable_args):
            return model, ()

    fw = AccelerationFramework({"training": {"bad": {}}}, registry=PluginRegistry([Bad]))
    with pytest.raises(TypeError, match="returned 0 modifiable_args for 1 given"):
        fw.augmentation(TinyNet(), None, modifiable_args=(None,))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_model_loader_loads_saved_random_model(tiny_llama_dir):
    fw = make({"plugins": QUANT})
    assert fw.requires_custom_loading
    model = fw.model_loader(str(tiny_llama_dir))
    assert model.config.model_type == "llama"
    assert fw.plugin("quant-loader").loaded == [str(tiny_llama_dir)]


def test_model_loader_checks_model_type_before_loading(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(tmp_path)  # config only
    fw = make({"plugins": QUANT})
    with pytest.raises(AccelerationConfigError, match="does not support model type 'gpt2'"):
        fw.model_loader(str(tmp_path))
    assert fw.plugin("quant-loader").loaded == []


def test_model_loader_without_loading_plugin():
    fw = make(KERNELS)
    assert not fw.requires_custom_loading
    with pytest.raises(AccelerationConfigError, match="no active plugin loads models"):
        fw.model_loader("unused")


def test_summary_table_printed_once_on_main_process(capsys, monkeypatch):
    fw = make(KERNELS)
    fw.augmentation(TinyNet(), None, ())
    assert fw.get_callbacks_and_ready_for_train() == []
    fw.get_callbacks_and_ready_for_train()
    out = capsys.readouterr().out
    assert out.count("fms-acceleration patches:") == 1
    assert "kernels" in out and "doubled linear" in out
    monkeypatch.setenv("RANK", "1")
    fw2 = make(KERNELS)
    fw2.augmentation(TinyNet(), None, ())
    fw2.get_callbacks_and_ready_for_train()
    assert capsys.readouterr().out == ""
    fw.revert()
    fw2.revert()


def test_describe_lists_options_without_loading_a_model():
    fw = make({"plugins": {"training": {"test_kernels": {"backend": "torch", "layers": ["a", "b"]}}}})
    lines = fw.describe()
    assert lines[1] == "activate kernels <- plugins.training.test_kernels"
    assert "backend=<Backend.TORCH: 'torch'>" in lines[2] and "layers=('a', 'b')" in lines[2]
    assert fw.plugin("kernels").config.backend is Backend.TORCH


# ------------------------------------------------------------------------------------------ isolation
def test_two_frameworks_in_one_process_do_not_interfere():
    net1, net2 = TinyNet(), TinyNet()
    x = torch.randn(3, 4)
    ref1, ref2 = net1(x), net2(x)
    fw1 = make(KERNELS)
    fw2 = AccelerationFramework({"training": {"exclusive": {}}}, registry=PluginRegistry([Exclusive]))
    fw1.augmentation(net1, None, ())
    fw3 = make(KERNELS)
    fw3.augmentation(net2, None, ())
    assert fw1.active_plugin_names == ("kernels",) and fw2.active_plugin_names == ("exclusive",)
    assert fw1.registry is not fw2.registry and fw1.patches is not fw3.patches
    assert fw1.plugin("kernels") is not fw3.plugin("kernels")
    assert len(fw1.patches) == 2 and len(fw2.patches) == 0 and len(fw3.patches) == 2
    fw1.revert()
    assert torch.allclose(net1(x), ref1)
    assert not torch.allclose(net2(x), ref2)  # fw3's patches are untouched
    fw3.revert()
    assert torch.allclose(net2(x), ref2)


def test_context_manager_reverts():
    net = TinyNet()
    x = torch.randn(2, 4)
    ref = net(x)
    with make(KERNELS) as fw:
        fw.augmentation(net, None, ())
        assert not torch.allclose(net(x), ref)
    assert torch.allclose(net(x), ref) and len(fw.patches) == 0
    fw = make(KERNELS)
    with fw.applied():
        fw.augmentation(net, None, ())
        assert "forward" in vars(net.a)
    assert "forward" not in vars(net.a) and torch.allclose(net(x), ref)
    with pytest.raises(RuntimeError), fw.applied():  # reverted on error too
        fw.augmentation(net, None, ())
        raise RuntimeError("boom")
    assert torch.allclose(net(x), ref)


def test_plugin_errors_get_the_full_key_path():
    class Strict(AccelerationPlugin):
        configuration_or_paths = ("training.strict",)

        def augmentation(self, model, train_args, modifiable_args):
            raise AccelerationConfigError("relative path from a hook", path="training.strict.level", fix="f")

    reg = PluginRegistry([Strict])
    fw = AccelerationFramework({"acceleration": {"training": {"strict": {}}}}, registry=reg)
    assert fw.plugin("Strict").key_path("level") == "acceleration.training.strict.level"
    with pytest.raises(AccelerationConfigError) as err:
        fw.augmentation(TinyNet(), None, ())
    assert err.value.path == "acceleration.training.strict.level"
    bare = AccelerationFramework({"training": {"strict": {}}}, registry=reg)
    assert bare.plugin("Strict").key_path() == "training.strict"
