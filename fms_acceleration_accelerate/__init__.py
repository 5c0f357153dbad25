"""fms-acceleration-accelerate: acceleration plugins for Hugging Face fine-tuning, as an Accelerate plugin."""

from .config import AccelerationConfig, load_acceleration_config, option, parse_dataclass
from .dequant import DequantBackend, DequantBackendRegistry
from .errors import AccelerationConfigError
from .framework import AccelerationFramework, PassthroughSection
from .patching import PatchRecord, PatchRecorder, PluginPatcher
from .plugin import AccelerationPlugin, NoOptions
from .registry import ENTRY_POINT_GROUP, PluginEntry, PluginRegistry
from .teardown import end_training

__version__ = "0.1.0"

_ACCELERATE_EXPORTS = ("AccelerationKwargs", "get_framework", "get_callbacks_and_ready_for_train")


def __getattr__(name: str):
    """``AccelerationKwargs`` & co. live in ``accelerate_integration``; importing them lazily keeps
    ``import fms_acceleration_accelerate`` free of Accelerate (the CLI and config checks do not need it)."""
    if name in _ACCELERATE_EXPORTS:
        from . import accelerate_integration

        return getattr(accelerate_integration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ENTRY_POINT_GROUP",
    "AccelerationConfig",
    "AccelerationConfigError",
    "AccelerationFramework",
    "AccelerationKwargs",
    "AccelerationPlugin",
    "DequantBackend",
    "DequantBackendRegistry",
    "NoOptions",
    "PassthroughSection",
    "PatchRecord",
    "PatchRecorder",
    "PluginEntry",
    "PluginPatcher",
    "PluginRegistry",
    "end_training",
    "get_callbacks_and_ready_for_train",
    "get_framework",
    "load_acceleration_config",
    "option",
    "parse_dataclass",
]
