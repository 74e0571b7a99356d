"""Serving fused LLaVA checkpoints with vLLM.

`register` is hf-fusedvlm's entry point in vLLM's `vllm.general_plugins` group: vLLM calls it in every process it
starts, so `vllm serve <fused checkpoint>` and `LLM(model=...)` find the native model of
[`vllm_model.FusedLlavaForConditionalGeneration`] with the package installed and the checkpoint unchanged.
"""

ARCHITECTURE = "FusedLlavaForConditionalGeneration"


def register() -> None:
    """Registers the fused architecture with vLLM's model registry (the model module is imported lazily) and its
    start-time config check, and the fused config and processor with transformers' Auto classes."""
    from vllm import ModelRegistry

    from hf_fusedvlm import register_auto_classes

    register_auto_classes()  # `fused_llava` with AutoConfig and AutoProcessor (vLLM has imported transformers)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}.vllm_model:{ARCHITECTURE}")
    # vLLM's per-architecture config hooks run before any worker starts: unservable checkpoints are refused there.
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .vllm_config import FusedLlavaConfigCheck

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, FusedLlavaConfigCheck)
