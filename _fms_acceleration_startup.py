"""Interpreter start-up hook of fms-acceleration-accelerate (run from ``fms_acceleration_accelerate.pth``).

Why it exists: ``accelerate launch --config_file cfg.yaml train.py`` must accept a config with an
``acceleration:`` section, and the ``Accelerator()`` that ``train.py`` (or the HF Trainer / TRL inside it)
creates must pick that section up, although neither the ``accelerate`` command nor the script imports this
package.

What it does, at every interpreter start (it is deliberately tiny: only ``os``/``sys``, already loaded):

1. ``$FMS_ACCELERATION_DISABLE_HOOK=1`` -> nothing.
2. ``$FMS_ACCELERATION_SECTION`` set (a worker started by ``accelerate launch``; the variable holds the path of
   the section file its launcher wrote, and only its presence is checked here) -> registers one-shot
   import hooks: right after ``import accelerate`` completes, and again right after
   ``import transformers.modeling_utils`` completes, it calls
   ``fms_acceleration_accelerate.accelerate_integration.install()`` (idempotent; the second call installs the
   routing of ``from_pretrained`` to the section's loading plugin, which needs transformers' modeling module).
   While ``bitsandbytes`` is first imported (by whoever imports it: ``import peft`` does), bitsandbytes'
   warning that its optional CPU kernel from the Hugging Face hub cannot load because the ``kernels`` package
   is not installed is left out (see :func:`import_bitsandbytes`).
3. The process is ``accelerate launch`` / ``accelerate-launch`` / ``python -m accelerate.commands.launch``
   -> the same one-shot hook calls ``install_launcher_support()`` instead (config validation and export).
4. Anything else -> nothing; the cost is one environment lookup and a look at ``sys.argv``.

Nothing is imported eagerly: ``accelerate`` and this package are only imported when the process imports
``accelerate`` itself. Measure the inactive cost with ``python -X importtime -c pass`` (the line for
``_fms_acceleration_startup``).
"""

import os
import sys

DISABLE_ENV = "FMS_ACCELERATION_DISABLE_HOOK"
SECTION_ENV = "FMS_ACCELERATION_SECTION"
_TARGET = "accelerate"
_MODELING = "transformers.modeling_utils"
_LAUNCH_MODULES = ("accelerate.commands.launch", "accelerate.commands.accelerate_cli")


def is_launcher(argv=None, orig_argv=None):
    """True when this process is the ``accelerate launch`` command."""
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    if argv:
        program = os.path.basename(argv[0])
        if program == "accelerate-launch":
            return True
        if program == "accelerate" and len(argv) > 1 and argv[1] == "launch":
            return True
    for i, arg in enumerate(orig_argv[:-1]):
        if arg == "-m" and orig_argv[i + 1] in _LAUNCH_MODULES:
            rest = orig_argv[i + 2 :]
            return orig_argv[i + 1] == "accelerate.commands.launch" or (bool(rest) and rest[0] == "launch")
    return False


def mode(environ=None, argv=None, orig_argv=None):
    """``"worker"``, ``"launcher"`` or ``None`` (inactive)."""
    environ = os.environ if environ is None else environ
    if environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    if environ.get(SECTION_ENV):
        return "worker"
    if is_launcher(argv, orig_argv):
        return "launcher"
    return None


