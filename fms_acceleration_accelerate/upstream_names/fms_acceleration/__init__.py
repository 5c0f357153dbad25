"""``fms_acceleration``: the import name of the original fms-acceleration framework, provided by
fms-acceleration-accelerate so that its clients (fms-hf-tuning) run unchanged on this project's framework and
plugins.

The original wins whenever it is installed: this package sits in a directory that the start-up file
``fms_acceleration_accelerate_upstream_names.pth`` appends to ``sys.path`` after site-packages (and after
``PYTHONPATH``), so a real ``fms_acceleration`` installed there is found first and this one is never imported.
If this one is imported while the original's distribution is installed (an unusual import set-up found it
first), importing it fails with an error saying so, rather than running a different framework silently.

Provided: :class:`AccelerationFramework` (:mod:`.framework`, the original's constructor over this project's
framework), :class:`AccelerationPlugin` (this project's plugin base), ``AccelerationPluginConfigError`` (this
project's :class:`~fms_acceleration_accelerate.errors.AccelerationConfigError`), :mod:`.constants` and a small
:mod:`.cli` (``install`` / ``plugins``). The plugin import names ``fms_acceleration_peft``,
``fms_acceleration_foak``, ``fms_acceleration_aadp``, ``fms_acceleration_moe`` and ``fms_acceleration_odm`` come
with this project's plugin packages; see :data:`.constants.PLUGINS`.
"""

from importlib import metadata as _metadata


def _refuse_if_the_original_is_installed() -> None:
    try:
        original = _metadata.distribution("fms-acceleration")
    except _metadata.PackageNotFoundError:
        return
    raise ImportError(
        f"the original fms-acceleration {original.version} is installed, but the import system found the "
        f"stand-in of fms-acceleration-accelerate first ({__file__}). Import the original: make sure its "
        "installation directory comes before the stand-in's directory on sys.path (the stand-in is appended by "
        "fms_acceleration_accelerate_upstream_names.pth), or uninstall one of the two packages"
    )


_refuse_if_the_original_is_installed()

from fms_acceleration_accelerate.errors import AccelerationConfigError as AccelerationPluginConfigError  # noqa: E402
from fms_acceleration_accelerate.plugin import AccelerationPlugin  # noqa: E402

from .framework import AccelerationFramework  # noqa: E402

__all__ = ["AccelerationFramework", "AccelerationPlugin", "AccelerationPluginConfigError"]
