"""Routing a script's own ``from_pretrained`` to the plugin that loads the model.

Why: a plugin that owns loading (``requires_custom_loading``, e.g. 4-bit bitsandbytes QLoRA) only takes effect
when the model is loaded through it. Ordinary scripts load the model themselves: ``AutoModelForCausalLM.
from_pretrained(path)`` in the script, or TRL's ``SFTTrainer`` / the HF ``Trainer`` given a model path, which load
it before their ``Accelerator`` exists. Where an acceleration config is in play (a launched worker with a section,
or an :class:`~fms_acceleration_accelerate.accelerate_integration.AccelerationKwargs`),
:func:`~fms_acceleration_accelerate.accelerate_integration.install` replaces
``transformers.PreTrainedModel.from_pretrained`` (a classmethod, recorded in the Accelerator's patch recorder and
reverted by ``uninstall()``) by :class:`FromPretrainedRouter`:

* a causal-LM load (a ``*ForCausalLM`` class transformers' ``AutoModelForCausalLM`` maps to, or a remote-code
  ``*ForCausalLM`` with ``trust_remote_code``) without a ``quantization_config`` goes to
  ``framework.model_loader(path, **kwargs)`` of the process's framework, with one printed line saying so;
* every other load, every load while a plugin's own loader runs (its internal ``from_pretrained(
  quantization_config=...)``), and every load when no active plugin loads models, runs transformers' original;
* while a loading plugin is active, ``AutoConfig.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained``
  (which read the path before the concrete class does; TRL calls the first) check that a path exists, so a missing model path is reported as such (:func:`check_model_path`);
* a load the plugin cannot honour (an explicit ``quantization_config``, positional model arguments, a PEFT adapter
  directory, a subclass of a causal LM that ``AutoModelForCausalLM`` would not build) raises
  :class:`~fms_acceleration_accelerate.errors.AccelerationConfigError` naming the reason and the fix, before
  anything is read.

This module keeps no state of its own: a router lives in the classmethod it installs and holds a thread-local
re-entrancy depth.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import AccelerationConfigError

logger = logging.getLogger("fms_acceleration_accelerate")

ROUTER_ATTR = "__fms_acceleration_router__"
"""Attribute of the installed ``from_pretrained`` function that holds its :class:`FromPretrainedRouter`."""

# transformers-internal keyword arguments that AutoModel* adds when it calls the concrete class
_AUTO_INTERNAL = ("_from_auto", "adapter_kwargs")
_PATH_LIKE = re.compile(r"^(/|\.{1,2}(/|$)|~)")


# --------------------------------------------------------------------------------------------- model paths
class ModelPathError(AccelerationConfigError, OSError):
    """A model path that cannot be loaded. Also an ``OSError``, as transformers raises for a path it cannot read,
    so code that catches that keeps working."""


def check_model_path(model_name_or_path: Any, *, subfolder: str | None = None, need_config: bool = True) -> None:
    """Refuse a model path that does not exist locally and is not a Hugging Face Hub model id.

    Nothing is downloaded here: a hub id (``org/name``) is left to transformers, which finds it in the local
    cache or reports it its own way; anything that reads as a filesystem path (absolute, ``./``, ``../``, ``~``,
    more than one ``/``, an existing parent folder, an ``os.PathLike``) must exist and, with ``need_config``,
    hold a ``config.json``.

    Raises:
        ModelPathError: the message names the path and the fix.
    """
    if not isinstance(model_name_or_path, (str, os.PathLike)):
        raise ModelPathError(
            f"the model to load must be a path or a hub id, got {type(model_name_or_path).__name__}",
            fix="pass the folder that holds the model (saved with save_pretrained)",
        )
    text = os.fspath(model_name_or_path)
    folder = Path(text)
    if folder.exists():
        if need_config and folder.is_dir() and not subfolder and not (folder / "config.json").is_file():
            raise ModelPathError(
                f"model folder {text!r} has no config.json",
                fix="pass the folder written by save_pretrained (it holds config.json and the weights)",
            )
        return
    if not isinstance(model_name_or_path, str) or _reads_as_path(text):
        raise ModelPathError(f"model path {text!r} does not exist", fix=_missing_fix(folder))
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise ModelPathError(
            f"model path {text!r} does not exist, and it is not a Hugging Face Hub model id either",
            fix=_missing_fix(folder),
        ) from None


def _reads_as_path(text: str) -> bool:
    if _PATH_LIKE.match(text) or text.count("/") > 1 or "\\" in text:
        return True
    parent = os.path.dirname(text)
    return bool(parent) and os.path.isdir(parent)


def _missing_fix(folder: Path) -> str:
    existing = next((p for p in folder.parents if p.exists()), None)
    where = (
        f" (the nearest existing folder is {str(existing)!r})" if existing is not None and str(existing) != "." else ""
    )
    return f"pass the folder that holds the model's config.json and weights (saved with save_pretrained){where}"


# ------------------------------------------------------------------------------------------ class checks
def causal_lm_class_names() -> frozenset[str]:
    """Class names ``AutoModelForCausalLM`` maps model types to (read from transformers, no model imported)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update((value,) if isinstance(value, str) else value)
    return frozenset(names)


