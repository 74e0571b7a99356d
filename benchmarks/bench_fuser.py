"""Fuser cost, measured side by side in one run (CPU by default).

1. Deformable sampling core at MMFuser shapes (16 heads, 4 levels of 24x24, 4 points, width 1024, 576 queries):
   the package's batched path vs its per-level path vs transformers' pure-PyTorch `MultiScaleDeformableAttention`,
   same inputs, outputs asserted equal.
2. Fuser overhead at CLIP-L/336 shapes with random weights: vision tower alone vs tower + fuser (+ the
   all-mpnet-base-v2-shaped instruction encoder for igva).

Prints medians over repeats and ratios, and writes a JSON of the results.
    python benchmarks/bench_fuser.py [--quick] [--repeats 5] [--json bench_fuser.json]
"""

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import AutoConfig, AutoModel
from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

from hf_fusedvlm import FusedLlavaConfig, build_fuser
from hf_fusedvlm.fusers import multi_scale_deformable_sampling, sample_levels_separately
from llava_shapes import CLIP_L_336


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def bench_sampling_core(side: int, width: int, heads: int, levels: int, points: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    head_dim, queries = width // heads, side * side
    shapes = [(side, side)] * levels
    value = torch.randn(1, levels * queries, heads, head_dim, generator=generator)
    locations = torch.rand(1, queries, heads, levels, points, 2, generator=generator)
    weights = torch.rand(1, queries, heads, levels, points, generator=generator).softmax(-1)

    def separately():
        grids = (2 * locations - 1).permute(0, 2, 3, 1, 4, 5)
        sampled = sample_levels_separately(value, shapes, grids)
        w = weights.permute(0, 2, 3, 1, 4).reshape(heads, levels, 1, queries, points)
        return (sampled * w).sum(dim=(1, 4)).view(1, width, queries).transpose(1, 2)

    reference = MultiScaleDeformableAttention()
    shapes_tensor = torch.tensor(shapes)
    start_index = torch.cat([shapes_tensor.new_zeros(1), shapes_tensor.prod(1).cumsum(0)[:-1]])

    def transformers_path():
        return reference(value, shapes_tensor, shapes, start_index, locations, weights, im2col_step=64)

    def batched():
        return multi_scale_deformable_sampling(value, shapes, locations, weights)

    expected = transformers_path()
    torch.testing.assert_close(batched(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(separately(), expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        times = {name: median_seconds(fn, repeats) for name, fn in
                 [("batched (package)", batched), ("per-level (package)", separately),
                  ("transformers MultiScaleDeformableAttention", transformers_path)]}
    return times


def clip_l_config(quick: bool) -> dict:
    if quick:
        return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                    image_size=96, patch_size=16)
    return CLIP_L_336


def bench_fuser_overhead(quick: bool, repeats: int) -> dict:
    vision = clip_l_config(quick)
    encoder = AutoConfig.for_model(
        "mpnet", **({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4}
                    if quick else {})
    )
    tower = AutoModel.from_config(AutoConfig.for_model("clip_vision_model", **vision)).eval()
    instruction_encoder = AutoModel.from_config(encoder).eval()
    pixels = torch.randn(1, 3, vision["image_size"], vision["image_size"])
    instruction_ids = torch.randint(5, 1000, (1, 16))
    results = {}
    with torch.inference_mode():
        results["vision tower"] = median_seconds(lambda: tower(pixels, output_hidden_states=True), repeats)
        hidden_states = tower(pixels, output_hidden_states=True).hidden_states
        for fuser_type in ("mmfuser", "igva", "concat", "average"):
            config = FusedLlavaConfig(
                vision_config={"model_type": "clip_vision_model", **vision},
                fuser_type=fuser_type,
                fuser_num_heads=vision["num_attention_heads"],
                aggregator_hidden_size=64 if quick else 1024,
                instruction_encoder_config=encoder if fuser_type == "igva" else None,
            )
            fuser = build_fuser(config).eval()
            embeds = torch.randn(1, encoder.hidden_size)

            def run_fuser():
                if fuser_type == "igva":
                    instruction_encoder(instruction_ids)
                return fuser(hidden_states, embeds)

            results[f"{fuser_type} fuser"] = median_seconds(run_fuser, repeats)
            results[f"{fuser_type} parameters (M)"] = sum(p.numel() for p in fuser.parameters()) / 1e6
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (a smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="bench_fuser.json")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)

    core_shape = dict(side=6, width=64, heads=4, levels=4, points=2) if args.quick else dict(
        side=24, width=1024, heads=16, levels=4, points=4)
    core = bench_sampling_core(**core_shape, repeats=repeats)
    overhead = bench_fuser_overhead(args.quick, repeats)

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"# Fuser benchmarks ({'quick' if args.quick else 'full'}), {machine}, median of {repeats}\n")
    print("| deformable sampling core | ms | vs per-level |\n|---|---:|---:|")
    per_level = core["per-level (package)"]
    for name, seconds in core.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {per_level / seconds:.2f}x |")
    tower = overhead["vision tower"]
    print("\n| CLIP-L/336 part | ms | share of vision tower | parameters (M) |\n|---|---:|---:|---:|")
    print(f"| vision tower | {tower * 1e3:.1f} | 100.0 % | |")
    for fuser_type in ("mmfuser", "igva", "concat", "average"):
        seconds = overhead[f"{fuser_type} fuser"]
        print(f"| {fuser_type} fuser{' + instruction encoder' if fuser_type == 'igva' else ''} | {seconds * 1e3:.1f} | "
              f"{100 * seconds / tower:.1f} % | {overhead[f'{fuser_type} parameters (M)']:.1f} |")
    with open(args.json, "w") as handle:
        json.dump({"machine": machine, "repeats": repeats, "quick": args.quick, "sampling_core_s": core,
                   "fuser_overhead": overhead}, handle, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
