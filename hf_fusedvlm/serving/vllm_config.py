"""Start-time checks of a fused checkpoint against the vLLM it is served by.

vLLM runs `FusedLlavaConfigCheck.verify_and_update_config` while it builds its engine config, in the process that
parsed the command line or called `LLM(...)`, before any worker starts: a checkpoint this vLLM cannot serve is refused
there, with one line saying why, instead of a server that reports ready and fails its first request.
"""

from vllm.model_executor.models.config import VerifyAndUpdateConfig


class UnservableCheckpointError(RuntimeError):
    """A fused checkpoint that this vLLM installation cannot serve; the message says why and what to do.

    Not a `ValueError`: vLLM's config is a pydantic dataclass, which would fold a `ValueError` into a multi-line
    validation report; this error reaches the user as the last line of the traceback, as it is."""


def text_head_size(vllm_config) -> int:
    """The language model's attention head size, as vLLM computes it for the KV cache."""
    return vllm_config.model_config.get_head_size()


def unsupported_head_size_message(vllm_config) -> str | None:
    """Why the CPU attention backend cannot run this checkpoint's language model, or `None` if it can.

    vLLM picks its CPU attention backend without looking at the head size, and the kernel refuses an unsupported one
    only when the first request reaches it; GPU backends check the head size when they are chosen, at start."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.selector import AttentionSelectorConfig

    model_config = vllm_config.model_config
    head_size = text_head_size(vllm_config)
    selector = AttentionSelectorConfig(
        head_size=head_size, dtype=model_config.dtype, kv_cache_dtype=None, block_size=None
    )
    backend = resolve_obj_by_qualname(
        current_platform.get_attn_backend_cls(vllm_config.attention_config.backend, attn_selector_config=selector)
    )
    if backend.supports_head_size(head_size):
        return None
    text_config = model_config.hf_config.text_config
    supported = ", ".join(str(size) for size in backend.get_supported_head_sizes())
    return (
        f"{model_config.model} cannot be served on this CPU: its language model has attention head size {head_size} "
        f"(hidden_size {text_config.hidden_size} / {text_config.num_attention_heads} heads), and vLLM's CPU attention "
        f"({backend.get_name()}) supports head sizes {supported}. `fusedvlm-convert --demo --output DIR` writes a "
        "tiny checkpoint with head size 32; transformers serves any head size."
    )


class FusedLlavaConfigCheck(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`) for `FusedLlavaForConditionalGeneration`."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        message = unsupported_head_size_message(vllm_config)
        if message is not None:
            raise UnservableCheckpointError(message)
