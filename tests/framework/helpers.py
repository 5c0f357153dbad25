"""Small test-only plugins, registries and a fake installed distribution for the framework tests."""

from __future__ import annotations

import enum
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fms_acceleration_accelerate import AccelerationPlugin, PluginRegistry
from fms_acceleration_accelerate.config import option
from fms_acceleration_accelerate.errors import AccelerationConfigError


class Backend(enum.Enum):
    TRITON = "triton"
    TORCH = "torch"


@dataclass(frozen=True)
class QuantOptions:
    quant_type: Literal["nf4", "fp4"] = option("nf4", help="4-bit type")
    group_size: int = option(64, help="block size")
    no_peft_model: bool = option(False, help="skip LoRA")


@dataclass(frozen=True)
class Inner:
    depth: int = option(1, help="nested option")


@dataclass(frozen=True)
class KernelOptions:
    fast_rms_layernorm: bool = option(False, help="fused RMSNorm")
    fast_rope_embeddings: bool = option(False, help="fused RoPE")
    fast_loss: bool = option(False, help="fused loss")
    backend: Backend = option(Backend.TRITON, help="kernel backend")  # noqa: RUF009
    block_size: int | None = option(None, help="kernel block size")
    scale: float = option(1.0, help="a float")
    layers: tuple[str, ...] = option((), help="layer names")
    inner: Inner = option(Inner(), help="nested")  # noqa: RUF009
    label: str = option("k", help="a string")
    loss: bool | Literal["cross_entropy", "fused_linear"] = option(False, help="bool or a mode")

    def __post_init__(self) -> None:
        if self.fast_rope_embeddings and not self.fast_rms_layernorm:
            raise AccelerationConfigError(
                "fast_rope_embeddings needs fast_rms_layernorm", fix="set fast_rms_layernorm: true as well"
            )


@dataclass(frozen=True)
class Required:
    rank: int = option(help="required option")


class QuantLoader(AccelerationPlugin):
    """Loads the model (order 100); supports llama only."""

    name = "quant-loader"
    configuration_or_paths = ("peft.quantization.testquant",)
    config_class = QuantOptions
    supported_model_types = ("llama",)
    order = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loaded: list[str] = []

    def model_loader(self, model_name_or_path: str, **kwargs: Any) -> Any:
        from transformers import AutoModelForCausalLM

        self.loaded.append(model_name_or_path)
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)

    def augmentation(self, model: Any, train_args: Any, modifiable_args: tuple[Any, ...]) -> tuple[Any, tuple]:
        # consumes the first modifiable arg (like upstream consumes peft_config)
        return model, (None, *modifiable_args[1:])


class OtherLoader(AccelerationPlugin):
    name = "other-loader"
    configuration_or_paths = ("peft.quantization.otherquant",)
    order = 110

    def model_loader(self, model_name_or_path: str, **kwargs: Any) -> Any:
        raise AssertionError("must not be called")


class KernelPlugin(AccelerationPlugin):
    """Patches module instances in augmentation (order 300); OR paths."""

    name = "kernels"
    configuration_or_paths = ("peft.quantization.test_kernels", "training.test_kernels")
    config_class = KernelOptions
    order = 300

    def augmentation(self, model: Any, train_args: Any, modifiable_args: tuple[Any, ...]) -> tuple[Any, tuple]:
        for name, module in model.named_modules():
            if type(module).__name__ == "Linear":
                self.patches.patch_forward(module, _doubled(module), target=name, description="doubled linear")
        return model, modifiable_args


def _doubled(module: Any) -> Any:
    original = type(module).forward

    def forward(x: Any) -> Any:
        return 2 * original(module, x)

    return forward


class AndPlugin(AccelerationPlugin):
    name = "and-plugin"
    configuration_and_paths = ("training.alpha", "training.beta")
    config_class = QuantOptions
    order = 200


class Exclusive(AccelerationPlugin):
    name = "exclusive"
    configuration_or_paths = ("training.exclusive",)
    incompatible_paths = ("training.test_kernels", "peft.quantization.test_kernels")
    order = 250


class Picky(AccelerationPlugin):
    """Refuses to run next to the quant loader through check_compatibility."""

    name = "picky"
    configuration_or_paths = ("training.picky",)
    order = 260

    def check_compatibility(self, active: Any) -> None:
        if any(p.plugin_name() == "quant-loader" for p in active):
            raise AccelerationConfigError(
                "picky cannot run with 4-bit loading", path=self.matched_paths[0], fix="remove training.picky"
            )


class NeedsMissing(AccelerationPlugin):
    name = "needs-missing"
    configuration_or_paths = ("training.needs_missing",)
    required_packages = ("fms-nonexistent-package-xyz>=1.0",)
    install_hint = "pip install fms-nonexistent-package-xyz"


class NeedsOption(AccelerationPlugin):
    name = "needs-option"
    configuration_or_paths = ("training.needs_option",)
    config_class = Required


ALL_PLUGINS = (QuantLoader, OtherLoader, KernelPlugin, AndPlugin, Exclusive, Picky, NeedsMissing, NeedsOption)


def registry(*plugins: type[AccelerationPlugin]) -> PluginRegistry:
    """A registry of the given test plugins (default: all of them)."""
    return PluginRegistry(plugins or ALL_PLUGINS)


def write_fake_distribution(
    site: Path,
    *,
    dist: str = "fake-accel-plugin",
    version: str = "1.2.3",
    module: str = "fake_accel_plugin",
    entry_points: dict[str, str] | None = None,
    path: str = "training.fake",
) -> Path:
    """Write a minimal installed distribution (``*.dist-info`` + module) into the folder ``site``.

    With ``site`` on ``sys.path``, ``importlib.metadata`` sees it as installed and its entry points in the
    group ``fms_acceleration_accelerate.plugins`` are found by :meth:`PluginRegistry.discover`.
    """
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            from dataclasses import dataclass

            from fms_acceleration_accelerate import AccelerationPlugin
            from fms_acceleration_accelerate.config import option


            @dataclass(frozen=True)
            class FakeOptions:
                speed: int = option(1, help="how fast")


            class FakePlugin(AccelerationPlugin):
                name = "fake"
                configuration_or_paths = ({path!r},)
                config_class = FakeOptions

            NOT_A_PLUGIN = 42
            """
        ),
        encoding="utf-8",
    )
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    entry_points = entry_points or {"fake": f"{module}:FakePlugin"}
    lines = ["[fms_acceleration_accelerate.plugins]", *(f"{k} = {v}" for k, v in entry_points.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines), encoding="utf-8")
    return info
