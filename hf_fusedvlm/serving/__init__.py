"""Serving fused LLaVA checkpoints with vLLM.

`register` is hf-fusedvlm's entry point in vLLM's `vllm.general_plugins` group: vLLM calls it in every process it
starts, so `vllm serve <fused checkpoint>` and `LLM(model=...)` find the native models of
[`vllm_model.FusedLlavaForConditionalGeneration`] (fused LLaVA-1.5) and
[`vllm_model_next.FusedLlavaNextForConditionalGeneration`] (fused LLaVA-NeXT) with the package installed and the
checkpoint unchanged.
"""

ARCHITECTURE = "FusedLlavaForConditionalGeneration"
NEXT_ARCHITECTURE = "FusedLlavaNextForConditionalGeneration"
# Each architecture a fused checkpoint's config.json names, and the module of its vLLM model (imported lazily).
ARCHITECTURES = {ARCHITECTURE: "vllm_model", NEXT_ARCHITECTURE: "vllm_model_next"}


def register() -> None:
    """Registers the fused architectures with vLLM's model registry (the model modules are imported lazily) and their
    start-time config check, and the fused configs and processors with transformers' Auto classes."""
    from vllm import ModelRegistry

    import hf_fusedvlm  # noqa: F401  (registers `fused_llava` and `fused_llava_next` with AutoConfig and AutoProcessor)

    supported = ModelRegistry.get_supported_archs()
    for architecture, module in ARCHITECTURES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, f"{__name__}.{module}:{architecture}")
    # vLLM's per-architecture config hooks run before any worker starts: unservable checkpoints are refused there.
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .vllm_config import FusedLlavaConfigCheck

    for architecture in ARCHITECTURES:
        MODELS_CONFIG_MAP.setdefault(architecture, FusedLlavaConfigCheck)
