"""Footprint and decode speed of a fused LLaVA against the plain LLaVA it was converted from, in 4-bit and fp32.

For each model shape the plain LLaVA and its freshly converted fused twin are saved, then, per precision, loaded back
the same way (4-bit: `BitsAndBytesConfig` nf4 with double quant; fp32: plain float32) and compared:

* footprint: `get_memory_footprint()` of both and the fused model's `fuser_memory_footprint()` split;
* decode tokens/s: greedy `generate()` with one image, timing every generated token with a logits processor, so that
  the image encoding and prefill are measured apart from the decode steps; medians over interleaved repeats.

Shapes: `tiny` (hf_fusedvlm.tiny, float32) and `llava-7b`, LLaVA-1.5-7B's widths (CLIP-L/336 with 576 patches,
Llama-2-7B: hidden 4096, MLP 11008, 32 heads, vocab 32064) with random weights (4-bit computes in bfloat16). A
full-depth 7B does not fit the RAM this was written for, so the measured 7B-shaped model keeps all 24 vision layers
but only `--llm-layers` decoder layers (say so when quoting it); the full-depth footprint is computed on the meta
device with the same rule as `get_memory_footprint()` and transformers' own 4-bit skip logic, and that rule is checked
against the measured reduced-depth models first. Decode speed is what the fuser could change (it runs once per image,
before prefill).

    python benchmarks/bench_decode.py [--quick] [--fuser mmfuser] [--precisions 4bit,fp32] [--json results.json]
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModel,
    BitsAndBytesConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.logging import disable_progress_bar

from hf_fusedvlm import FUSERS, FusedLlavaForConditionalGeneration
from hf_fusedvlm.conversion import fused_config_from_llava, fused_from_llava
from hf_fusedvlm.tiny import build_tiny_llava

from llava_shapes import IMAGE_TOKEN_INDEX, LLAMA_7B, llava_1_5_config


PRECISIONS = ("4bit", "fp32")


class TokenClock(LogitsProcessor):
    """Records `time.perf_counter()` each time a token is chosen (once per generated token)."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def build_shape(name: str, llm_layers: int):
    """(plain LLaVA, generate() inputs, load dtype) for one benchmark shape."""
    if name == "tiny":
        llava, processor = build_tiny_llava(seed=0)
        image = torch.rand(3, 32, 32)
        inputs = processor(images=image, text="USER: <image>\nWhat is shown? ASSISTANT:", return_tensors="pt")
        return llava, dict(inputs), torch.float32
    torch.manual_seed(0)
    config = llava_1_5_config(text={**LLAMA_7B, "num_hidden_layers": llm_layers})
    llava = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    prompt = [1] + [IMAGE_TOKEN_INDEX] * 576 + list(range(400, 420))
    inputs = {"input_ids": torch.tensor([prompt]), "pixel_values": torch.rand(1, 3, 336, 336)}
    return llava, inputs, torch.bfloat16


def quantization_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


def meta_footprint(model_class, config, dtype: torch.dtype, precision: str) -> int:
    """What `get_memory_footprint()` reports for `model_class(config)` loaded in `precision`, computed on the meta
    device. fp32: 4 bytes per value. 4-bit (compute `dtype`): quantised Linear weights take half a byte per value
    (packed uint8; their absmax statistics are not parameters, as in `get_memory_footprint()`) except in the fp32
    module lists, `_keep_in_fp32_modules_strict` stays float32 for half dtypes, the rest takes `dtype`; buffers keep their own
    dtype."""
    with torch.device("meta"):
        model = model_class(config)
    total = sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
    if precision == "fp32":
        return total + sum(param.numel() * 4 for param in model.parameters())
    # The fused model keeps both fp32 lists out of quantisation (its from_pretrained adds the strict one to the skips).
    fp32_modules = [*model._keep_in_fp32_modules, *model._keep_in_fp32_modules_strict]
    not_converted = HfQuantizer.get_modules_to_not_convert(model, None, fp32_modules)
    keep_fp32 = list(model._keep_in_fp32_modules_strict) if dtype in (torch.float16, torch.bfloat16) else []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if (
                type(module) is nn.Linear
                and param_name == "weight"
                and should_convert_module(module_name, not_converted)
            ):
                total += param.numel() // 2
            elif keep_fp32 and not should_convert_module(module_name, keep_fp32):
                total += param.numel() * 4
            else:
                total += param.numel() * dtype.itemsize
    return total


