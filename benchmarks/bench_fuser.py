"""Fuser cost, measured side by side in one run (CPU by default).

1. Deformable sampling core at MMFuser shapes (16 heads, 4 levels of 24x24, 4 points, width 1024, 576 queries):
   the package's `multi_scale_deformable_sampling` vs a per-level `grid_sample` reference vs transformers'
   pure-PyTorch `MultiScaleDeformableAttention`, same inputs, outputs asserted equal. Goal: package >= 2x per-level.
2. Fuser overhead at CLIP-L/336 shapes with random weights: vision tower alone vs tower + fuser (+ the
   all-mpnet-base-v2-shaped instruction encoder for igva). Goal: fuser <= 5 % of the vision tower.
3. LLaVA-1.5-7B prefill (one image: 576 image tokens + the text), in float32. A full-depth 7B does not fit the RAM
   this was written for, so the prefill is assembled from measured parts: tower, fuser, projector, `--llm-layers`
   Llama-7B decoder layers (extrapolated to 32) and the LM head on the last token.

On a CUDA GPU (`--device cuda`, with `--dtype bfloat16` for the tower, projector and LLM; the fuser and the
instruction encoder stay float32, as the fused model keeps them) the whole 7B depth fits: pass `--llm-layers 32`.

Prints medians over repeats and ratios, and writes a JSON of the results.
    python benchmarks/bench_fuser.py [--quick] [--repeats 5] [--llm-layers 2] [--device cpu] [--dtype float32]
        [--json bench_fuser.json]
"""

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel
from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

from hf_fusedvlm import FUSERS, FusedLlavaConfig, build_fuser
from hf_fusedvlm.deformable_attention import multi_scale_deformable_sampling
from hf_fusedvlm.modeling_fusion import FusedLlavaMultiModalProjector

from llava_shapes import CLIP_L_336, LLAMA_7B


