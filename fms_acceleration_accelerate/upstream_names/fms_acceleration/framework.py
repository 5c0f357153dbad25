"""``fms_acceleration.framework``: the original framework's constructor over this project's framework.

Clients of the original (fms-hf-tuning) do::

    from fms_acceleration import AccelerationFramework
    from fms_acceleration.framework import KEY_PLUGINS

    framework = AccelerationFramework(path_of_a_yaml_with_a_plugins_body)
    if framework.requires_custom_loading:
        model = framework.model_loader(name_or_path, torch_dtype=..., ...)
    if framework.requires_augmentation:
        model, (peft_config,) = framework.augmentation(model, train_args, modifiable_args=(peft_config,))
    for callback in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(callback)

Everything after the constructor is
:class:`fms_acceleration_accelerate.framework.AccelerationFramework` itself; the constructor takes the original's
arguments (see :class:`AccelerationFramework`).
"""

from __future__ import annotations

import os
from typing import Any

from fms_acceleration_accelerate.config import load_acceleration_config
from fms_acceleration_accelerate.errors import AccelerationConfigError
from fms_acceleration_accelerate.framework import AccelerationFramework as _Framework
from fms_acceleration_accelerate.registry import PluginRegistry

from .constants import ACCELERATION_FRAMEWORK_ENV_KEY, KEY_PLUGINS

NO_PLUGINS_PREFIX = "No plugins could be configured"
"""How the message of the error for a configuration that activates no plugin starts (clients match on it)."""


def _configuration_source(configuration_file: str | os.PathLike | None) -> str | os.PathLike | None:
    """The file to read, with the original's fallback: a file whose ``plugins:`` body is empty gives way to
    ``$ACCELERATION_FRAMEWORK_CONFIG_FILE`` when that is set (fms-hf-tuning writes an empty body when no
    acceleration flag is given, so the variable alone configures the run)."""
    env_file = os.environ.get(ACCELERATION_FRAMEWORK_ENV_KEY)
    if configuration_file is None or not env_file:
        return configuration_file  # None: the framework reads the variable, or says that neither is given
    try:
        load_acceleration_config(configuration_file)
    except AccelerationConfigError as exc:
        if str(exc).startswith(NO_PLUGINS_PREFIX):
            return env_file
        raise
    return configuration_file


class AccelerationFramework(_Framework):
    """:class:`fms_acceleration_accelerate.framework.AccelerationFramework` with the original's constructor.

    Args:
        configuration_file: YAML file with a ``plugins:`` body (an Accelerate config with an ``acceleration:``
            section, or a dict, also work). ``None``: ``$ACCELERATION_FRAMEWORK_CONFIG_FILE``; a file whose body
            is empty also gives way to that variable when it is set, as in the original.
        require_packages_check: as in the original, ``False`` skips the check that the packages each active
            plugin needs are installed.
        registry: plugins to choose from (default: the installed ones).

    Raises:
        AccelerationConfigError: (a ``ValueError``) any configuration problem, before a model is loaded. A
            configuration that activates no plugin raises it with a message that starts with "No plugins could
            be configured", which fms-hf-tuning accepts for an empty configuration.

    Attributes the original's clients read: ``active_plugins`` (``(name, plugin)`` pairs),
    ``plugins_require_custom_loading`` (names), ``requires_custom_loading``, ``requires_augmentation`` (and the
    original's spelling ``requires_agumentation``), ``model_loader``, ``augmentation``,
    ``get_callbacks_and_ready_for_train``.
    """

    def __init__(
        self,
        configuration_file: str | os.PathLike | Any | None = None,
        require_packages_check: bool = True,
        *,
        registry: PluginRegistry | None = None,
    ) -> None:
        super().__init__(
            _configuration_source(configuration_file), registry=registry, check_packages=require_packages_check
        )


__all__ = ["KEY_PLUGINS", "NO_PLUGINS_PREFIX", "AccelerationFramework"]
