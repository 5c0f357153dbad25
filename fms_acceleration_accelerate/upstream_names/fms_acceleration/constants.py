"""Constants clients of the original fms-acceleration framework import from ``fms_acceleration.constants``."""

from fms_acceleration_accelerate.config import ENV_CONFIG_FILE

KEY_PLUGINS = "plugins"
"""Top-level key of an acceleration configuration file."""

ACCELERATION_FRAMEWORK_ENV_KEY = ENV_CONFIG_FILE
"""Environment variable naming the configuration file read when none is passed."""

PLUGIN_PREFIX = "fms_acceleration_"
"""Prefix of the plugin import names (``fms_acceleration_peft``, ``fms_acceleration_foak``)."""

PLUGINS = ("peft", "foak", "aadp", "moe", "odm")
"""Plugin import names this project provides (``PLUGIN_PREFIX + name``), each only while the plugin package
behind it is installed: ``peft`` is the bitsandbytes QLoRA plugin (fms-acceleration-accelerate-peft), ``foak`` the
fused-ops-and-kernels plugin (fms-acceleration-accelerate-foak), ``aadp`` the padding-free and multipack plugins
(fms-acceleration-accelerate-aadp), ``moe`` the mixture-of-experts plugin (fms-acceleration-accelerate-moe), ``odm``
the online-data-mixing plugin (fms-acceleration-accelerate-odm)."""

__all__ = ["ACCELERATION_FRAMEWORK_ENV_KEY", "KEY_PLUGINS", "PLUGINS", "PLUGIN_PREFIX"]
