"""4-bit footprint and decode speed of a fused LLaVA against the plain LLaVA it was converted from (issue 5).

For each model shape the plain LLaVA and its freshly converted fused twin are saved, loaded back with the same
`BitsAndBytesConfig` (nf4, double quant) and compared:

* footprint: `get_memory_footprint()` of both and the fused model's `fuser_memory_footprint()` split;
* decode tokens/s: greedy `generate()` with one image, timing every generated token with a logits processor, so that
  the image encoding and prefill are measured apart from the decode steps; medians over interleaved repeats.

Shapes: `tiny` (hf_fusedvlm.tiny, float32) and `llava-7b`, LLaVA-1.5-7B's widths (CLIP-L/336 with 576 patches,
Llama-2-7B: hidden 4096, MLP 11008, 32 heads, vocab 32064) in bfloat16 with random weights. A full-depth 7B does not
fit the RAM this was written for, so the measured 7B-shaped model keeps all 24 vision layers but only `--llm-layers`
decoder layers (say so when quoting it); the full-depth 4-bit footprint is computed on the meta device with the same
rule as `get_memory_footprint()` and transformers' own skip logic, and that rule is checked against the measured
reduced-depth models first. Decode speed is what the fuser could change (it runs once per image, before prefill).

    python benchmarks/bench_quantized_decode.py [--quick] [--fuser mmfuser] [--json results.json]
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

from hf_fusedvlm import FusedLlavaForConditionalGeneration
from hf_fusedvlm.converting import fused_config_from_llava, fused_from_llava
from hf_fusedvlm.tiny import build_tiny_llava
from llava_shapes import IMAGE_TOKEN_INDEX, LLAMA_7B, llava_1_5_config




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


def meta_4bit_footprint(model_class, config, dtype: torch.dtype) -> int:
    """What `get_memory_footprint()` reports for `model_class(config)` loaded in bnb 4-bit with `dtype`, computed on
    the meta device: quantised Linear weights take half a byte per value (packed uint8; their absmax statistics are
    not parameters, as in `get_memory_footprint()`), `_keep_in_fp32_modules_strict` stays float32 for half dtypes, the
    rest takes `dtype` (buffers keep their own dtype)."""
    with torch.device("meta"):
        model = model_class(config)
    not_converted = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    keep_fp32 = list(model._keep_in_fp32_modules_strict) if dtype in (torch.float16, torch.bfloat16) else []
    total = sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if type(module) is nn.Linear and param_name == "weight" and should_convert_module(module_name, not_converted):
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


def bench_shape(name: str, args, workdir: Path) -> dict:
    llava, inputs, dtype = build_shape(name, args.llm_layers)
    fused = fused_from_llava(llava, args.fuser)
    for label, model in (("plain", llava), ("fused", fused)):
        model.save_pretrained(workdir / name / label)
    llava_config, fused_config = llava.config, fused.config
    del llava, fused
    bnb_config = quantization_config(dtype)
    models = {
        "plain": LlavaForConditionalGeneration.from_pretrained(
            workdir / name / "plain", dtype=dtype, quantization_config=bnb_config
        ),
        "fused": AutoModel.from_pretrained(workdir / name / "fused", dtype=dtype, quantization_config=bnb_config),
    }
    split = models["fused"].fuser_memory_footprint()
    result = {
        "dtype": str(dtype).removeprefix("torch."),
        "llm_layers": llava_config.text_config.num_hidden_layers,
        "vision_layers": llava_config.vision_config.num_hidden_layers,
        "footprint_4bit_bytes": {label: model.get_memory_footprint() for label, model in models.items()},
        "fuser_bytes": split["fuser"],
        "fuser_share": split["share"],
    }
    meta = {
        "plain": meta_4bit_footprint(LlavaForConditionalGeneration, llava_config, dtype),
        "fused": meta_4bit_footprint(FusedLlavaForConditionalGeneration, fused_config, dtype),
    }
    if meta != result["footprint_4bit_bytes"]:
        raise RuntimeError(f"meta-device footprint {meta} disagrees with the measured {result['footprint_4bit_bytes']}")
    if name != "tiny":
        full = llava_1_5_config()
        result["full_depth_footprint_4bit_bytes"] = {
            "plain": meta_4bit_footprint(LlavaForConditionalGeneration, full, dtype),
            "fused": meta_4bit_footprint(
                FusedLlavaForConditionalGeneration, fused_config_from_llava(full, args.fuser), dtype
            ),
        }

    runs = {label: {"first_token_s": [], "decode_tokens_per_s": []} for label in models}
    for label, model in models.items():  # warm-up
        decode_run(model, inputs, 2)
    for repeat in range(args.repeats):
        order = ("plain", "fused") if repeat % 2 == 0 else ("fused", "plain")
        for label in order:
            first, rate = decode_run(models[label], inputs, args.new_tokens[name])
            runs[label]["first_token_s"].append(first)
            runs[label]["decode_tokens_per_s"].append(rate)
    medians = {label: {key: statistics.median(values) for key, values in run.items()} for label, run in runs.items()}
    result.update(
        runs=runs,
        median=medians,
        decode_ratio=medians["fused"]["decode_tokens_per_s"] / medians["plain"]["decode_tokens_per_s"],
        first_token_ratio=medians["fused"]["first_token_s"] / medians["plain"]["first_token_s"],
        new_tokens=args.new_tokens[name],
        repeats=args.repeats,
    )
    return result


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:,.1f}"


def print_table(results: dict, fuser: str):
    print(f"\n4-bit nf4 (double quant), fuser={fuser}, medians; ratio = fused / plain")
    header = (
        f"{'shape':<22} {'plain MiB':>11} {'fused MiB':>11} {'fuser MiB':>10} {'share':>7} "
        f"{'plain tok/s':>12} {'fused tok/s':>12} {'ratio':>6} {'1st tok ratio':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        footprint, median = result["footprint_4bit_bytes"], result["median"]
        label = f"{name} ({result['llm_layers']} LLM layers)"
        print(
            f"{label:<22} {mib(footprint['plain']):>11} {mib(footprint['fused']):>11} {mib(result['fuser_bytes']):>10} "
            f"{result['fuser_share']:>7.2%} {median['plain']['decode_tokens_per_s']:>12.2f} "
            f"{median['fused']['decode_tokens_per_s']:>12.2f} {result['decode_ratio']:>6.3f} "
            f"{result['first_token_ratio']:>14.3f}"
        )
        if "full_depth_footprint_4bit_bytes" in result:
            full = result["full_depth_footprint_4bit_bytes"]
            fuser_mib = mib(full["fused"] - full["plain"])
            share = (full["fused"] - full["plain"]) / full["fused"]
            print(
                f"{name + ' (32, meta)':<22} {mib(full['plain']):>11} {mib(full['fused']):>11} {fuser_mib:>10} "
                f"{share:>7.2%} {'-':>12} {'-':>12} {'-':>6} {'-':>14}"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape and a 1-layer 7B, few repeats")
    parser.add_argument("--fuser", default="mmfuser", choices=["mmfuser", "igva", "concat", "average", "none"])
    parser.add_argument("--llm-layers", type=int, default=2, help="decoder layers of the measured 7B-shaped model")
    parser.add_argument("--repeats", type=int, default=None, help="timed generate() calls per model (default 5)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 keeps medians steady on a shared machine)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench_quantized_decode.json"))
    args = parser.parse_args()
    if args.fuser == "igva":
        parser.error("igva needs an instruction encoder and instruction inputs; benchmark mmfuser, concat or average")
    if args.quick:
        args.llm_layers = 1
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.new_tokens = {"tiny": 16 if args.quick else 64, "llava-7b": 4 if args.quick else 24}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in ("tiny", "llava-7b"):
            print(f"benchmarking {name} ...", flush=True)
            results[name] = bench_shape(name, args, Path(workdir))
    print_table(results, args.fuser)
    report = {
        "fuser": args.fuser,
        "quick": args.quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
