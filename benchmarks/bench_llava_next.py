"""Fusion cost at LLaVA-NeXT shapes, measured side by side in one run (CPU by default).

One image tiled as LLaVA-NeXT tiles a square 672 px image: 5 crops of CLIP-L/336 (the base view and a 2x2 grid),
through the image path (`get_image_features`: tower, fuser on every crop, projector to Llama-7B's width, packing
with `image_newline`) of a plain `LlavaNextModel` and of a `FusedLlavaNextModel` per fuser, from the parity start
(random weights). The rounds interleave the variants, so drift hits all alike; medians and ratios to plain are
printed. Peak memory of the image path is the rise of resident memory during one call, sampled by a thread (Linux).

    python benchmarks/bench_llava_next.py [--quick] [--repeats 5] [--json bench_llava_next.json]
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import threading
import time

import torch
from transformers import AutoConfig, AutoModel, LlavaNextConfig, LlavaNextForConditionalGeneration

from hf_fusedvlm import FUSERS
from hf_fusedvlm.parity import fused_from_llava

from llava_shapes import CLIP_L_336, LLAMA_7B


VARIANTS = ("plain", *FUSERS)
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
QUICK_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, image_size=96, patch_size=16
)
QUICK_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def build(variant: str, quick: bool):
    """The image path's owner for `variant` (`plain` or a fuser), its inputs (one square image in 5 crops) and, for
    fusers that read the instruction, the instruction tokens."""
    vision = QUICK_VISION if quick else CLIP_L_336
    # The LLM is never run here: no decoder layer and a small vocabulary keep it cheap to build.
    text = {**LLAMA_7B, **(QUICK_TEXT if quick else {}), "num_hidden_layers": 0, "vocab_size": 64}
    side = vision["image_size"]
    config = LlavaNextConfig(
        vision_config=AutoConfig.for_model("clip_vision_model", **vision),
        text_config=AutoConfig.for_model("llama", **text),
        image_token_index=1,
        image_grid_pinpoints=[[side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
    )
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    inputs = {"pixel_values": torch.randn(1, 5, 3, side, side), "image_sizes": torch.tensor([[2 * side, 2 * side]])}
    if variant != "plain":
        encoder = None
        if FUSERS[variant].reads_instruction:
            encoder_fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
            encoder = AutoConfig.for_model("mpnet", **(encoder_fields if quick else {}))
            encoder = AutoModel.from_config(encoder).eval()
            inputs["instruction_input_ids"] = torch.randint(5, 500, (1, 16))
        fuser_options = {"fuser_num_heads": vision["num_attention_heads"]} if variant == "mmfuser" else {}
        if variant == "igva":
            fuser_options["aggregator_hidden_size"] = 64 if quick else 1024
        model = fused_from_llava(model, variant, instruction_encoder=encoder, **fuser_options)
    return model.model, inputs


def image_path(model, inputs):
    with torch.inference_mode():
        return model.get_image_features(**inputs)


def resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as file:
        return int(file.read().split()[1]) * PAGE_BYTES


def peak_rss_rise(function) -> int:
    """Bytes by which calling `function` raises the resident memory of this process at its peak, sampled every
    0.2 ms by a thread (Linux: /proc/self/statm), after freed memory is handed back to the system (glibc's
    `malloc_trim`) so that the call cannot hide in it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline, peak, done = resident_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        function()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], resident_bytes()) - baseline


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (a smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="bench_llava_next.json")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    built = {variant: build(variant, args.quick) for variant in VARIANTS}
    for variant in VARIANTS[1:]:  # every variant starts from the same tower weights: one copy is shared
        built[variant][0].vision_tower = built["plain"][0].vision_tower
    tokens = {variant: image_path(*built[variant]).pooler_output[0].shape[0] for variant in VARIANTS}
    assert len(set(tokens.values())) == 1, tokens  # every fuser keeps LLaVA-NeXT's token count
    timings = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            start = time.perf_counter()
            image_path(*built[variant])
            timings[variant].append(time.perf_counter() - start)
    seconds = {variant: statistics.median(values) for variant, values in timings.items()}
    memory = {variant: peak_rss_rise(lambda: image_path(*built[variant])) for variant in VARIANTS}

    shape = "tiny (--quick)" if args.quick else "CLIP-L/336, 5 crops (672 x 672 image), projector to 4096"
    print(f"LLaVA-NeXT image path: {shape}; {tokens['plain']} image tokens; median of {repeats} interleaved rounds")
    print("| variant | median s | ratio to plain | peak RSS rise (MiB) | ratio to plain |")
    print("|---|---:|---:|---:|---:|")
    for variant in VARIANTS:
        print(
            f"| {variant} | {seconds[variant]:.3f} | {seconds[variant] / seconds['plain']:.3f} | "
            f"{memory[variant] / 2**20:.1f} | {memory[variant] / max(memory['plain'], 1):.2f} |"
        )
    results = {
        "shape": shape,
        "image_tokens": tokens["plain"],
        "repeats": repeats,
        "seconds": seconds,
        "time_ratio": {variant: seconds[variant] / seconds["plain"] for variant in VARIANTS},
        "peak_rss_rise_bytes": memory,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    with open(args.json, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
