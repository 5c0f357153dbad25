"""Shared by the original framework's plugin import names (``fms_acceleration_peft``, ``fms_acceleration_foak``)
that this project's plugin packages provide for clients of the original (see the ``fms_acceleration`` stand-in
under ``upstream_names/``)."""

from __future__ import annotations

import warnings
from importlib import metadata


def warn_if_original_framework_installed(name: str, sections: str, original_plugin: str) -> None:
    """Warn when the original fms-acceleration is installed: it imports every plugin name it finds, this project's
    stand-in ``name`` included, and then activates nothing from it.

    Args:
        name: the stand-in's import name, e.g. ``fms_acceleration_peft``.
        sections: the configuration sections the stand-in's plugin serves, for the message.
        original_plugin: the original's own distribution for that name, e.g. ``fms-acceleration-peft``.
    """
    try:
        original = metadata.distribution("fms-acceleration")
    except metadata.PackageNotFoundError:
        return
    warnings.warn(
        f"{name} is fms-acceleration-accelerate's stand-in, but the original fms-acceleration {original.version} is "
        f"installed and does not use this project's plugins: its {sections} sections activate nothing there. "
        f"Install the original's {original_plugin} as well, or uninstall the original fms-acceleration to run this "
        "project's framework",
        stacklevel=3,
    )
