"""Evaluation harness integrations.

`lmms_eval_models` is the package's entry point in lmms-eval's `lmms_eval.models` group: with the `eval` extra
installed, `lmms-eval --model fused_llava --model_args pretrained=PATH` evaluates a fused LLaVA checkpoint (see
`hf_fusedvlm.evaluation.lmms_eval_model`). Nothing here imports lmms-eval until lmms-eval itself asks.
"""

_MODEL_MODULE = "hf_fusedvlm.evaluation.lmms_eval_model"


def lmms_eval_models():
    """The `fused_llava` model manifest for lmms-eval's model registry: the chat model (tasks' `doc_to_messages`,
    the default) and the simple model (`--force_simple`: `doc_to_text` prompts and log-likelihood tasks)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id="fused_llava",
        chat_class_path=f"{_MODEL_MODULE}.FusedLlava",
        simple_class_path=f"{_MODEL_MODULE}.FusedLlavaSimple",
    )


__all__ = ["lmms_eval_models"]