def _is_transformers_class(cls: type) -> bool:
    return (getattr(cls, "__module__", "") or "").startswith("transformers.")


def load_kind(cls: type, kwargs: dict[str, Any]) -> str:
    """``"route"``: a causal LM ``AutoModelForCausalLM`` builds; ``"subclass"``: a subclass of one that it would
    not build; ``"other"``: anything else (left to transformers)."""
    names = causal_lm_class_names()
    if _is_transformers_class(cls) and cls.__name__ in names:
        return "route"
    if any(_is_transformers_class(base) and base.__name__ in names for base in cls.__mro__[1:]):
        if kwargs.get("trust_remote_code") and cls.__name__.endswith("ForCausalLM"):
            return "route"  # a remote-code class (AutoModelForCausalLM builds it from the checkpoint's auto_map)
        return "subclass"
    if kwargs.get("trust_remote_code") and cls.__name__.endswith("ForCausalLM"):
        return "route"
    return "other"


# ------------------------------------------------------------------------------------------------- router
class FromPretrainedRouter:
    """The replacement of ``PreTrainedModel.from_pretrained`` (see the module docstring).

    Args:
        original: the classmethod object found in ``PreTrainedModel.__dict__`` (restored on revert).
        resolve: returns ``(framework, source)``: the process's
            :class:`~fms_acceleration_accelerate.framework.AccelerationFramework` for a load (``None`` when no
            acceleration config is in play) and a few words naming where its config came from; called only for
            causal-LM loads.
    """

    def __init__(self, original: Any, resolve: Callable[[], tuple[Any, str]]) -> None:
        if not isinstance(original, classmethod):
            raise TypeError(f"from_pretrained to route must be a classmethod, got {type(original).__name__}")
        self.original = original
        self.resolve = resolve
        self._local = threading.local()

    # ------------------------------------------------------------------ re-entrancy
    @property
    def passing_through(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def passthrough(self) -> Iterator[None]:
        """Inside this block (in this thread), ``from_pretrained`` is transformers' original: a plugin's loader
        calls it with its own ``quantization_config``."""
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    # ------------------------------------------------------------------ the classmethod
    def as_classmethod(self) -> classmethod:
        router = self
        original_function = self.original.__func__

        def from_pretrained(cls: type, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
            return router.load(cls, pretrained_model_name_or_path, model_args, kwargs)

        from_pretrained.__doc__ = original_function.__doc__
        from_pretrained.__name__ = original_function.__name__
        from_pretrained.__qualname__ = original_function.__qualname__
        from_pretrained.__wrapped__ = original_function  # type: ignore[attr-defined]
        setattr(from_pretrained, ROUTER_ATTR, self)
        return classmethod(from_pretrained)

    def path_checked_classmethod(self, original: Any) -> classmethod:
        """The replacement of ``AutoConfig.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained``:
        transformers' own, after a check that the path exists while a loading plugin is active (both read the
        path before the concrete class's ``from_pretrained`` runs, as does a trainer given a model path: a missing
        path is then reported by :func:`check_model_path`, not as a malformed hub id)."""
        router = self
        original_function = original.__func__

        def from_pretrained(cls: type, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
            if not router.passing_through and router.loading_active():
                check_model_path(pretrained_model_name_or_path, subfolder=kwargs.get("subfolder"), need_config=False)
            return original.__get__(None, cls)(pretrained_model_name_or_path, *args, **kwargs)

        from_pretrained.__doc__ = original_function.__doc__
        from_pretrained.__name__ = original_function.__name__
        from_pretrained.__qualname__ = original_function.__qualname__
        from_pretrained.__wrapped__ = original_function  # type: ignore[attr-defined]
        return classmethod(from_pretrained)

    def loading_active(self) -> bool:
        """Whether a load now would go to a plugin (the process's framework has a loading plugin)."""
        framework, _ = self.resolve()
        return framework is not None and framework.requires_custom_loading

    def call_original(self, cls: type, path: Any, model_args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.original.__get__(None, cls)(path, *model_args, **kwargs)

    def load(self, cls: type, path: Any, model_args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.passing_through:
            return self.call_original(cls, path, model_args, kwargs)
        kind = load_kind(cls, kwargs)
        if kind == "other":
            return self.call_original(cls, path, model_args, kwargs)
        framework, source = self.resolve()
        loaders = [p for p in framework.plugins if p.requires_custom_loading] if framework is not None else []
        if not loaders:
            return self.call_original(cls, path, model_args, kwargs)
        plugin = loaders[0]
        where = framework.config.path(plugin.matched_paths[0])
        call = f"{cls.__name__}.from_pretrained({os.fspath(path) if isinstance(path, os.PathLike) else path!r})"
        self._refuse_unroutable(call, cls, kind, plugin.plugin_name(), where, model_args, kwargs)
        translated = translate_kwargs(kwargs)
        from .framework import is_main_process

        if is_main_process():
            print(
                f"fms-acceleration: {call} loads through plugin {plugin.plugin_name()!r} ({where}, from "
                f"{source}), not transformers' own loader",
                flush=True,
            )
        logger.info("fms-acceleration: %s routed to %s.model_loader", call, plugin.plugin_name())
        model = framework.model_loader(path, **translated)
        if not isinstance(model, cls):
            raise AccelerationConfigError(
                f"{call} was routed to plugin {plugin.plugin_name()!r}, which built a {type(model).__name__}, not "
                f"a {cls.__name__}",
                path=where,
                fix="load with AutoModelForCausalLM.from_pretrained, or call framework.model_loader(...) directly",
            )
        return model

    @staticmethod
    def _refuse_unroutable(
        call: str,
        cls: type,
        kind: str,
        plugin: str,
        where: str,
        model_args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        reason = fix = None
        if kwargs.get("quantization_config") is not None:
            reason = (
                f"it passes its own quantization_config ({type(kwargs['quantization_config']).__name__}), while the "
                f"active plugin {plugin!r} quantizes the model as {where} configures it"
            )
            fix = f"drop quantization_config from the call (the plugin's options live under {where}), or remove {where}"
        elif model_args:
            reason = "it passes positional model arguments, which the plugin's loader does not take"
            fix = "pass them as keyword arguments (config=..., dtype=...)"
        elif (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path"):
            reason = "the path is a PEFT adapter folder, which the plugin's loader does not read"
            fix = "load the base model's path, then attach the adapter with peft.PeftModel.from_pretrained(model, adapter)"
        elif kind == "subclass":
            reason = (
                f"{cls.__name__} subclasses a transformers causal LM, and the plugin builds the class "
                "AutoModelForCausalLM chooses for the checkpoint"
            )
            fix = (
                "load with AutoModelForCausalLM.from_pretrained (or the transformers class itself), or load with "
                "framework.model_loader(...) and convert"
            )
        if reason is not None:
            raise AccelerationConfigError(
                f"{call} cannot be loaded through plugin {plugin!r}: {reason}", path=where, fix=fix
            )


def translate_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments as a plugin's ``model_loader`` takes them.

    Drops what ``AutoModel*`` adds for the concrete class (``_from_auto``, ``adapter_kwargs``), a ``device_map``
    of ``None`` (the loader places the model itself) and a ``quantization_config`` of ``None``; keeps everything
    else (``dtype`` / ``torch_dtype``, including ``"auto"``, ``device_map``, ``trust_remote_code``, ``config``,
    ``revision``, ``attn_implementation``, ...)."""
    out = {k: v for k, v in kwargs.items() if k not in _AUTO_INTERNAL}
    for key in ("device_map", "quantization_config"):
        if key in out and out[key] is None:
            del out[key]
    return out


def installed_router() -> FromPretrainedRouter | None:
    """The router installed on ``transformers.PreTrainedModel`` (``None`` when none is, or transformers'
    modeling module is not imported yet)."""
    module = sys.modules.get("transformers.modeling_utils")
    owner = getattr(module, "PreTrainedModel", None)
    if owner is None:
        return None
    raw = vars(owner).get("from_pretrained")
    return getattr(getattr(raw, "__func__", None), ROUTER_ATTR, None)


def plugin_loading() -> contextlib.AbstractContextManager[None]:
    """Context in which a plugin's ``model_loader`` runs: ``from_pretrained`` calls inside it are not routed."""
    router = installed_router()
    return router.passthrough() if router is not None else contextlib.nullcontext()


__all__ = [
    "ROUTER_ATTR",
    "FromPretrainedRouter",
    "ModelPathError",
    "causal_lm_class_names",
    "check_model_path",
    "installed_router",
    "load_kind",
    "plugin_loading",
    "translate_kwargs",
]
