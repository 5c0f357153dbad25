"""``fms_acceleration_moe``: the original fms-acceleration's import name for its mixture-of-experts plugin, provided
by fms-acceleration-accelerate-moe (config section ``training.moe.scattermoe``; upstream's ``ep_degree`` and
fms-hf-tuning's ``disable_distributed`` are read, see :mod:`fms_acceleration_accelerate_moe.config`).

Clients of the original (fms-hf-tuning's ``--fast_moe``) only check that this name can be found before they write
that section; the framework then activates the plugin through its entry point. The name exists only while this
plugin package is installed, and an installed original ``fms_acceleration_moe`` is found first (see the
``fms_acceleration`` stand-in).

The original's plugin class name ``ScatterMoEAccelerationPlugin`` is kept as an alias of
:class:`~fms_acceleration_accelerate_moe.ScatterMoEPlugin`. There is deliberately no ``fms_acceleration_moe.utils``:
the original needed its ``recover_safetensors_from_dcp`` to turn its distributed checkpoints back into the model's
format, whereas this plugin keeps the model's own expert parameters, so ``save_pretrained`` writes the model's
safetensors (under expert parallelism :meth:`~fms_acceleration_accelerate_moe.ScatterMoEPlugin.save_pretrained`
gathers the experts first). Clients that look for that function (fms-hf-tuning) then add no conversion step.
"""

from fms_acceleration_accelerate_moe import ScatterMoEConfig, ScatterMoEPlugin

from fms_acceleration_accelerate.upstream_plugin_names import warn_if_original_framework_installed

# the original framework imports every plugin name it finds, this stand-in included
warn_if_original_framework_installed("fms_acceleration_moe", "scattermoe", "fms-acceleration-moe")

# the original's class name
ScatterMoEAccelerationPlugin = ScatterMoEPlugin

__all__ = ["ScatterMoEAccelerationPlugin", "ScatterMoEConfig", "ScatterMoEPlugin"]
