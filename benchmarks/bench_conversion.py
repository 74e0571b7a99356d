"""Benchmark (not a test): streaming conversion of a LLaVA-1.5-7B-shaped checkpoint against a plain copy.

Generates a synthetic llava-hf checkpoint locally (random bf16, LLaVA-1.5-7B shapes: CLIP-L/336 tower, Llama-7B
LM, legacy llava-hf key names, shards of --shard-gb), then times, in fresh processes and alternating, a plain copy of
the same shard files and `convert_checkpoint` (no --verify), and reports median wall time and peak RSS.

Goals (issue 4): peak RSS <= largest shard + 1 GiB; conversion wall time <= 1.5 x the copy's.

    python benchmarks/bench_conversion.py                   # full size (~14 GB source; needs ~3x that on disk)
    python benchmarks/bench_conversion.py --scale 0.25      # a quarter of the LM layers
    python benchmarks/bench_conversion.py --quick           # tiny shapes, seconds
    python benchmarks/bench_conversion.py --workdir /big/disk --json results.json

Wall times are measured inside each process around the operation (interpreter and import time are reported apart).
The source stays in the page cache as far as memory allows, for copy and conversion alike.
"""

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def checkpoint_config(scale: float, quick: bool):
    from llava_shapes import LLAMA_7B, llava_1_5_config

    if quick:
        vision = dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=8,
            image_size=112,
            patch_size=14,
            projection_dim=256,
        )
        text = dict(
            LLAMA_7B,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=8,
        )
        return llava_1_5_config(vision, text, dtype="bfloat16")
    return llava_1_5_config(text=dict(LLAMA_7B, num_hidden_layers=max(1, round(32 * scale))), dtype="bfloat16")


