"""fms-acceleration-accelerate: acceleration plugins for Hugging Face fine-tuning, as an Accelerate plugin."""

from .config import AccelerationConfig, load_acceleration_config, option, parse_dataclass
from .errors import AccelerationConfigError
from .framework import AccelerationFramework, PassthroughSection
from .patching import PatchRecord, PatchRecorder, PluginPatcher
from .plugin import AccelerationPlugin, NoOptions
from .registry import ENTRY_POINT_GROUP, PluginEntry, PluginRegistry

__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "AccelerationConfig",
    "AccelerationConfigError",
    "AccelerationFramework",
    "AccelerationPlugin",
    "NoOptions",
    "PassthroughSection",
    "PatchRecord",
    "PatchRecorder",
    "PluginEntry",
    "PluginPatcher",
    "PluginRegistry",
    "load_acceleration_config",
    "option",
    "parse_dataclass",
]
