"""Experiment: train plain (`none`), `concat`, `mmfuser` and `igva` tiny models on the synthetic fine-grained VQA task
with the same recipe, budget and seeds; report answer accuracy per question kind and igva's mean group weights.

Every model starts from the same deterministic tiny LLaVA (`hf_fusedvlm.tiny`, random weights), converted with parity
initialisation, and is trained with `fusedvlm-train`'s recipe (stage2: fuser, projector and LLM trainable; the random
LLM has to learn too) on the same synthetic training set; accuracy is the greedy answer's first word on a held-out set.

    python benchmarks/train_fusers.py            # 2 seeds x 250 steps: about 7 minutes on 2 idle CPU cores
    python benchmarks/train_fusers.py --quick    # smoke size
    python benchmarks/train_fusers.py --kinds colour,position --steps 3000 --batch-size 32 --train-samples 8000

The default budget (250 steps of 16 samples over four question kinds) is far too small for the random tiny models to
ground their answers: they first learn each kind's answer set (loss plateau at log(4) per answer) and only start to
read the image after about 500 steps of 32 samples on a single kind, so every fuser stays at chance with it.
"""

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoProcessor

from hf_fusedvlm import FusedLlavaForConditionalGeneration
from hf_fusedvlm.conversion import fused_from_llava
from hf_fusedvlm.processing_fused_llava import FusedLlavaProcessor
from hf_fusedvlm.synthetic_vqa import QUESTION_KINDS, answer_questions, generate_samples, score_answers, write_llava_dataset
from hf_fusedvlm.tiny import build_tiny_instruction_encoder, build_tiny_llava
from hf_fusedvlm.training import main as train_main


FUSERS = ("none", "concat", "mmfuser", "igva")
FUSER_OPTIONS = {"igva": {"aggregator_hidden_size": 64, "aggregator_num_layers": 2}, "mmfuser": {"fuser_num_heads": 4}}


def convert(fuser: str, folder: Path) -> Path:
    """The tiny LLaVA converted to `fuser` (parity initialisation), saved with its processor."""
    llava, llava_processor = build_tiny_llava(seed=0)
    encoder, instruction_tokenizer = build_tiny_instruction_encoder(seed=0)
    with_encoder = fuser == "igva"
    model = fused_from_llava(llava, fuser, instruction_encoder=encoder if with_encoder else None,
                             **FUSER_OPTIONS.get(fuser, {}))
    model.save_pretrained(folder)
    FusedLlavaProcessor.from_llava_processor(
        llava_processor, instruction_tokenizer if with_encoder else None
    ).save_pretrained(folder)
    return folder


def train(start: Path, data: Path, output: Path, steps: int, seed: int, batch_size: int, learning_rate: float) -> float:
    """Train with the package's recipe; returns the wall time in seconds."""
    arguments = [
        "--model_name_or_path", str(start), "--data_path", str(data), "--output_dir", str(output), "--stage", "stage2",
        "--max_steps", str(steps), "--per_device_train_batch_size", str(batch_size), "--learning_rate",
        str(learning_rate), "--lr_scheduler_type", "cosine", "--warmup_steps", str(max(1, steps // 10)),
        "--weight_decay", "0", "--seed", str(seed), "--data_seed", str(seed), "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", str(max(1, steps // 5)),
        "--dataloader_pin_memory", "false",
    ]
    start_time = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        train_main(arguments)
    return time.perf_counter() - start_time


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    results = {"config": vars(args), "runs": []}
    test_samples = generate_samples(args.test_samples, seed=1000, kinds=args.kinds)
    with tempfile.TemporaryDirectory(prefix="train-fusers-") as work:
        work = Path(work)
        data = write_llava_dataset(work / "data", args.train_samples, seed=0, kinds=args.kinds)
        for fuser in FUSERS:
            start = convert(fuser, work / f"start-{fuser}")
            for seed in args.seeds:
                output = work / f"{fuser}-{seed}"
                seconds = train(start, data, output, args.steps, seed, args.batch_size, args.learning_rate)
                model = FusedLlavaForConditionalGeneration.from_pretrained(output).eval()
                processor = AutoProcessor.from_pretrained(output)
                answers, weights = answer_questions(model, processor, test_samples)
                scores = score_answers(test_samples, answers, weights)
                results["runs"].append({"fuser": fuser, "seed": seed, "train_seconds": seconds, **scores})
                print(f"  {fuser:8s} seed {seed}: accuracy {scores['accuracy']['all']:.3f} ({seconds:.0f} s)",
                      file=sys.stderr)
    return results


def summary_tables(results: dict) -> str:
    kinds = [*results["config"].get("kinds", QUESTION_KINDS), "all"]
    lines = ["| fuser | " + " | ".join(kinds) + " | train s |", "|---|" + "---:|" * (len(kinds) + 1)]
    for fuser in FUSERS:
        runs = [run for run in results["runs"] if run["fuser"] == fuser]
        cells = [f"{statistics.mean(run['accuracy'][kind] for run in runs):.3f}" for kind in kinds]
        seconds = statistics.median(run["train_seconds"] for run in runs)
        lines.append(f"| {fuser} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    igva = [run for run in results["runs"] if run["fuser"] == "igva"]
    if igva and igva[0]["group_weights"]:
        groups = len(igva[0]["group_weights"]["all"])
        lines += ["", "| igva: mean group weight | " + " | ".join(f"group {k + 1}" for k in range(groups)) + " |",
                  "|---|" + "---:|" * groups]
        for kind in kinds:
            means = [statistics.mean(run["group_weights"][kind][k] for run in igva) for k in range(groups)]
            lines.append(f"| {kind} | " + " | ".join(f"{value:.3f}" for value in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke size: 1 seed, 10 steps, 40 test samples")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0, 1])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--test-samples", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", type=lambda text: tuple(kind.strip() for kind in text.split(",") if kind.strip()),
                        default=QUESTION_KINDS, help="comma-separated question kinds to train and test on")
    parser.add_argument("--output", default="train_fusers.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.train_samples, args.test_samples = 10, [0], 200, 40
    results = run(args)
    table = summary_tables(results)
    print(f"Answer accuracy per question kind (mean of seeds {args.seeds}, {args.steps} steps of "
          f"{args.batch_size}, held-out set of {args.test_samples}; chance: 0.25, digit 0.10)\n")
    print(table)
    results["table"] = table
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
