"""Greedy generation with vLLM, run in its own process by the tests (each engine starts and stops cleanly).

    python tests_vllm/vllm_generate.py REQUESTS.json OUTPUT.json --tensor-parallel-size N

REQUESTS.json: `{"checkpoint": folder, "max_tokens": n, "requests": [{"prompt": str, "image_index": int,
"instructions": str (optional, sent as mm_processor_kwargs), "image_shape": [height, width] (optional)}]}`; images are
`synthetic_vqa.make_sample(0, index)`, resized to `image_shape` when given (see `request_image`);
with `"image_embeds": [1, num_tokens, hidden]` instead of `image_index`, zero image embeddings are sent (and vLLM's
`enable_mm_embeds` is on), each alone after the other requests; `"model_impl": "transformers"` serves through vLLM's
Transformers modeling backend with the checkpoint's remote code (`transformers_backend_options`) instead of the
package's plugin; `"tower_memory": true` also runs `layers_alive_at_fusion` inside the engine's worker.
OUTPUT.json: one `{"token_ids": [...], "first_logprobs": {token_id: logprob}}` per request, in order; for a request
that `LLM.generate` refuses, `{"error": its traceback}`; with `tower_memory`, `{"tower_memory": ...}` last.
"""

import argparse
import json
import os
import traceback


def transformers_backend_options() -> dict:
    """The options of `vllm.LLM` that serve a fused LLaVA-1.5 through vLLM's Transformers modeling backend: the
    checkpoint's remote code, with the base model under `AutoModel` (fused checkpoints name the generation class there,
    for transformers' users). The package's vLLM plugin is left unloaded (`VLLM_PLUGINS` naming none): importing the
    package registers the generation class with `AutoModel` in-process, which wins over the checkpoint's code."""
    os.environ["VLLM_PLUGINS"] = ""
    return {
        "model_impl": "transformers",
        "trust_remote_code": True,
        "hf_overrides": {"auto_map": {"AutoModel": "modeling_fused_llava.FusedLlavaModel"}},
    }


def layers_alive_at_fusion(model) -> dict:
    """Run in the engine's worker on the served model: five random crops through `fused_crop_features`, recording
    for every tower layer whether its output tensor is still alive when the fuser starts (weak references)."""
    import weakref

    import torch

    layers = model.vision_tower.vision_model.encoder.layers
    outputs, alive = [], []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(weakref.ref(out))) for layer in layers]
    hooks.append(model.fuser.register_forward_pre_hook(lambda _m, _a: alive.append([o() is not None for o in outputs])))
    size = model.config.vision_config.image_size
    try:
        with torch.no_grad():
            model.fused_crop_features(torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0)), None)
    finally:
        for hook in hooks:
            hook.remove()
    return {"layers_run": len(layers), "alive_when_the_fuser_starts": alive}


def request_image(request: dict):
    """The image of a request: `make_sample(0, image_index)`'s, resized to `image_shape` (height, width) if given."""
    from hf_fusedvlm.synthetic_vqa import make_sample

    image = make_sample(0, request["image_index"]).image
    if "image_shape" in request:
        height, width = request["image_shape"]
        image = image.resize((width, height))
    return image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("requests")
    parser.add_argument("output")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args()
    spec = json.loads(open(args.requests).read())
    # A fixed 1 GiB KV cache instead of a share of the machine's memory, which other processes may hold.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    options = transformers_backend_options() if spec.get("model_impl") == "transformers" else {}
    if spec.get("tower_memory"):
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model sends a function to the engine

    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=spec["checkpoint"],
        dtype="float32",
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=256,
        max_num_seqs=8,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 2},
        seed=0,
        enable_mm_embeds=any("image_embeds" in request for request in spec["requests"]),
        **options,
    )
    if llm.llm_engine.model_config.using_transformers_backend() != bool(options):
        raise SystemExit(f"vLLM served {spec['checkpoint']} with {llm.llm_engine.model_config.architecture}")
    prompts = []
    for request in spec["requests"]:
        if "image_embeds" in request:
            image = torch.zeros(request["image_embeds"])
        else:
            image = request_image(request)
        prompt = {"prompt": request["prompt"], "multi_modal_data": {"image": image}}
        if "instructions" in request:
            prompt["mm_processor_kwargs"] = {"instructions": request["instructions"]}
        prompts.append(prompt)
    sampling = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=5)
    # The requests with images in one batch, then each with embeddings alone, so that refusing it refuses nothing else.
    with_embeds = ["image_embeds" in request for request in spec["requests"]]
    batch = [prompt for prompt, embeds in zip(prompts, with_embeds) if not embeds]
    outputs = iter(llm.generate(batch, sampling, use_tqdm=False) if batch else [])
    results = []
    for prompt, embeds in zip(prompts, with_embeds):
        if not embeds:
            results.append(result(next(outputs)))
            continue
        try:
            results.append(result(llm.generate(prompt, sampling, use_tqdm=False)[0]))
        except Exception as error:
            results.append({"error": "".join(traceback.format_exception(error))})
    if spec.get("tower_memory"):
        # By reference from this file imported as a module (on the engine processes' path too): the engine passes
        # the function on to its worker with pickle, which cannot send a function of a `__main__` script.
        from vllm_generate import layers_alive_at_fusion as by_reference

        results.append({"tower_memory": llm.apply_model(by_reference)[0]})
    with open(args.output, "w") as handle:
        json.dump(results, handle)


def result(output) -> dict:
    """The greedy tokens and the first step's top log-probabilities of one request's output."""
    completion = output.outputs[0]
    first = completion.logprobs[0]
    return {
        "token_ids": list(completion.token_ids),
        "first_logprobs": {str(token): entry.logprob for token, entry in first.items()},
    }


if __name__ == "__main__":
    main()
