"""Importing vLLM's LLaVA modules where torchvision cannot be imported.

vLLM's `llava_next` model imports its `llava` module, which imports its `pixtral` module, which imports one helper
(`_num_image_tokens`) from transformers' torchvision image processor for Pixtral; that module imports torchvision
first. On a CPU-only machine torchvision is absent (`./dev.sh setup-vllm` removes it: PyPI's wheels are CUDA builds
whose operators fail to register beside a CPU torch), so vLLM's LLaVA and LLaVA-NeXT modules cannot be imported
although neither uses torchvision. transformers' PIL image processor for Pixtral defines the same helper without
torchvision; `allow_llava_imports_without_torchvision` puts a stand-in module that offers it under the torchvision
module's name, and nothing else: anything else asked of it raises an `ImportError` saying that torchvision is missing.
"""

import sys
import types


PIXTRAL_TORCHVISION_MODULE = "transformers.models.pixtral.image_processing_pixtral"


def torchvision_imports() -> bool:
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
    except (ImportError, RuntimeError):  # absent, or a build whose operators do not match torch
        return False
    return True


def allow_llava_imports_without_torchvision() -> None:
    """Where torchvision cannot be imported (and the module is not imported yet), registers the stand-in for
    transformers' torchvision image processor for Pixtral in `sys.modules`; does nothing otherwise."""
    if PIXTRAL_TORCHVISION_MODULE in sys.modules or torchvision_imports():
        return
    from transformers.models.pixtral import image_processing_pil_pixtral

    stand_in = types.ModuleType(
        PIXTRAL_TORCHVISION_MODULE, "A stand-in (torchvision is not installed): only `_num_image_tokens`."
    )
    stand_in._num_image_tokens = image_processing_pil_pixtral._num_image_tokens

    def missing(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"{PIXTRAL_TORCHVISION_MODULE}.{name} needs torchvision, which cannot be imported here (hf-fusedvlm's vLLM "
            "plugin stood in for this module so that vLLM's LLaVA models import without it). Install the torchvision "
            "build that matches your torch, or use the PIL image processor (PixtralImageProcessorPil)."
        )

    stand_in.__getattr__ = missing
    sys.modules[PIXTRAL_TORCHVISION_MODULE] = stand_in
