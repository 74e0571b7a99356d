"""Train the toy fused LLaVA of `examples/toy-fused-llava/`: a tiny random LLaVA (`hf_fusedvlm.tiny`) converted to
`mmfuser` and trained with `fusedvlm-train` (stage2) on synthetic colour and position questions, then scored on a
held-out set (greedy answers).

    python examples/train_toy_fused_llava.py --output examples/toy-fused-llava

The budget is what makes it work: with the benchmark's 250 steps of 16 samples the tiny models only learn each
question kind's answer set (loss plateau at log(4) per answer) and stay at chance; grounding on the image starts after
about 500 steps of 32 samples on one kind and is above 0.8 held-out colour accuracy after about 1,000.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoProcessor

from hf_fusedvlm import FusedLlavaForConditionalGeneration
from hf_fusedvlm.parity import fused_from_llava
from hf_fusedvlm.processing_fused_llava import FusedLlavaProcessor
from hf_fusedvlm.synthetic_vqa import answer_questions, generate_samples, score_answers, write_llava_dataset
from hf_fusedvlm.tiny import build_tiny_llava
from hf_fusedvlm.training import main as train_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for the trained checkpoint")
    parser.add_argument("--kinds", default="colour,position")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-samples", type=int, default=8000)
    parser.add_argument("--test-samples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp16", action="store_true", help="store the saved weights in float16")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip())
    with tempfile.TemporaryDirectory(prefix="toy-fused-llava-") as work:
        work = Path(work)
        data = write_llava_dataset(work / "data", args.train_samples, seed=0, kinds=kinds)
        llava, llava_processor = build_tiny_llava(seed=0)
        fused_from_llava(llava, "mmfuser", fuser_num_heads=4).save_pretrained(work / "start")
        FusedLlavaProcessor.from_llava_processor(llava_processor).save_pretrained(work / "start")
        arguments = [
            "--model_name_or_path",
            str(work / "start"),
            "--data_path",
            str(data),
            "--output_dir",
            args.output,
            "--stage",
            "stage2",
            "--max_steps",
            str(args.steps),
            "--per_device_train_batch_size",
            str(args.batch_size),
            "--learning_rate",
            str(args.learning_rate),
            "--lr_scheduler_type",
            "cosine",
            "--warmup_steps",
            "50",
            "--weight_decay",
            "0",
            "--seed",
            str(args.seed),
            "--data_seed",
            str(args.seed),
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--logging_steps",
            str(max(1, args.steps // 10)),
            "--dataloader_pin_memory",
            "false",
            "--use_cpu",
            "true",
        ]
        start = time.perf_counter()
        train_main(arguments)
        seconds = time.perf_counter() - start
        card = Path(args.output) / "README.md"
        if card.is_file():  # the card's training command names the temporary folder: keep it machine-independent
            card.write_text(card.read_text().replace(str(work), "WORK"))
    # Trainer's pickled TrainingArguments: the card already records the command, and a pickle has no place in a repo.
    (Path(args.output) / "training_args.bin").unlink(missing_ok=True)
    model = FusedLlavaForConditionalGeneration.from_pretrained(args.output).eval()
    if args.fp16:
        model.half().save_pretrained(args.output)
        model = FusedLlavaForConditionalGeneration.from_pretrained(args.output, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.output)
    test = generate_samples(args.test_samples, seed=1000, kinds=kinds)
    answers, _ = answer_questions(model, processor, test)
    scores = score_answers(test, answers)
    result = {"train_seconds": round(seconds), "arguments": vars(args), **scores}
    print(json.dumps(result, indent=1))
    (Path(args.output) / "toy_eval.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
