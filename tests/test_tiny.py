"""The tiny models are the same in every process: tests in other engines' environments rebuild them and compare."""

import subprocess
import sys

import pytest
import torch

from hf_fusedvlm import FusedLlavaNextForConditionalGeneration, FusedLlavaNextProcessor
from hf_fusedvlm.tiny import build_tiny_fused, build_tiny_llava_next

from conftest import REPO_ROOT


FINGERPRINT = """
import hashlib, json
from hf_fusedvlm.tiny import build_tiny_fused
model, processor = build_tiny_fused("igva", num_text_heads=2, trained=True)
digest = hashlib.sha256()
for tokenizer in (processor.tokenizer, processor.instruction_tokenizer):
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode() + tensor.numpy().tobytes())
print(digest.hexdigest())
"""


def test_tiny_fused_model_and_tokenizers_are_identical_across_processes():
    runs = [
        subprocess.run([sys.executable, "-c", FINGERPRINT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert runs[0].stdout.strip() == runs[1].stdout.strip()


def test_tiny_fused_llava_next_has_the_head_size_vllm_serves_and_its_processor():
    model, processor = build_tiny_fused("igva", num_text_heads=2, trained=True, family="llava_next")
    assert isinstance(model, FusedLlavaNextForConditionalGeneration)
    assert isinstance(processor, FusedLlavaNextProcessor) and processor.instruction_tokenizer is not None
    text_config = model.config.text_config
    assert text_config.hidden_size // text_config.num_attention_heads == 32  # vLLM's CPU attention needs >= 32
    # trained=True moves the projector away from the plain LLaVA-NeXT it was converted from
    plain, _ = build_tiny_llava_next(num_text_heads=2)
    assert not torch.equal(
        model.model.multi_modal_projector.linear_1.weight[:, :64], plain.model.multi_modal_projector.linear_1.weight
    )
    with pytest.raises(ValueError, match="family='llava_next' \\(CLIP tower\\)"):
        build_tiny_fused("none", family="llava_next", vision_model_type="siglip_vision_model")
