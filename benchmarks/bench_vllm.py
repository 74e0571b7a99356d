"""Serving throughput in vLLM (through the package's plugin): each fuser against plain LLaVA, measured in one run.

Plain LLaVA is the `none` fuser served by the same plugin (one layer, the source model's projector): the same tower,
language model and kernels, so the ratios isolate what fusion costs. vLLM's own LLaVA class is not the baseline here:
on a CPU-only machine its module imports torchvision, whose PyPI wheels are CUDA builds.

For every fuser a checkpoint of the chosen shape (random weights, float32) is written, then served in its own process
(one engine per process, as vLLM runs): one warm-up batch, then `--repeats` timed batches of `--requests` prompts,
each with its own image, `--max-tokens` output tokens each (EOS ignored). Prints the median batch time, requests/s,
output tokens/s and the ratio to plain, and writes a JSON.

Shapes: `small` (default): a 12-layer, 256-wide CLIP at 224 px (256 patches) and a 4-layer, 512-wide Llama (head
size 64), IGVA with a 4-layer, 256-wide BERT sentence encoder. `--quick`: the tiny test model, a smoke run.

    python benchmarks/bench_vllm.py [--quick] [--fusers none,mmfuser,igva,concat,average] [--requests 16]
        [--max-tokens 32] [--repeats 3] [--tensor-parallel-size 1] [--json bench_vllm.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llava_shapes import llava_1_5_config


SMALL_VISION = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=12,
    num_attention_heads=4,
    image_size=224,
    patch_size=14,
    projection_dim=256,
)
SMALL_TEXT = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)
SMALL_ENCODER = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)


def build_small(fuser_type: str):
    """A `small`-shaped fused LLaVA (random weights) and its processor, from the tiny tokenizers."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
    )

    from hf_fusedvlm import FusedLlavaProcessor
    from hf_fusedvlm.conversion import fused_from_llava
    from hf_fusedvlm.tiny import (
        IMAGE_TOKEN,
        LLAVA_CHAT_TEMPLATE,
        build_tiny_instruction_tokenizer,
        build_tiny_llm_tokenizer,
    )

    torch.manual_seed(0)
    tokenizer = build_tiny_llm_tokenizer()
    tokenizer.model_max_length = SMALL_TEXT["max_position_embeddings"]
    text = dict(
        SMALL_TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = llava_1_5_config(SMALL_VISION, text)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    llava = LlavaForConditionalGeneration(config).eval()
    size = SMALL_VISION["image_size"]
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_pad=True, do_convert_rgb=True
    )
    llava_processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=SMALL_VISION["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    encoder = instruction_tokenizer = None
    if fuser_type == "igva":
        instruction_tokenizer = build_tiny_instruction_tokenizer()
        encoder_config = AutoConfig.for_model(
            "bert",
            vocab_size=len(instruction_tokenizer),
            max_position_embeddings=64,
            pad_token_id=instruction_tokenizer.pad_token_id,
            **SMALL_ENCODER,
        )
        encoder = AutoModel.from_config(encoder_config).eval()
    model = fused_from_llava(llava, fuser_type, instruction_encoder=encoder)
    return model, FusedLlavaProcessor.from_llava_processor(llava_processor, instruction_tokenizer=instruction_tokenizer)


def write_checkpoint(fuser_type: str, shape: str, folder: Path) -> None:
    from hf_fusedvlm.tiny import build_tiny_fused

    model, processor = build_small(fuser_type) if shape == "small" else build_tiny_fused(fuser_type, num_text_heads=2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def serve_and_time(args) -> None:
    """Worker: serve `args.checkpoint`, time the batches, print one JSON line."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from hf_fusedvlm import FusedLlavaProcessor
    from hf_fusedvlm.synthetic_vqa import make_sample, question_prompt

    processor = FusedLlavaProcessor.from_pretrained(args.checkpoint)
    image_size = processor.image_processor.crop_size["height"]
    llm = LLM(
        model=args.checkpoint,
        dtype="float32",
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_seqs=args.requests,
        enforce_eager=True,
        seed=0,
    )
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def batch(round_index: int) -> list[dict]:
        # Fresh images every round: vLLM caches encoded images, and a repeated image would skip the fuser.
        samples = [make_sample(round_index, index, image_size=image_size) for index in range(args.requests)]
        return [
            {"prompt": question_prompt(processor, sample.question), "multi_modal_data": {"image": sample.image}}
            for sample in samples
        ]

    llm.generate(batch(0), sampling, use_tqdm=False)
    timings = []
    for round_index in range(1, args.repeats + 1):
        prompts = batch(round_index)
        start = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        timings.append(time.perf_counter() - start)
        assert all(len(output.outputs[0].token_ids) == args.max_tokens for output in outputs)
    print("RESULT " + json.dumps({"batch_seconds": timings}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 requests of 4 tokens, 1 repeat")
    parser.add_argument("--fusers", default="none,mmfuser,igva,concat,average")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_and_time(args)
        return
    if args.quick:
        args.requests, args.max_tokens, args.repeats = 4, 4, 1
    shape = "tiny" if args.quick else "small"
    fusers = args.fusers.split(",")
    if "none" not in fusers:
        fusers.insert(0, "none")

    results = {}
    with tempfile.TemporaryDirectory() as root:
        for fuser_type in fusers:
            folder = Path(root) / fuser_type
            write_checkpoint(fuser_type, shape, folder)
            command = [
                sys.executable,
                __file__,
                "--worker",
                "--checkpoint",
                str(folder),
                "--requests",
                str(args.requests),
                "--max-tokens",
                str(args.max_tokens),
                "--repeats",
                str(args.repeats),
                "--tensor-parallel-size",
                str(args.tensor_parallel_size),
            ]
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                sys.exit(f"serving {fuser_type} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
            seconds = statistics.median(json.loads(lines[-1][len("RESULT ") :])["batch_seconds"])
            results[fuser_type] = {
                "median_batch_seconds": seconds,
                "requests_per_second": args.requests / seconds,
                "output_tokens_per_second": args.requests * args.max_tokens / seconds,
            }
    plain = results["none"]["requests_per_second"]
    for row in results.values():
        row["throughput_ratio_to_plain"] = row["requests_per_second"] / plain

    print(
        f"\nvLLM throughput, shape {shape}, {args.requests} requests x {args.max_tokens} tokens, "
        f"TP {args.tensor_parallel_size}, median of {args.repeats} ({platform.processor() or platform.machine()})"
    )
    print(f"{'fuser':<10}{'batch s':>10}{'req/s':>10}{'tok/s':>10}{'ratio':>8}")
    for fuser_type, row in results.items():
        print(
            f"{fuser_type:<10}{row['median_batch_seconds']:>10.3f}{row['requests_per_second']:>10.2f}"
            f"{row['output_tokens_per_second']:>10.1f}{row['throughput_ratio_to_plain']:>8.3f}"
        )
    if args.json:
        settings = {key: getattr(args, key) for key in ("requests", "max_tokens", "repeats", "tensor_parallel_size")}
        args.json.write_text(json.dumps({"shape": shape, "settings": settings, "results": results}, indent=2))


if __name__ == "__main__":
    main()