class _AfterImport:
    """A ``sys.meta_path`` finder that runs ``callback`` once, right after module ``name`` is executed.

    ``find_spec`` may be called without an import following (``importlib.util.find_spec`` availability
    checks, as transformers does for accelerate), so the finder stays in place until the module is actually
    executed, then removes itself.
    """

    def __init__(self, name, callback):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        from importlib.util import find_spec

        index = sys.meta_path.index(self)
        sys.meta_path.remove(self)  # let the real finders answer
        try:
            spec = find_spec(fullname)
        finally:
            sys.meta_path.insert(index, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_wrapped(module):
            self._exec(exec_module, module)

        spec.loader = _LoaderProxy(spec.loader, exec_wrapped)
        return spec

    def _exec(self, exec_module, module):
        exec_module(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)
            self.callback()


AfterImport = _AfterImport  # used by accelerate_integration to wait for transformers' modeling module


# bitsandbytes (on CPUs with AVX512-BF16) tries to load an optional CPU kernel from the Hugging Face hub
# when it is imported, through Hugging Face's `kernels` package, and logs a warning when that fails. Without the
# package (it is no dependency of this project, and nothing is downloaded at run time) that warning says nothing
# a user can act on: bitsandbytes goes on with its own CPU code. Only this one record is left out, and only
# while bitsandbytes is first imported.
_BNB = "bitsandbytes"
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_HUB_PACKAGE = "kernels"


class _HubKernelNotice:
    """``logging`` filter for bitsandbytes' CPU logger: drops the record that says the hub kernel could not be
    loaded *because the ``kernels`` package is not installed* (its argument is that ``ModuleNotFoundError``).
    The same message with another cause (``kernels`` installed but the download failed, or a folder shadowing
    the package) and every other record pass."""

    def __init__(self):
        self.dropped = False

    def filter(self, record):
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if (
            record.name == _BNB_CPU_LOGGER
            and isinstance(record.msg, str)
            and record.msg.startswith(_BNB_HUB_KERNEL_NOTICE)
            and isinstance(cause, ModuleNotFoundError)
            and cause.name == _HUB_PACKAGE
        ):
            self.dropped = True
            return False
        return True


def _exec_without_hub_kernel_notice(exec_module, module):
    """Execute bitsandbytes' ``module`` with :class:`_HubKernelNotice` on bitsandbytes' CPU logger, removed
    right after; when it dropped the record, one DEBUG line of ours says so."""
    import logging

    notice = _HubKernelNotice()
    cpu_logger = logging.getLogger(_BNB_CPU_LOGGER)
    cpu_logger.addFilter(notice)
    try:
        exec_module(module)
    finally:
        cpu_logger.removeFilter(notice)
    if notice.dropped:
        logging.getLogger("fms_acceleration_accelerate").debug(
            "bitsandbytes: its optional CPU kernel from the Hugging Face hub is not used (the 'kernels' package is "
            "not installed; nothing is downloaded at run time); bitsandbytes uses its own CPU code"
        )


class _QuietBitsandbytesImport(_AfterImport):
    """A ``sys.meta_path`` finder that runs the first import of bitsandbytes through
    :func:`_exec_without_hub_kernel_notice`, then removes itself (as :class:`_AfterImport`, it stays while
    bitsandbytes is only looked up, not imported)."""

    def __init__(self):
        super().__init__(_BNB, None)

    def _exec(self, exec_module, module):
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _exec_without_hub_kernel_notice(exec_module, module)


def import_bitsandbytes():
    """``import bitsandbytes``; the first import leaves out bitsandbytes' warning that its optional CPU kernel
    from the Hugging Face hub cannot load without the ``kernels`` package (see :class:`_HubKernelNotice`).
    An already imported bitsandbytes is returned as it is. Used by the bitsandbytes plugin's loader; launched
    workers get the same for whoever imports bitsandbytes first (see :func:`run`)."""
    if _BNB not in sys.modules and not any(isinstance(f, _QuietBitsandbytesImport) for f in sys.meta_path):
        finder = _QuietBitsandbytesImport()
        sys.meta_path.insert(0, finder)
        try:
            import bitsandbytes
        finally:
            if finder in sys.meta_path:  # bitsandbytes is not installed: the finder never ran
                sys.meta_path.remove(finder)
    import bitsandbytes

    return bitsandbytes


class _LoaderProxy:
    """Delegates to the real loader; only ``exec_module`` is replaced."""

    def __init__(self, loader, exec_module):
        self._loader = loader
        self.exec_module = exec_module

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _activate_worker():
    integration = sys.modules.get("fms_acceleration_accelerate.accelerate_integration")
    if integration is not None and not hasattr(integration, "install"):
        # the script imported the integration module first and it is importing accelerate right now;
        # it installs itself at the end of its own import (see its _install_for_launched_worker)
        return
    from fms_acceleration_accelerate.accelerate_integration import install

    install()


def _activate_launcher():
    from fms_acceleration_accelerate.accelerate_integration import install_launcher_support

    install_launcher_support()


def run():
    """Entry point called from the ``.pth`` file. Idempotent (site-packages may be processed twice)."""
    which = mode()
    if which is None:
        return
    if any(isinstance(f, _AfterImport) for f in sys.meta_path):
        return
    callback = _activate_worker if which == "worker" else _activate_launcher
    if which == "worker" and _BNB not in sys.modules:
        # the script's first import of bitsandbytes may come before anything of ours runs (`import peft` does it)
        sys.meta_path.insert(0, _QuietBitsandbytesImport())
    if which == "worker":
        # a script that loads its model with from_pretrained imports accelerate from *inside* transformers'
        # modeling module: routing from_pretrained to the loading plugin can only be installed once that import
        # is complete, so the worker also waits for it (install() is idempotent)
        sys.meta_path.insert(0, _AfterImport(_MODELING, callback))
    if _TARGET in sys.modules:
        callback()
        return
    sys.meta_path.insert(0, _AfterImport(_TARGET, callback))