def decode_run(model, inputs: dict, new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token: image encoding + prefill, decode tokens/s over the other tokens)."""
    clock = TokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
    return clock.stamps[0] - start, (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0])


def load_pair(folder: Path, precision: str, dtype: torch.dtype) -> dict:
    """The saved plain and fused models, loaded in `precision` (4-bit computes in `dtype`)."""
    if precision == "4bit":
        options = {"dtype": dtype, "quantization_config": quantization_config(dtype)}
    else:
        options = {"dtype": torch.float32}
    return {
        "plain": LlavaForConditionalGeneration.from_pretrained(folder / "plain", **options),
        "fused": AutoModel.from_pretrained(folder / "fused", **options),
    }


def time_decoding(models: dict, inputs: dict, repeats: int, new_tokens: int) -> dict:
    """Per model, the first-token seconds and decode tokens/s of `repeats` interleaved runs, their medians and the
    fused / plain ratios."""
    runs = {label: {"first_token_s": [], "decode_tokens_per_s": []} for label in models}
    for model in models.values():  # warm-up
        decode_run(model, inputs, 2)
    for repeat in range(repeats):
        order = ("plain", "fused") if repeat % 2 == 0 else ("fused", "plain")
        for label in order:
            first, rate = decode_run(models[label], inputs, new_tokens)
            runs[label]["first_token_s"].append(first)
            runs[label]["decode_tokens_per_s"].append(rate)
    medians = {label: {key: statistics.median(values) for key, values in run.items()} for label, run in runs.items()}
    return {
        "runs": runs,
        "median": medians,
        "decode_ratio": medians["fused"]["decode_tokens_per_s"] / medians["plain"]["decode_tokens_per_s"],
        "first_token_ratio": medians["fused"]["first_token_s"] / medians["plain"]["first_token_s"],
    }


def bench_shape(name: str, args, workdir: Path) -> dict:
    llava, inputs, dtype = build_shape(name, args.llm_layers)
    fused = fused_from_llava(llava, args.fuser)
    for label, model in (("plain", llava), ("fused", fused)):
        model.save_pretrained(workdir / name / label)
    configs = {"plain": llava.config, "fused": fused.config}
    classes = {"plain": LlavaForConditionalGeneration, "fused": FusedLlavaForConditionalGeneration}
    del llava, fused
    result = {
        "llm_layers": configs["plain"].text_config.num_hidden_layers,
        "vision_layers": configs["plain"].vision_config.num_hidden_layers,
        "new_tokens": args.new_tokens[name],
        "repeats": args.repeats,
        "precisions": {},
    }
    for precision in args.precisions:
        models = load_pair(workdir / name, precision, dtype)
        split = models["fused"].fuser_memory_footprint()
        measured = {label: model.get_memory_footprint() for label, model in models.items()}
        meta = {label: meta_footprint(classes[label], configs[label], dtype, precision) for label in models}
        if meta != measured:
            raise RuntimeError(f"{precision}: meta-device footprint {meta} disagrees with the measured {measured}")
        entry = {
            "compute_dtype": "float32" if precision == "fp32" else str(dtype).removeprefix("torch."),
            "footprint_bytes": measured,
            "fuser_bytes": split["fuser"],
            "fuser_share": split["share"],
        }
        entry.update(time_decoding(models, inputs, args.repeats, args.new_tokens[name]))
        result["precisions"][precision] = entry
        del models
    return result


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:,.1f}"


def full_depth_footprints(fuser: str, precisions: list[str]) -> dict:
    """Per precision, the meta-device footprint of the full 32-layer LLaVA-1.5-7B, plain and fused (4-bit computes
    in bfloat16, as the measured 7B-shaped model)."""
    config = llava_1_5_config()
    fused_config = fused_config_from_llava(config, fuser)
    return {
        precision: {
            "plain": meta_footprint(LlavaForConditionalGeneration, config, torch.bfloat16, precision),
            "fused": meta_footprint(FusedLlavaForConditionalGeneration, fused_config, torch.bfloat16, precision),
        }
        for precision in precisions
    }


def print_table(results: dict, full_depth: dict, fuser: str):
    print(f"\nfuser={fuser}; 4bit = nf4 with double quant; medians; ratio = fused / plain")
    print(
        "| shape | precision | plain MiB | fused MiB | fuser MiB (share) | plain tok/s | fused tok/s | decode ratio "
        "| first-token ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        label = f"{name}, {result['llm_layers']} LLM layers"
        for precision, entry in result["precisions"].items():
            footprint, median = entry["footprint_bytes"], entry["median"]
            print(
                f"| {label} | {precision} | {mib(footprint['plain'])} | {mib(footprint['fused'])} | "
                f"{mib(entry['fuser_bytes'])} ({entry['fuser_share']:.2%}) | "
                f"{median['plain']['decode_tokens_per_s']:.2f} | {median['fused']['decode_tokens_per_s']:.2f} | "
                f"{entry['decode_ratio']:.3f} | {entry['first_token_ratio']:.3f} |"
            )
    for precision, full in full_depth.items():
        added = full["fused"] - full["plain"]
        print(
            f"| llava-7b, 32 LLM layers (meta) | {precision} | {mib(full['plain'])} | {mib(full['fused'])} | "
            f"{mib(added)} ({added / full['fused']:.2%}) | - | - | - | - |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny shape only, few repeats (a smoke test)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, of 4bit and fp32")
    parser.add_argument("--fuser", default="mmfuser", choices=list(FUSERS))
    parser.add_argument("--llm-layers", type=int, default=2, help="decoder layers of the measured 7B-shaped model")
    parser.add_argument("--repeats", type=int, default=None, help="timed generate() calls per model (default 4)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 keeps medians steady on a shared machine)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench_decode.json"))
    args = parser.parse_args()
    if FUSERS[args.fuser].reads_instruction:
        others = ", ".join(name for name, fuser in FUSERS.items() if not fuser.reads_instruction)
        parser.error(f"{args.fuser} needs an instruction encoder and instruction inputs; benchmark one of {others}")
    args.precisions = [precision.strip() for precision in args.precisions.split(",") if precision.strip()]
    if not args.precisions or set(args.precisions) - set(PRECISIONS):
        parser.error(f"--precisions takes a comma-separated list of {', '.join(PRECISIONS)}, got {args.precisions}")
    args.repeats = args.repeats or (3 if args.quick else 4)
    args.new_tokens = {"tiny": 16 if args.quick else 64, "llava-7b": 24}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    disable_progress_bar()

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in ("tiny",) if args.quick else ("tiny", "llava-7b"):
            print(f"benchmarking {name} ...", flush=True)
            results[name] = bench_shape(name, args, Path(workdir))
    full_depth = full_depth_footprints(args.fuser, args.precisions)
    print_table(results, full_depth, args.fuser)
    report = {
        "fuser": args.fuser,
        "quick": args.quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
        "full_depth_footprint_bytes": full_depth,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
