"""Packaging glue for the interpreter start-up hook only; all metadata lives in pyproject.toml.

``fms_acceleration_accelerate.pth`` must land at the top of site-packages (next to the packages), which
setuptools does not do for data files. Two small command subclasses put it there:

* regular installs / wheels: ``build_py`` copies it into the root of ``build_lib`` (so it is in the wheel);
* editable installs (``pip install -e .``, PEP 660): ``editable_wheel`` adds it to the root of the editable
  wheel next to setuptools' own ``__editable__*.pth`` (whose name sorts first, so our hook module is
  importable when our ``.pth`` runs).

See ``_fms_acceleration_startup.py`` for what the hook does (nothing unless an acceleration section is in play).

A second start-up file, ``fms_acceleration_accelerate_upstream_names.pth``, holds only directory lines: the
folders with the stand-ins for the original fms-acceleration's import names (``fms_acceleration``,
``fms_acceleration_peft``, ``fms_acceleration_foak``, ``fms_acceleration_aadp``,
``fms_acceleration_moe``, ``fms_acceleration_odm``). Python appends such folders to ``sys.path`` after
site-packages and only when they exist, so an installed original is always found first, and a plugin's name
exists only while that plugin is installed. Wheels get lines relative to site-packages; editable installs get the
checkout's folders (plus the relative lines, for plugins installed from wheels next to an editable core).

Only our packages become importable, never the checkout's root: the root holds folders that are not packages
(``kernels/``, ``plugins/``, ``tests/``, ``benchmarks/``...), and with the root on ``sys.path`` any of them would
import as a namespace package, e.g. ``import kernels`` would find the ``kernels/`` folder instead of Hugging Face's
``kernels`` package (which bitsandbytes and transformers import). setuptools' default (lenient) editable mode maps
each of our top-level names to its folder through a finder (it puts a folder on ``sys.path`` only for a src layout,
``package-dir = {"" = ...}``, which this project does not have); ``editable_mode=strict`` links the same files into
``build/``. ``editable_mode=compat`` would put the root itself on ``sys.path``, so it is refused.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel
from setuptools.errors import OptionError

PTH_NAME = "fms_acceleration_accelerate.pth"
PTH_SOURCE = Path(__file__).resolve().parent / PTH_NAME

UPSTREAM_PTH_NAME = "fms_acceleration_accelerate_upstream_names.pth"
UPSTREAM_NAME_DIRS = (
    # (folder in this checkout, the same folder relative to site-packages once its package is installed)
    ("fms_acceleration_accelerate/upstream_names", "fms_acceleration_accelerate/upstream_names"),
    (
        "plugins/accelerated-peft/src/fms_acceleration_accelerate_peft/upstream_names",
        "fms_acceleration_accelerate_peft/upstream_names",
    ),
    (
        "plugins/fused-ops-and-kernels/src/fms_acceleration_accelerate_foak/upstream_names",
        "fms_acceleration_accelerate_foak/upstream_names",
    ),
    (
        "plugins/attention-and-distributed-packing/src/fms_acceleration_accelerate_aadp/upstream_names",
        "fms_acceleration_accelerate_aadp/upstream_names",
    ),
    (
        "plugins/accelerated-moe/src/fms_acceleration_accelerate_moe/upstream_names",
        "fms_acceleration_accelerate_moe/upstream_names",
    ),
    (
        "plugins/online-data-mixing/src/fms_acceleration_accelerate_odm/upstream_names",
        "fms_acceleration_accelerate_odm/upstream_names",
    ),
)


def upstream_names_pth(editable: bool) -> str:
    """Text of ``fms_acceleration_accelerate_upstream_names.pth`` (directory lines only: nothing is imported)."""
    lines = ["# fms-acceleration-accelerate: stand-ins for the original fms-acceleration's import names"]
    for in_checkout, in_site_packages in UPSTREAM_NAME_DIRS:
        if editable:
            lines.append(str(PTH_SOURCE.parent / in_checkout))
        lines.append(in_site_packages)
    return "\n".join(lines) + "\n"


class BuildPyWithPth(build_py):
    """``build_py`` that also places the start-up ``.pth`` at the root of ``build_lib``."""

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(str(PTH_SOURCE), str(Path(self.build_lib) / PTH_NAME), preserve_mode=False)
            Path(self.build_lib, UPSTREAM_PTH_NAME).write_text(upstream_names_pth(editable=False), encoding="utf-8")

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib) / PTH_NAME))
            outputs.append(str(Path(self.build_lib) / UPSTREAM_PTH_NAME))
        return outputs


class EditableWheelWithPth(editable_wheel):
    """``editable_wheel`` that also writes the start-up ``.pth`` into the editable wheel's root."""

    def initialize_options(self):
        if not hasattr(editable_wheel, "_install_namespaces"):  # guards a future setuptools change
            raise RuntimeError(
                "this setuptools has no editable_wheel._install_namespaces, so the start-up hook cannot be "
                "installed in editable mode; use 'pip install .' or setuptools<=84"
            )
        super().initialize_options()

    def finalize_options(self):
        super().finalize_options()
        if str(self.mode or "").strip().lower() == "compat":
            raise OptionError(
                "editable_mode=compat is not supported for fms-acceleration-accelerate: it puts the checkout's root "
                "folder on sys.path, where its folders that are not packages (kernels/, plugins/, tests/, ...) would "
                "import as namespace packages and hide installed packages of the same name (e.g. 'kernels'); install "
                "with 'pip install -e .' (default mode) or '--config-settings editable_mode=strict'"
            )

    def _install_namespaces(self, installation_dir, pth_prefix):
        # setuptools calls this with the root of the unpacked editable wheel; everything written there is
        # packed into the wheel and installed into site-packages
        super()._install_namespaces(installation_dir, pth_prefix)
        Path(installation_dir, PTH_NAME).write_text(PTH_SOURCE.read_text(encoding="utf-8"), encoding="utf-8")
        Path(installation_dir, UPSTREAM_PTH_NAME).write_text(upstream_names_pth(editable=True), encoding="utf-8")


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
