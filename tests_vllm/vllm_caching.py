"""What vLLM's caches do with IGVA's instruction, measured on one engine, request after request.

    python tests_vllm/vllm_caching.py CHECKPOINT OUTPUT.json [--block-size 32]

CHECKPOINT: an igva checkpoint with the tiny test tokenizer. The requests, each sent alone once the previous one has
finished, all about the same image (`synthetic_vqa.make_sample(0, 0)`): "first" (a question), "repeat" (the same
again), "other instruction" (the same prompt with another instruction as `mm_processor_kwargs`), and the next turn of
the chat that "first" started, with its instruction from the last user turn ("next turn, last") and from the image's
turn (`instruction_turn="image"`; "next turn, image"). Each run of the chat prompt uses a new assistant answer, so no
earlier request holds that turn: what its prefix cache hits show is what the first turn left behind.
OUTPUT.json: per request, `prompt_tokens`, `cached_tokens` (vLLM's prefix-cache hit), `mm_cache_hit` (the image's
processed inputs came from vLLM's multimodal cache, whose key is also the encoder cache's) and `first_logprobs`.
"""

import argparse
import json
import os


FIRST_QUESTION = "Which colour does the little square have? Look at the whole picture before you answer the question."
SECOND_QUESTION = "And where is it?"
OTHER_INSTRUCTION = "Is there a square?"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from hf_fusedvlm.synthetic_vqa import make_sample

    processor = AutoProcessor.from_pretrained(args.checkpoint)
    llm = LLM(
        model=args.checkpoint,
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        seed=0,
        block_size=args.block_size,
        disable_log_stats=False,
    )
    image = make_sample(0, 0).image
    image_turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": FIRST_QUESTION}]}
    first = processor.apply_chat_template([image_turn], add_generation_prompt=True)

    def next_turn(answer: str) -> str:
        return processor.apply_chat_template(
            [
                image_turn,
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                {"role": "user", "content": [{"type": "text", "text": SECOND_QUESTION}]},
            ],
            add_generation_prompt=True,
        )

    requests = {
        "first": (first, {}),
        "repeat": (first, {}),
        "other instruction": (first, {"instructions": OTHER_INSTRUCTION}),
        "next turn, last": (next_turn("It is red."), {}),
        "next turn, image": (next_turn("It is blue."), {"instruction_turn": "image"}),
    }
    sampling = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    results = {}
    for name, (prompt, options) in requests.items():
        before = mm_cache_hits(llm)
        request = {"prompt": prompt, "multi_modal_data": {"image": image}}
        if options:
            request["mm_processor_kwargs"] = options
        output = llm.generate(request, sampling, use_tqdm=False)[0]
        results[name] = {
            "prompt_tokens": len(output.prompt_token_ids),
            "cached_tokens": output.num_cached_tokens,
            "mm_cache_hit": mm_cache_hits(llm) > before,
            "first_logprobs": {str(token): entry.logprob for token, entry in output.outputs[0].logprobs[0].items()},
        }
    with open(args.output, "w") as handle:
        json.dump(results, handle, indent=1)


def mm_cache_hits(llm) -> float:
    return sum(metric.value for metric in llm.get_metrics() if metric.name == "vllm:mm_cache_hits")


if __name__ == "__main__":
    main()
