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

        def exec_then_callback(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
                self.callback()

        spec.loader = _LoaderProxy(spec.loader, exec_then_callback)
        return spec


AfterImport = _AfterImport  # used by accelerate_integration to wait for transformers' modeling module


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
    if which == "worker":
        # a script that loads its model with from_pretrained imports accelerate from *inside* transformers'
        # modeling module: routing from_pretrained to the loading plugin can only be installed once that import
        # is complete, so the worker also waits for it (install() is idempotent)
        sys.meta_path.insert(0, _AfterImport(_MODELING, callback))
    if _TARGET in sys.modules:
        callback()
        return
    sys.meta_path.insert(0, _AfterImport(_TARGET, callback))