def generate(folder: Path, scale: float, quick: bool, shard_bytes: int) -> dict:
    """Write the synthetic checkpoint: config, processor and bf16 shards filled from a random pool (views, so the
    generator itself never holds a shard in memory)."""
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from hf_fusedvlm.conversion import OutputTensor, shard_name, write_shard
    from hf_fusedvlm.tiny import LLAVA_CHAT_TEMPLATE, build_tiny_llm_tokenizer

    config = checkpoint_config(scale, quick)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    pool = (torch.randn(64 * 2**20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    shards, current, size, start = [], [], 0, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if current and size + 2 * numel > shard_bytes:
            shards.append(current)
            current, size = [], 0
        chunk = torch.cat([pool] * math.ceil(numel / pool.numel()))[:numel] if numel > pool.numel() else None
        if chunk is None:
            start = (start + 7919) % (pool.numel() - numel + 1)
            chunk = pool[start : start + numel]
        current.append(OutputTensor(name, torch.bfloat16, shape, tensor=chunk.view(shape)))
        size += 2 * numel
    shards.append(current)
    folder.mkdir(parents=True, exist_ok=True)

    class _NoProgress:
        def update(self, count):
            pass

    weight_map = {}
    for index, entries in enumerate(shards):
        name = shard_name(index + 1, len(shards))
        write_shard(folder / name, entries, {"format": "pt"}, None, _NoProgress())
        weight_map.update({entry.name: name for entry in entries})
    total = sum(entry.nbytes for shard in shards for entry in shard)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(folder)
    image_size = config.vision_config.image_size
    LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=build_tiny_llm_tokenizer(),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(folder)
    return {
        "total_bytes": total,
        "num_shards": len(shards),
        "largest_shard_bytes": max(
            (folder / shard_name(i + 1, len(shards))).stat().st_size for i in range(len(shards))
        ),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM on Linux (ru_maxrss would count the parent's memory before
    exec), ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_child(mode: str, source: Path, target: Path, fuser: str) -> None:
    """One measured operation in this (fresh) process; prints JSON with its wall time and peak RSS."""
    started = time.perf_counter()
    if mode == "copy":
        imported = time.perf_counter()
        target.mkdir(parents=True)
        for path in sorted(source.glob("*.safetensors")):
            shutil.copyfile(path, target / path.name)
    else:
        from hf_fusedvlm.conversion import convert_checkpoint

        imported = time.perf_counter()
        convert_checkpoint(source, target, fuser, progress=False)
    finished = time.perf_counter()
    print(
        json.dumps(
            {
                "wall_s": finished - imported,
                "import_s": imported - started,
                "peak_rss_bytes": peak_rss_bytes(),
            }
        )
    )


def measure(mode: str, source: Path, target: Path, fuser: str) -> dict:
    shutil.rmtree(target, ignore_errors=True)
    command = [sys.executable, __file__, "--child", mode, str(source), str(target), "--fuser", fuser]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{completed.stderr[-3000:]}")
    shutil.rmtree(target, ignore_errors=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 32 LM layers (default 1.0)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and shards, one repeat")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="source shard size in GB (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each of copy and conversion (default 3)")
    parser.add_argument("--fuser", default="mmfuser", help="fuser to convert to (default mmfuser)")
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated source checkpoint")
    parser.add_argument("--json", help="write the results here (default: WORKDIR/bench_conversion.json)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, source, target = args.child
        return run_child(mode, Path(source), Path(target), args.fuser)

    shard_bytes = int((0.016 if args.quick else args.shard_gb) * 1e9)
    repeats = 1 if args.quick else args.repeats
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-conversion-"))
    workdir.mkdir(parents=True, exist_ok=True)
    expected = (0.06 if args.quick else 0.6 + 13.5 * max(1, round(32 * args.scale)) / 32) * GIB
    free = shutil.disk_usage(workdir).free
    if free < 2.2 * expected:
        raise SystemExit(
            f"{workdir} has {free / GIB:.1f} GiB free, the benchmark needs about "
            f"{2.2 * expected / GIB:.1f} GiB (source + one output at a time): use --scale, --quick "
            "or --workdir."
        )
    source = workdir / "llava-7b-shaped"
    print(f"Generating a synthetic checkpoint (~{expected / GIB:.1f} GiB) in {source} ...", flush=True)
    started = time.perf_counter()
    shutil.rmtree(source, ignore_errors=True)
    info = generate(source, args.scale, args.quick, shard_bytes)
    print(
        f"  {info['num_shards']} shards, {info['total_bytes'] / GIB:.2f} GiB, largest shard "
        f"{info['largest_shard_bytes'] / GIB:.2f} GiB, generated in {time.perf_counter() - started:.0f} s",
        flush=True,
    )

    runs = {"copy": [], "convert": []}
    for repeat in range(repeats):
        for mode in ("copy", "convert"):
            runs[mode].append(measure(mode, source, workdir / f"out-{mode}", args.fuser))
            print(
                f"  run {repeat + 1}/{repeats} {mode:8s} wall {runs[mode][-1]['wall_s']:7.2f} s  peak RSS "
                f"{runs[mode][-1]['peak_rss_bytes'] / GIB:.2f} GiB",
                flush=True,
            )
    summary = {
        mode: {
            "median_wall_s": statistics.median(r["wall_s"] for r in rs),
            "median_import_s": statistics.median(r["import_s"] for r in rs),
            "max_peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
        }
        for mode, rs in runs.items()
    }
    wall_ratio = summary["convert"]["median_wall_s"] / summary["copy"]["median_wall_s"]
    rss_limit = info["largest_shard_bytes"] + GIB
    goals = {
        "peak_rss_le_largest_shard_plus_1GiB": summary["convert"]["max_peak_rss_bytes"] <= rss_limit,
        "wall_le_1.5x_copy": wall_ratio <= 1.5,
    }

    print()
    print("| step    | median wall (s) | ratio to copy | peak RSS (GiB) | import (s) |")
    print("|---------|-----------------|---------------|----------------|------------|")
    for mode in ("copy", "convert"):
        row = summary[mode]
        ratio = row["median_wall_s"] / summary["copy"]["median_wall_s"]
        print(
            f"| {mode:7s} | {row['median_wall_s']:15.2f} | {ratio:13.2f} | {row['max_peak_rss_bytes'] / GIB:14.2f} "
            f"| {row['median_import_s']:10.2f} |"
        )
    print()
    print(
        f"source {info['total_bytes'] / GIB:.2f} GiB in {info['num_shards']} shards (largest "
        f"{info['largest_shard_bytes'] / GIB:.2f} GiB); fuser {args.fuser}; {repeats} runs each"
    )
    print(
        f"goal peak RSS <= largest shard + 1 GiB ({rss_limit / GIB:.2f} GiB): "
        f"{'met' if goals['peak_rss_le_largest_shard_plus_1GiB'] else 'NOT met'}"
    )
    print(f"goal wall <= 1.5 x copy (ratio {wall_ratio:.2f}): {'met' if goals['wall_le_1.5x_copy'] else 'NOT met'}")

    results = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {
            "scale": args.scale,
            "quick": args.quick,
            "shard_bytes": shard_bytes,
            "repeats": repeats,
            "fuser": args.fuser,
        },
        "checkpoint": info,
        "runs": runs,
        "summary": summary,
        "wall_ratio": wall_ratio,
        "goals": goals,
    }
    json_path = Path(args.json) if args.json else workdir / "bench_conversion.json"
    json_path.write_text(json.dumps(results, indent=2))
    print(f"results: {json_path}")
    if not args.keep:
        shutil.rmtree(source, ignore_errors=True)


if __name__ == "__main__":
    main()
