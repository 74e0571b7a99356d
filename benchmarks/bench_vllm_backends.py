"""Serving throughput of one fused checkpoint by the package's vLLM plugin and by vLLM's Transformers backend.

Both engines serve the same checkpoint (bench_vllm.py's shapes, random weights, float32), each in its own process and
alive for the whole run; the parent alternates their timed batches (one warm-up batch each, then `--repeats` rounds,
plugin then Transformers backend in each round, the same fresh images for both). Prints the median batch time,
requests/s and the Transformers backend's throughput relative to the plugin's, with the machine's load average, and
writes a JSON.

    python benchmarks/bench_vllm_backends.py [--quick] [--fuser mmfuser] [--requests 8] [--max-tokens 16]
        [--repeats 5] [--json bench_vllm_backends.json]
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

from bench_vllm import write_checkpoint


HERE = Path(__file__).resolve().parent
IMPLS = ("plugin", "transformers")


def serve(args) -> None:
    """Worker: build the engine, warm up, then time one batch per line read from stdin (the round's index)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, str(HERE.parent / "tests_vllm"))
    from vllm_generate import transformers_backend_options

    options = transformers_backend_options() if args.impl == "transformers" else {}
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.checkpoint, dtype="float32", max_num_seqs=args.requests, enforce_eager=True, seed=0, **options)
    if llm.llm_engine.model_config.using_transformers_backend() != (args.impl == "transformers"):
        sys.exit(f"{args.impl}: vLLM chose {llm.llm_engine.model_config.architecture}")
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    # Imported once the engine runs: importing the package registers its classes with transformers' Auto classes.
    from hf_fusedvlm import FusedLlavaProcessor
    from hf_fusedvlm.synthetic_vqa import make_sample, question_prompt

    processor = FusedLlavaProcessor.from_pretrained(args.checkpoint)
    image_size = processor.image_processor.crop_size["height"]

    def batch(round_index: int) -> list[dict]:
        # Fresh images every round: vLLM caches encoded images, and a repeated image would skip the fuser.
        samples = [make_sample(round_index, index, image_size=image_size) for index in range(args.requests)]
        return [
            {"prompt": question_prompt(processor, sample.question), "multi_modal_data": {"image": sample.image}}
            for sample in samples
        ]

    llm.generate(batch(0), sampling, use_tqdm=False)
    print("READY", flush=True)
    for line in sys.stdin:
        prompts = batch(int(line))
        start = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        assert all(len(output.outputs[0].token_ids) == args.max_tokens for output in outputs)
        print(f"RESULT {seconds}", flush=True)


def read_until(worker: subprocess.Popen, prefix: str, impl: str) -> str:
    for line in worker.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    sys.exit(f"the {impl} engine stopped; its log is above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 requests of 4 tokens, 1 round")
    parser.add_argument("--fuser", default="mmfuser")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        serve(args)
        return
    if args.quick:
        args.requests, args.max_tokens, args.repeats = 2, 4, 1
    shape = "tiny" if args.quick else "small"

    timings = {impl: [] for impl in IMPLS}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / args.fuser
        write_checkpoint(args.fuser, shape, folder)
        workers = {}
        for impl in IMPLS:
            command = [sys.executable, __file__, "--impl", impl, "--checkpoint", str(folder)]
            command += ["--requests", str(args.requests), "--max-tokens", str(args.max_tokens)]
            workers[impl] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            for impl, worker in workers.items():
                read_until(worker, "READY", impl)
            for round_index in range(1, args.repeats + 1):
                for impl, worker in workers.items():
                    worker.stdin.write(f"{round_index}\n")
                    worker.stdin.flush()
                    timings[impl].append(float(read_until(worker, "RESULT ", impl)))
                loads.append(os.getloadavg()[0])
        finally:
            for worker in workers.values():
                worker.stdin.close()
                worker.wait(timeout=120)

    results = {}
    for impl, seconds in timings.items():
        median = statistics.median(seconds)
        results[impl] = {
            "batch_seconds": seconds,
            "median_batch_seconds": median,
            "requests_per_second": args.requests / median,
        }
    ratio = results["transformers"]["requests_per_second"] / results["plugin"]["requests_per_second"]
    print(
        f"\nvLLM throughput, {args.fuser}, shape {shape}, {args.requests} requests x {args.max_tokens} tokens, TP 1, "
        f"median of {args.repeats} interleaved rounds ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {min(loads):.1f} to {max(loads):.1f})"
    )
    print(f"{'route':<14}{'batch s':>10}{'req/s':>10}")
    for impl, row in results.items():
        print(f"{impl:<14}{row['median_batch_seconds']:>10.3f}{row['requests_per_second']:>10.2f}")
    print(f"Transformers backend / plugin throughput: {ratio:.3f}")
    if args.json:
        settings = {key: getattr(args, key) for key in ("fuser", "requests", "max_tokens", "repeats")}
        summary = {"shape": shape, "settings": settings, "load_average": loads, "results": results, "ratio": ratio}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