FUSER_TYPES = tuple(name for name in FUSERS if name != "none")
TEXT_TOKENS = 40  # a short LLaVA-1.5 prompt around the image


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    timings = []
    for _ in range(repeats):
        # CUDA runs asynchronously: a timing covers the kernels only once they have finished.
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_level_sampling(value, spatial_shapes, sampling_locations, attention_weights) -> torch.Tensor:
    """Reference: one `grid_sample` per level, then the attention-weighted sum. Same arguments and result as
    `multi_scale_deformable_sampling`."""
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    grids = (
        (2 * sampling_locations - 1)
        .permute(0, 2, 3, 1, 4, 5)
        .reshape(batch * num_heads, num_levels, num_queries, num_points, 2)
    )
    sampled = []
    for level, level_value in enumerate(value.split([h * w for h, w in spatial_shapes], dim=1)):
        height, width = spatial_shapes[level]
        image = level_value.permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, height, width)
        sampled.append(
            F.grid_sample(image, grids[:, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    weights = attention_weights.permute(0, 2, 3, 1, 4).reshape(
        batch * num_heads, num_levels, 1, num_queries, num_points
    )
    output = (torch.stack(sampled, dim=1) * weights).sum(dim=(1, 4))  # (batch * heads, head_dim, queries)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2)


def bench_sampling_core(
    side: int, width: int, heads: int, levels: int, points: int, repeats: int, device: torch.device
) -> dict:
    generator = torch.Generator().manual_seed(0)
    head_dim, queries = width // heads, side * side
    shapes = [(side, side)] * levels
    value = torch.randn(1, levels * queries, heads, head_dim, generator=generator).to(device)
    # Some locations outside [0, 1] exercise the zero padding.
    locations = (torch.rand(1, queries, heads, levels, points, 2, generator=generator) * 1.2 - 0.1).to(device)
    weights = torch.rand(1, queries, heads, levels, points, generator=generator).softmax(-1).to(device)
    transformers_module = MultiScaleDeformableAttention()
    shapes_tensor = torch.tensor(shapes, device=device)
    start_index = torch.cat([shapes_tensor.new_zeros(1), shapes_tensor.prod(1).cumsum(0)[:-1]])
    paths = {
        "package (one embedding_bag)": lambda: multi_scale_deformable_sampling(value, shapes, locations, weights),
        "per-level grid_sample": lambda: per_level_sampling(value, shapes, locations, weights),
        "transformers MultiScaleDeformableAttention": lambda: transformers_module(
            value, shapes_tensor, shapes, start_index, locations, weights, im2col_step=64
        ),
    }
    expected = paths["per-level grid_sample"]()
    for path in paths.values():
        torch.testing.assert_close(path(), expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        return {name: median_seconds(path, repeats) for name, path in paths.items()}


def vision_and_encoder_configs(quick: bool) -> tuple[dict, object]:
    if quick:
        vision = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            image_size=96,
            patch_size=16,
        )
        encoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
        return vision, AutoConfig.for_model("mpnet", **encoder)
    return CLIP_L_336, AutoConfig.for_model("mpnet")


def fuser_config(fuser_type: str, vision: dict, encoder, quick: bool, text: dict | None = None) -> FusedLlavaConfig:
    return FusedLlavaConfig(
        vision_config={"model_type": "clip_vision_model", **vision},
        text_config=text,
        fuser_type=fuser_type,
        fuser_num_heads=vision["num_attention_heads"],
        aggregator_hidden_size=64 if quick else 1024,
        instruction_encoder_config=encoder if FUSERS[fuser_type].reads_instruction else None,
    )


def bench_fuser_overhead(quick: bool, repeats: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds of the vision tower (in `dtype`) and of each fuser (float32) on its hidden states, and the fusers'
    parameter counts."""
    vision, encoder = vision_and_encoder_configs(quick)
    tower = AutoModel.from_config(AutoConfig.for_model("clip_vision_model", **vision)).eval().to(device, dtype)
    instruction_encoder = AutoModel.from_config(encoder).eval().to(device)
    pixels = torch.randn(1, 3, vision["image_size"], vision["image_size"]).to(device, dtype)
    instruction_ids = torch.randint(5, 1000, (1, 16), device=device)
    results = {
        "seconds": {},
        "parameters_millions": {
            "vision tower": sum(p.numel() for p in tower.parameters()) / 1e6,
            "instruction encoder": sum(p.numel() for p in instruction_encoder.parameters()) / 1e6,
        },
    }
    with torch.inference_mode():
        results["seconds"]["vision tower"] = median_seconds(lambda: tower(pixels, output_hidden_states=True), repeats)
        hidden_states = [state.float() for state in tower(pixels, output_hidden_states=True).hidden_states]
        for fuser_type in FUSER_TYPES:
            fuser = build_fuser(fuser_config(fuser_type, vision, encoder, quick)).eval().to(device)
            embeds = torch.randn(1, encoder.hidden_size, device=device)

            def run_fuser():
                if fuser.reads_instruction:
                    instruction_encoder(instruction_ids)
                return fuser(hidden_states, embeds)

            results["seconds"][fuser_type] = median_seconds(run_fuser, repeats)
            results["parameters_millions"][fuser_type] = sum(p.numel() for p in fuser.parameters()) / 1e6
    return results


def bench_prefill_parts(quick: bool, repeats: int, llm_layers: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds of the LLaVA-7B prefill parts other than tower and fuser, at one image + `TEXT_TOKENS` tokens: the
    projector of each fuser type, one Llama-7B decoder layer (mean over `llm_layers`) and the LM head on the last
    token (what `generate()` computes at prefill)."""
    vision, encoder = vision_and_encoder_configs(quick)
    text = dict(LLAMA_7B, num_hidden_layers=llm_layers)
    if quick:
        text.update(
            hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000
        )
    num_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    length = num_patches + TEXT_TOKENS
    results = {"tokens": length, "llm_layers_measured": llm_layers, "seconds": {}}
    with torch.inference_mode():
        for fuser_type in ("none", *FUSER_TYPES):
            config = fuser_config(fuser_type, vision, encoder, quick, text)
            projector = FusedLlavaMultiModalProjector(config, build_fuser(config).output_size).eval().to(device, dtype)
            features = torch.randn(1, num_patches, projector.linear_1.in_features).to(device, dtype)
            results["seconds"][f"projector ({fuser_type})"] = median_seconds(lambda: projector(features), repeats)
        language_model = AutoModel.from_config(AutoConfig.for_model("llama", **text)).eval().to(device, dtype)
        embeds = torch.randn(1, length, text["hidden_size"]).to(device, dtype)
        decoder = median_seconds(lambda: language_model(inputs_embeds=embeds, use_cache=False), repeats)
        results["seconds"]["decoder layer"] = decoder / llm_layers
        lm_head = torch.nn.Linear(text["hidden_size"], text["vocab_size"], bias=False).to(device, dtype)
        last = embeds[:, -1:]
        results["seconds"]["lm head (last token)"] = median_seconds(lambda: lm_head(last), repeats)
    return results


def prefill_estimate(overhead: dict, parts: dict, full_layers: int) -> dict:
    """Seconds of a full-depth prefill per fuser type, `none` being plain LLaVA (no fuser, one-layer projector)."""
    seconds, part = overhead["seconds"], parts["seconds"]
    shared = seconds["vision tower"] + full_layers * part["decoder layer"] + part["lm head (last token)"]
    return {
        fuser_type: shared + seconds.get(fuser_type, 0.0) + part[f"projector ({fuser_type})"]
        for fuser_type in ("none", *FUSER_TYPES)
    }


def print_tables(core: dict, overhead: dict, parts: dict, prefill: dict, full_layers: int, dtype_name: str) -> None:
    print("| deformable sampling core | ms | vs per-level |\n|---|---:|---:|")
    per_level = core["per-level grid_sample"]
    for name, seconds in core.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {per_level / seconds:.2f}x |")

    seconds, parameters = overhead["seconds"], overhead["parameters_millions"]
    tower = seconds["vision tower"]
    print("\n| CLIP-L/336 part | ms | share of vision tower | parameters (M) |\n|---|---:|---:|---:|")
    print(f"| vision tower | {tower * 1e3:.1f} | 100.0 % | {parameters['vision tower']:.1f} |")
    for fuser_type in FUSER_TYPES:
        label, count = fuser_type, f"{parameters[fuser_type]:.1f}"
        if FUSERS[fuser_type].reads_instruction:
            label, count = f"{fuser_type} + instruction encoder", f"{count} + {parameters['instruction encoder']:.1f}"
        print(f"| {label} | {seconds[fuser_type] * 1e3:.1f} | {100 * seconds[fuser_type] / tower:.1f} % | {count} |")

    part = parts["seconds"]
    print(f"\n| LLaVA-7B prefill, {parts['tokens']} tokens, {dtype_name} | ms | vs plain |\n|---|---:|---:|")
    print(f"| decoder layer (mean of {parts['llm_layers_measured']} measured) | {part['decoder layer'] * 1e3:.1f} | |")
    print(f"| LM head, last token | {part['lm head (last token)'] * 1e3:.1f} | |")
    for name, total in prefill.items():
        label = "plain LLaVA" if name == "none" else name
        print(
            f"| {label}: tower + fuser + projector + {full_layers} x layer + head (estimate) | {total * 1e3:.0f} | "
            f"{total / prefill['none']:.4f} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (a smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--llm-layers", type=int, default=2, help="Llama-7B decoder layers measured for the prefill")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="of the tower, projector and LLM (the fuser and the instruction encoder stay float32)",
    )
    parser.add_argument("--json", default="bench_fuser.json")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    repeats = 1 if args.quick else args.repeats
    llm_layers = 1 if args.quick else args.llm_layers
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    core_shape = (
        dict(side=6, width=64, heads=4, levels=4, points=2)
        if args.quick
        else dict(side=24, width=1024, heads=16, levels=4, points=4)
    )
    core = bench_sampling_core(**core_shape, repeats=repeats, device=device)
    overhead = bench_fuser_overhead(args.quick, repeats, device, dtype)
    parts = bench_prefill_parts(args.quick, repeats, llm_layers, device, dtype)
    full_layers = LLAMA_7B["num_hidden_layers"]
    prefill = prefill_estimate(overhead, parts, full_layers)

    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    ) + f", torch {torch.__version__}, {args.dtype}"
    print(f"# Fuser benchmarks ({'quick' if args.quick else 'full'}), {machine}, median of {repeats}\n")
    print_tables(core, overhead, parts, prefill, full_layers, args.dtype)
    ratios = {
        "sampling_core_vs_per_level": core["per-level grid_sample"] / core["package (one embedding_bag)"],
        "sampling_core_vs_transformers": core["transformers MultiScaleDeformableAttention"]
        / core["package (one embedding_bag)"],
        "fuser_share_of_tower": {t: overhead["seconds"][t] / overhead["seconds"]["vision tower"] for t in FUSER_TYPES},
        "prefill_vs_plain": {t: prefill[t] / prefill["none"] for t in FUSER_TYPES},
    }
    goals = {
        "sampling_core_ge_2x_per_level": ratios["sampling_core_vs_per_level"] >= 2,
        "mmfuser_le_5_percent_of_tower": ratios["fuser_share_of_tower"]["mmfuser"] <= 0.05,
    }
    if args.quick:
        print("\n(quick shapes: the goals are judged at the full shapes only)")
    else:
        print(
            f"\ngoal sampling core >= 2x per-level ({ratios['sampling_core_vs_per_level']:.2f}x): "
            f"{'met' if goals['sampling_core_ge_2x_per_level'] else 'NOT met'}"
        )
        print(
            f"goal mmfuser <= 5 % of the vision tower ({100 * ratios['fuser_share_of_tower']['mmfuser']:.1f} %): "
            f"{'met' if goals['mmfuser_le_5_percent_of_tower'] else 'NOT met'}"
        )
    with open(args.json, "w") as handle:
        json.dump(
            {
                "machine": machine,
                "repeats": repeats,
                "quick": args.quick,
                "sampling_core_s": core,
                "fuser_overhead": overhead,
                "prefill_parts": parts,
                "prefill_estimate_s": prefill,
                "full_llm_layers": full_layers,
                "ratios": ratios,
                "goals": goals,
            },
            handle,
            indent=2,
        )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
