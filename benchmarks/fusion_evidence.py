"""Evidence that fusion helps, at toy scale: a coarse-trained tower, its layer-wise probe curve, and an equal-budget
comparison of `none`, `concat`, `average`, `mmfuser` and `igva` on the synthetic fine-grained VQA task.

1. The tiny LLaVA's vision tower (`hf_fusedvlm.tiny`) is pretrained on coarse attributes only (the square's colour
   and side, `hf_fusedvlm.evidence.pretrain_coarse_tower`), a CLIP in miniature; a linear probe per hidden state and
   detail kind measures what each layer keeps.
2. That LLaVA is converted to every fuser with parity initialisation (`fused_from_llava`), so all start from the same
   function, and trained with the `fusedvlm-train` recipe (`stage1`: fuser and projector; then `stage2`: plus the
   LLM; the tower stays frozen) on the same data, steps and seeds.
3. Greedy answers on a held-out set are scored per question kind with `score_answers`; igva's group weights are
   averaged per kind. With `--keep-checkpoints`, the final checkpoints stay for a harness (see
   `benchmarks/lmms_eval_fusion.py`).

    python benchmarks/fusion_evidence.py                # the committed run (about an hour on 2 busy CPU cores)
    python benchmarks/fusion_evidence.py --quick        # smoke size, seconds

Results: `--output` (JSON: seeds, accuracy per fuser, kind and seed, igva weights per kind, probe curves) and, with
`--plots`, three PNGs. The JSON is rewritten after every trained model, so an interrupted run leaves its finished part.
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
from hf_fusedvlm.evidence import layer_probe, pixel_values, pretrain_coarse_tower
from hf_fusedvlm.processing_fused_llava import FusedLlavaProcessor
from hf_fusedvlm.synthetic_vqa import QUESTION_KINDS, answer_questions, generate_samples, score_answers, write_llava_dataset
from hf_fusedvlm.tiny import build_tiny_instruction_encoder, build_tiny_llava
from hf_fusedvlm.training import main as train_main


FUSERS = ("none", "concat", "average", "mmfuser", "igva")
FUSER_OPTIONS = {"igva": {"aggregator_hidden_size": 64, "aggregator_num_layers": 2}, "mmfuser": {"fuser_num_heads": 4}}
# Disjoint synthetic sets (seeds of `generate_samples`).
TRAIN_SET, TEST_SET, TOWER_SET, PROBE_TRAIN_SET, PROBE_TEST_SET = 0, 1000, 2000, 3000, 3001


def coarse_tower_llava(args):
    """The tiny LLaVA (seed 0) with its tower pretrained on coarse attributes; returns it, its processor, the probe
    curves of the pretrained tower and of the same tower before pretraining, and the pretraining's final loss."""
    llava, processor = build_tiny_llava(seed=0)
    tower, image_processor = llava.model.vision_tower, processor.image_processor
    if args.tower_from:
        # The tower of an earlier run's checkpoint (frozen there, so exactly the pretrained one): more seeds of the
        # same experiment without pretraining again; the probe curves belong to that earlier run.
        trained = FusedLlavaForConditionalGeneration.from_pretrained(args.tower_from)
        tower.load_state_dict(trained.model.vision_tower.state_dict())
        return llava, processor, {}, {}, float("nan")
    probe_sets = [generate_samples(count, seed) for count, seed in
                  ((args.probe_samples, PROBE_TRAIN_SET), (args.probe_samples // 2, PROBE_TEST_SET))]
    probe_pixels = [pixel_values(image_processor, samples) for samples in probe_sets]
    probe_args = (probe_pixels[0], probe_sets[0], probe_pixels[1], probe_sets[1])
    random_probe = layer_probe(tower, *probe_args, steps=args.probe_steps)
    tower_samples = generate_samples(args.tower_samples, TOWER_SET)
    losses = pretrain_coarse_tower(tower, pixel_values(image_processor, tower_samples), tower_samples,
                                   steps=args.tower_steps, seed=0)
    probe = layer_probe(tower, *probe_args, steps=args.probe_steps)
    return llava, processor, probe, random_probe, statistics.mean(losses[-20:])


def convert(llava, llava_processor, fuser: str, folder: Path) -> Path:
    """`llava` converted to `fuser` (parity initialisation), saved with its processor."""
    encoder, instruction_tokenizer = build_tiny_instruction_encoder(seed=0)
    with_encoder = fuser == "igva"
    model = fused_from_llava(llava, fuser, instruction_encoder=encoder if with_encoder else None,
                             **FUSER_OPTIONS.get(fuser, {}))
    model.save_pretrained(folder)
    FusedLlavaProcessor.from_llava_processor(
        llava_processor, instruction_tokenizer if with_encoder else None
    ).save_pretrained(folder)
    return folder


def train(start: Path, data: Path, output: Path, stage: str, steps: int, seed: int, args) -> float:
    """One stage of the package's recipe from `start` into `output`; returns the wall time in seconds."""
    arguments = [
        "--model_name_or_path", str(start), "--data_path", str(data), "--output_dir", str(output), "--stage", stage,
        "--max_steps", str(steps), "--per_device_train_batch_size", str(args.batch_size), "--learning_rate",
        str(args.learning_rate), "--lr_scheduler_type", "cosine", "--warmup_steps", str(max(1, steps // 10)),
        "--weight_decay", "0", "--seed", str(seed), "--data_seed", str(seed), "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", str(max(1, steps // 5)),
        "--dataloader_pin_memory", "false",
    ]
    start_time = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        train_main(arguments)
    return time.perf_counter() - start_time


def evidence_json(args, runs: list[dict], probe: dict, random_probe: dict, tower_loss: float) -> dict:
    """The results in the committed shape, plus the budget and every run's details."""
    accuracy = {
        fuser: {kind: [run["accuracy"][kind] for run in runs if run["fuser"] == fuser] for kind in [*args.kinds, "all"]}
        for fuser in args.fusers if any(run["fuser"] == fuser for run in runs)
    }
    igva = [run for run in runs if run["fuser"] == "igva"]
    igva_weights = {
        kind: [statistics.mean(column) for column in zip(*(run["group_weights"][kind] for run in igva))]
        for kind in [*args.kinds, "all"]
    } if igva else {}
    return {
        "seeds": args.seeds,
        "accuracy": accuracy,
        "igva_weights": igva_weights,
        "probe": probe,
        "probe_random_tower": random_probe,
        "budget": {
            "tower_steps": args.tower_steps, "tower_final_loss": tower_loss, "stage1_steps": args.stage1_steps,
            "stage2_steps": args.stage2_steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
            "train_samples": args.train_samples, "test_samples": args.test_samples, "kinds": list(args.kinds),
            "quick": args.quick,
        },
        "runs": runs,
    }


def summary_table(results: dict) -> str:
    """Markdown: accuracy mean ± std over seeds per fuser and kind, then igva's mean weights per kind."""
    kinds = list(next(iter(results["accuracy"].values())))
    lines = ["| fuser | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for fuser, per_kind in results["accuracy"].items():
        cells = []
        for kind in kinds:
            values = per_kind[kind]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        lines.append(f"| {fuser} | " + " | ".join(cells) + " |")
    harness = results.get("harness")
    if harness:
        lines += ["", f"| lmms-eval ({harness['model']} model) | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        for fuser, per_kind in sorted(harness["accuracy"].items(), key=lambda item: list(results["accuracy"]).index(item[0])):
            cells = [f"{statistics.mean(per_kind[kind]):.3f} ± "
                     f"{statistics.stdev(per_kind[kind]) if len(per_kind[kind]) > 1 else 0.0:.3f}" for kind in kinds]
            lines.append(f"| {fuser} | " + " | ".join(cells) + " |")
    if results["igva_weights"]:
        groups = len(results["igva_weights"]["all"])
        lines += ["", "| igva: mean group weight | " + " | ".join(f"group {k + 1}" for k in range(groups)) + " |",
                  "|---|" + "---:|" * groups]
        for kind, weights in results["igva_weights"].items():
            lines.append(f"| {kind} | " + " | ".join(f"{value:.3f}" for value in weights) + " |")
    if not results["probe"]:
        return "\n".join(lines)
    lines += ["", "| probe: hidden state | " + " | ".join(results["probe"]) + " |", "|---|" + "---:|" * len(results["probe"])]
    for layer in range(len(next(iter(results["probe"].values())))):
        lines.append(f"| {layer} | " + " | ".join(f"{curve[layer]:.2f}" for curve in results["probe"].values()) + " |")
    return "\n".join(lines)


def save_plots(results: dict, folder: Path) -> list[Path]:
    """Probe curves, accuracy per kind and fuser (mean ± std bars) and igva's weights as a heatmap, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for kind, curve in results["probe"].items():
        axis.plot(range(len(curve)), curve, marker="o", label=kind)
        axis.plot(range(len(curve)), results["probe_random_tower"][kind], linestyle=":", color=axis.lines[-1].get_color())
    axis.set(xlabel="hidden state (0 = embeddings)", ylabel="linear probe accuracy", ylim=(0, 1.02),
             title="Coarse-trained tower (dotted: before training)")
    axis.legend(fontsize=8, loc="center right")
    figure.tight_layout()
    paths.append(folder / "fusion_evidence_probe.png")
    figure.savefig(paths[-1], dpi=110)

    kinds = list(next(iter(results["accuracy"].values())))
    fusers = list(results["accuracy"])
    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(fusers)
    for index, fuser in enumerate(fusers):
        values = [results["accuracy"][fuser][kind] for kind in kinds]
        means = [statistics.mean(value) for value in values]
        spreads = [statistics.stdev(value) if len(value) > 1 else 0.0 for value in values]
        axis.bar([k + (index - (len(fusers) - 1) / 2) * width for k in range(len(kinds))], means, width,
                 yerr=spreads, capsize=2, label=fuser)
    axis.set_xticks(range(len(kinds)), kinds)
    axis.set(ylabel="held-out accuracy", ylim=(0, 1.15),
             title=f"Equal budget, mean ± std over seeds {results['seeds']}")
    axis.legend(fontsize=8, ncols=len(fusers), loc="upper center")
    figure.tight_layout()
    paths.append(folder / "fusion_evidence_accuracy.png")
    figure.savefig(paths[-1], dpi=110)

    if results["igva_weights"]:
        rows = list(results["igva_weights"])
        matrix = [results["igva_weights"][kind] for kind in rows]
        figure, axis = plt.subplots(figsize=(4.5, 3))
        image = axis.imshow(matrix, cmap="viridis", aspect="auto")
        axis.set_yticks(range(len(rows)), rows)
        axis.set_xticks(range(len(matrix[0])), [f"group {k + 1}" for k in range(len(matrix[0]))])
        for row, weights in enumerate(matrix):
            for column, weight in enumerate(weights):
                axis.text(column, row, f"{weight:.2f}", ha="center", va="center", color="white", fontsize=8)
        axis.set_title("igva: mean layer-group weight per question kind")
        figure.colorbar(image)
        figure.tight_layout()
        paths.append(folder / "fusion_evidence_igva_weights.png")
        figure.savefig(paths[-1], dpi=110)
    plt.close("all")
    return paths


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    llava, processor, probe, random_probe, tower_loss = coarse_tower_llava(args)
    print(f"tower pretrained ({time.perf_counter() - began:.0f} s), final loss {tower_loss:.3f}", file=sys.stderr)
    test_samples = generate_samples(args.test_samples, seed=TEST_SET, kinds=args.kinds)
    runs = []
    with tempfile.TemporaryDirectory(prefix="fusion-evidence-") as work:
        work = Path(work)
        data = write_llava_dataset(work / "data", args.train_samples, seed=TRAIN_SET, kinds=args.kinds)
        if args.keep_checkpoints:
            write_llava_dataset(Path(args.keep_checkpoints) / "test", args.test_samples, seed=TEST_SET, kinds=args.kinds)
        for seed in args.seeds:
            for fuser in args.fusers:
                start = convert(llava, processor, fuser, work / f"start-{fuser}")
                stage1, stage2 = work / f"{fuser}-{seed}-stage1", work / f"{fuser}-{seed}-stage2"
                if args.keep_checkpoints:
                    stage2 = Path(args.keep_checkpoints) / f"{fuser}-seed{seed}"
                seconds = train(start, data, stage1, "stage1", args.stage1_steps, seed, args)
                seconds += train(stage1, data, stage2, "stage2", args.stage2_steps, seed, args)
                model = FusedLlavaForConditionalGeneration.from_pretrained(stage2).eval()
                answers, weights = answer_questions(model, AutoProcessor.from_pretrained(stage2), test_samples)
                scores = score_answers(test_samples, answers, weights)
                runs.append({"fuser": fuser, "seed": seed, "train_seconds": round(seconds, 1), **scores})
                print(f"  {fuser:8s} seed {seed}: accuracy {scores['accuracy']['all']:.3f} ({seconds:.0f} s, "
                      f"{time.perf_counter() - began:.0f} s so far)", file=sys.stderr)
                results = evidence_json(args, runs, probe, random_probe, tower_loss)
                results["wall_seconds"] = round(time.perf_counter() - began, 1)
                Path(args.output).write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke size: 1 seed, 2 + 2 steps, 20 test samples")
    parser.add_argument("--fusers", type=lambda text: tuple(text.split(",")), default=FUSERS)
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--tower-steps", type=int, default=800, help="coarse pretraining steps of 64 images")
    parser.add_argument("--tower-samples", type=int, default=4000)
    parser.add_argument("--probe-samples", type=int, default=1000, help="probe training images (half as many test)")
    parser.add_argument("--probe-steps", type=int, default=150)
    parser.add_argument("--stage1-steps", type=int, default=100)
    parser.add_argument("--stage2-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-samples", type=int, default=8000)
    parser.add_argument("--test-samples", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; on CPUs shared with other jobs 1 is often several times faster")
    parser.add_argument("--kinds", type=lambda text: tuple(kind.strip() for kind in text.split(",") if kind.strip()),
                        default=QUESTION_KINDS, help="comma-separated question kinds to train and test on")
    parser.add_argument("--output", default="fusion_evidence.json")
    parser.add_argument("--plots", default=None, help="folder for the PNG plots (none when omitted)")
    parser.add_argument("--keep-checkpoints", default=None,
                        help="folder that keeps every final checkpoint (`FUSER-seedN/`) and the test set (`test/`)")
    parser.add_argument("--tower-from", default=None, metavar="CHECKPOINT",
                        help="take the pretrained tower from a checkpoint of an earlier run (no pretraining, no probe)")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="train nothing: print the tables of a finished run's JSON (and --plots its plots)")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print(summary_table(results))
        for path in save_plots(results, Path(args.plots)) if args.plots else []:
            print(f"wrote {path}")
        return 0
    unknown = sorted(set(args.fusers) - set(FUSERS))
    if unknown:
        parser.error(f"unknown fusers {unknown}: choose from {', '.join(FUSERS)}")
    if args.quick:
        args.seeds, args.tower_steps, args.tower_samples = args.seeds[:1], 5, 64
        args.probe_samples, args.probe_steps, args.stage1_steps, args.stage2_steps = 64, 5, 2, 2
        args.batch_size, args.train_samples, args.test_samples = 4, 16, 20
    results = run(args)
    print(summary_table(results))
    if args.plots:
        for path in save_plots(results, Path(args.plots)):
            print(f"wrote {path}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
