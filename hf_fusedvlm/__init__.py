"""hf-fusedvlm: multi-layer visual feature fusion (MMFuser, IGVA and baselines) for LLaVA in Transformers.

Importing the package registers both model families, `fused_llava` (LLaVA-1.5) and `fused_llava_next` (LLaVA-NeXT),
with `AutoConfig`, `AutoModel` and `AutoModelForImageTextToText` (both model keys map to the generation class, so
`AutoModel` + `generate()` works) and their processors with `AutoProcessor`, and marks the classes for `auto_map` so
that `save_pretrained` writes checkpoints loadable with `trust_remote_code=True`.

The import itself stays light (no torch, no transformers), so that the package's commands answer `--help` and bad
arguments at once: the public classes load on first use (PEP 562), and the registration runs as soon as transformers
is imported (at once when it already is), before any Auto class can be used.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from contextlib import contextmanager


__version__ = "0.1.0"

# Each public name and the module that defines it, imported on first use.
_EXPORTS = {
    "FUSERS": "fusers",
    "Fuser": "fusers",
    "FuserField": "fusers",
    "FuserOutput": "fusers",
    "build_fuser": "fusers",
    "fuser_class": "fusers",
    "register_fuser": "fusers",
    "FusedLlavaConfig": "configuration_fused_llava",
    "FusedLlavaForConditionalGeneration": "modeling_fused_llava",
    "FusedLlavaModel": "modeling_fused_llava",
    "FusedLlavaPreTrainedModel": "modeling_fused_llava",
    "FusedLlavaProcessor": "processing_fused_llava",
    "instruction_from_conversation": "processing_fused_llava",
    "instruction_from_prompt": "processing_fused_llava",
    "FusedLlavaNextConfig": "configuration_fused_llava_next",
    "FusedLlavaNextForConditionalGeneration": "modeling_fused_llava_next",
    "FusedLlavaNextModel": "modeling_fused_llava_next",
    "FusedLlavaNextPreTrainedModel": "modeling_fused_llava_next",
    "FusedLlavaNextProcessor": "processing_fused_llava_next",
}

_registered = False
_registering = False
_paused = 0
_own_imports = 0  # package modules being executed right now (imports nest)


def register_auto_classes() -> None:
    """Register `fused_llava` and `fused_llava_next` with transformers' Auto classes and mark the classes for
    `auto_map` (idempotent).

    Importing the package does this as soon as transformers is imported; the commands call it after parsing their
    arguments ([`auto_registration_deferred`])."""
    global _registered, _registering
    if _registered or _registering:
        return
    _registering = True
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

        from .configuration_fused_llava import FusedLlavaConfig
        from .configuration_fused_llava_next import FusedLlavaNextConfig
        from .modeling_fused_llava import FusedLlavaForConditionalGeneration
        from .modeling_fused_llava_next import FusedLlavaNextForConditionalGeneration
        from .processing_fused_llava import FusedLlavaProcessor
        from .processing_fused_llava_next import FusedLlavaNextProcessor

        for config_class, model_class, processor_class in (
            (FusedLlavaConfig, FusedLlavaForConditionalGeneration, FusedLlavaProcessor),
            (FusedLlavaNextConfig, FusedLlavaNextForConditionalGeneration, FusedLlavaNextProcessor),
        ):
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            AutoModel.register(config_class, model_class, exist_ok=True)
            AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
            config_class.register_for_auto_class()
            model_class.register_for_auto_class("AutoModelForImageTextToText")
            AutoProcessor.register(config_class, processor_class, exist_ok=True)
            processor_class.register_for_auto_class()
        _registered = True
    finally:
        _registering = False
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


@contextmanager
def auto_registration_deferred():
    """Within the block, importing transformers does not register the Auto classes (so imports no torch for them);
    leaving it normally registers them if transformers was imported. An exception (argparse's exit after `--help` or
    a bad argument included) leaves without registering. The commands parse their arguments so."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1
    _register_when_ready()


def _register_when_ready() -> None:
    """Register once transformers is imported, unless deferred or inside the import of a package module (its names
    would not be defined yet: the registration waits for the outermost one to finish)."""
    if not _registered and not _paused and not _own_imports and "transformers" in sys.modules:
        register_auto_classes()


class _RegistrationHook(importlib.abc.MetaPathFinder):
    """Registers right after `transformers` (its lazy top-level module, before any submodule) or, when a package
    module imported transformers, that module has executed; leaves `sys.meta_path` once registered. It only wraps the
    `exec_module` of the spec the usual finders give, so finding a module without importing it changes nothing."""

    def find_spec(self, fullname, path=None, target=None):
        own = fullname.startswith(f"{__name__}.")
        if fullname != "transformers" and not own:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, exec_module = spec.loader, spec.loader.exec_module

        def exec_then_register(module):
            global _own_imports
            del loader.exec_module  # the loader's own method again
            _own_imports += own
            try:
                exec_module(module)
            finally:
                _own_imports -= own
            _register_when_ready()

        loader.exec_module = exec_then_register
        return spec


_HOOK = _RegistrationHook()


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if "transformers" in sys.modules:
    register_auto_classes()
else:
    sys.meta_path.insert(0, _HOOK)


__all__ = [
    "FUSERS",
    "Fuser",
    "FuserField",
    "FusedLlavaConfig",
    "FusedLlavaForConditionalGeneration",
    "FusedLlavaModel",
    "FusedLlavaNextConfig",
    "FusedLlavaNextForConditionalGeneration",
    "FusedLlavaNextModel",
    "FusedLlavaNextPreTrainedModel",
    "FusedLlavaNextProcessor",
    "FusedLlavaPreTrainedModel",
    "FusedLlavaProcessor",
    "FuserOutput",
    "auto_registration_deferred",
    "build_fuser",
    "fuser_class",
    "instruction_from_conversation",
    "instruction_from_prompt",
    "register_auto_classes",
    "register_fuser",
]
