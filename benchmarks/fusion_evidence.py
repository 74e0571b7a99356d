"""Evidence that fusion helps, at toy scale: a coarse-trained tower whose detail decays with depth, its layer-wise
probe curve, and an equal-budget comparison of `none`, `concat`, `average`, `mmfuser` and `igva`.

1. A tiny LLaVA with a 32 px, 6-layer, 64-wide CLIP tower (8 px patches: one cell of the digits scene of
   `hf_fusedvlm.synthetic_vqa` per patch) whose tower is pretrained on the coarse objective only
   (`hf_fusedvlm.evidence.pretrain_coarse_tower`: colour and side of the square from the pooled output, its top two
   hidden states invariant to the handwritten digit and the shape). A pooled probe per hidden state and detail kind, trained on
   images of the train handwriting and scored on the validation handwriting, measures what each layer keeps.
2. That LLaVA is converted to every fuser with parity initialisation (`fused_from_llava`), so all start from the same
   function, and trained with the `fusedvlm-train` recipe (`stage1`: fuser and projector; then `stage2`: plus the
   LLM; the tower stays frozen) on the same data, steps and seeds.
3. Greedy answers to held-out questions (validation and test handwriting, disjoint from the training one) are scored
   per question kind with `score_answers`; igva's group weights are averaged per kind; mmfuser's sampling is measured
   on the test images (the share of its attention that lands on the cells holding the digit and the shape).

    python benchmarks/fusion_evidence.py --jobs 2          # the committed run (about 40 minutes on 2 CPU cores)
    python benchmarks/fusion_evidence.py --quick           # smoke size, about a minute

Results: `--output` (JSON: seeds, accuracy per fuser, kind and seed, the paired differences to `none`, igva weights
per kind, probe curves, chance levels, the tower's settings) and, with `--plots`, three PNGs. The JSON is rewritten
after every trained model, so an interrupted run leaves its finished part. `--keep-checkpoints` keeps every final
checkpoint and the test set for a harness (`benchmarks/lmms_eval_fusion.py`).
"""

import argparse
import contextlib
import io
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from hf_fusedvlm.evidence import chance, layer_probe, pixel_values, pretrain_coarse_tower
from hf_fusedvlm.synthetic_vqa import (
    CELL,
    DIGIT_SCENE_KINDS,
    GRID,
    SyntheticSample,
    digit_scene_details,
    draw_digit_scene,
    generate_samples,
    resample_fine_details,
    write_llava_dataset,
)


FUSERS = ("none", "concat", "average", "mmfuser", "igva")
FINE_KINDS, COARSE_KINDS = ("digit", "shape"), ("colour", "position")
# The 6-layer tower's hidden states are 0 (embeddings) to 6; LLaVA's base layer is 5 (-2). The fusers read the
# shallow hidden states where the probe on the validation handwriting finds the detail (0-3), as the papers'
# defaults read the shallow layers of CLIP-L; the query / base layer stays LLaVA's.
FUSER_LAYERS = [0, 1, 2, 3, 5]
FUSER_LAYER_GROUPS = [[0, 1], [2, 3], [4, 5], [6]]
FUSER_OPTIONS = {
    "concat": {"fuser_layers": FUSER_LAYERS},
    # One sampling point per head and level: with more, Deformable-DETR's grid initialisation puts them on
    # neighbouring cells (most outside a 4x4 grid), never on the query's own cell where the detail is.
    # Its first point starts on the query's own cell (`from_query`), where a one-cell detail is; chosen on validation
    # (docs/evidence.md, Diagnosis).
    "mmfuser": {
        "fuser_layers": FUSER_LAYERS,
        "fuser_num_heads": 4,
        "fuser_num_points": 1,
        "fuser_offset_init": "from_query",
    },
    "average": {"fuser_layer_groups": FUSER_LAYER_GROUPS},
    # Each image's entropy (the paper's balance loss) at 0.005, with the fuser at a tenth of the rate (LR_SCALES) and
    # a SimCSE-trained instruction encoder: the kinds the base layer answers spread their weights, the fine ones keep
    # group 1. At the full rate the softmax saturates on group 1 for every kind; at 0.007-0.01 one seed in five lost
    # the digit (chosen on validation: docs/evidence.md, "igva's weights").
    "igva": {
        "fuser_layer_groups": FUSER_LAYER_GROUPS,
        "aggregator_hidden_size": 64,
        "aggregator_num_layers": 2,
        "balance_loss_weight": 0.005,
        "balance_loss_type": "sample_entropy",
    },
}
# Learning rates as multiples of --learning-rate, by parameter-name part: mmfuser's sampling offsets train at a tenth
# of the rate (Deformable DETR's multiplier); at the full rate they drift off the 4x4 grid. igva's fuser trains at a
# tenth of the rate, so that its softmax does not saturate before the balance loss acts (both chosen on validation).
LR_SCALES = {"mmfuser": {"sampling_offsets": 0.1}, "igva": {"model.fuser.": 0.1}}
# Disjoint synthetic sets (seeds of `generate_samples`); the handwriting of each comes from its own split.
TRAIN_SET, VALIDATION_SET, TEST_SET, TOWER_SET, PROBE_TRAIN_SET, PROBE_TEST_SET = 0, 1000, 2000, 3000, 4000, 4001


def evidence_llava(seed: int = 0):
    """The tiny LLaVA of `hf_fusedvlm.tiny` at 32 px (16 patches) with a 256-wide MLP in its tower, every weight
    initialised as transformers initialises a new model (seeded): the tiny builder's std-0.2 weights suit parity
    tests, not training from scratch."""
    from transformers import LlavaForConditionalGeneration

    from hf_fusedvlm.tiny import build_tiny_llava

    llava, processor = build_tiny_llava(seed=seed, image_size=CELL * GRID)
    config = llava.config
    config.vision_config.intermediate_size = 256
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        llava = LlavaForConditionalGeneration(config).eval()
    llava.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return llava, processor


def coarse_tower_llava(args):
    """The evidence LLaVA with its tower pretrained on the coarse objective; returns it, its processor, the probe
    curves of the pretrained tower and of the same tower before pretraining, and the final loss."""
    llava, processor = evidence_llava(seed=0)
    tower, image_processor = llava.model.vision_tower, processor.image_processor
    probe_sets = [
        generate_samples(args.probe_samples, PROBE_TRAIN_SET, scene="digits", split="train"),
        generate_samples(args.probe_samples // 2, PROBE_TEST_SET, scene="digits", split="validation"),
    ]
    probe_pixels = [pixel_values(image_processor, samples) for samples in probe_sets]
    probe_args = (probe_pixels[0], probe_sets[0], probe_pixels[1], probe_sets[1], DIGIT_SCENE_KINDS, args.probe_steps)
    random_probe = layer_probe(tower, *probe_args)
    rng = random.Random("fusion-evidence/tower")
    details = [digit_scene_details(rng, "train") for _ in range(args.tower_samples)]
    twins = [resample_fine_details(rng, detail, "train") for detail in details]
    samples = [SyntheticSample(draw_digit_scene(detail), "colour", "", "", detail) for detail in details]
    twin_images = [SyntheticSample(draw_digit_scene(twin), "colour", "", "", twin) for twin in twins]
    losses = pretrain_coarse_tower(
        tower,
        pixel_values(image_processor, samples),
        samples,
        steps=args.tower_steps,
        batch_size=args.tower_batch,
        twin_pixels=pixel_values(image_processor, twin_images),
        invariance_weight=args.invariance_weight,
        seed=0,
    )
    probe = layer_probe(tower, *probe_args)
    return llava, processor, probe, random_probe, statistics.mean(losses[-20:])


def convert(source: Path, fuser: str, folder: Path, options: dict, instruction_encoder_steps: int) -> Path:
    """The source LLaVA converted to `fuser` with the config fields `options` (parity initialisation), saved with its
    processor. A fuser that reads the instruction gets the tiny sentence encoder, first trained
    `instruction_encoder_steps` steps with unsupervised SimCSE on the experiment's questions (no labels)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from hf_fusedvlm.conversion import fused_from_llava
    from hf_fusedvlm.evidence import pretrain_instruction_encoder
    from hf_fusedvlm.processing_fused_llava import FusedLlavaProcessor
    from hf_fusedvlm.synthetic_vqa import QUESTIONS
    from hf_fusedvlm.tiny import build_tiny_instruction_encoder

    llava = LlavaForConditionalGeneration.from_pretrained(source)
    encoder, instruction_tokenizer = build_tiny_instruction_encoder(seed=0)
    with_encoder = fuser == "igva"
    if with_encoder and instruction_encoder_steps:
        questions = [question for kind in DIGIT_SCENE_KINDS for question in QUESTIONS[kind]]
        pretrain_instruction_encoder(encoder, instruction_tokenizer, questions, steps=instruction_encoder_steps)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same new fuser weights for every seed: seeds vary the data order only
        model = fused_from_llava(llava, fuser, instruction_encoder=encoder if with_encoder else None, **options)
    model.save_pretrained(folder)
    FusedLlavaProcessor.from_llava_processor(
        AutoProcessor.from_pretrained(source), instruction_tokenizer if with_encoder else None
    ).save_pretrained(folder)
    return folder


def train(
    start: Path, data: Path, output: Path, stage: str, steps: int, seed: int, settings: dict, scales: dict | None = None
) -> float:
    """One stage of the package's recipe from `start` into `output`, the parameters named in `scales` ({name part:
    scale}) at scale x the learning rate (`fusedvlm-train --parameter_learning_rates`); returns the wall time in
    seconds."""
    from hf_fusedvlm.training import main as train_main

    arguments = [
        "--model_name_or_path",
        str(start),
        "--data_path",
        str(data),
        "--output_dir",
        str(output),
        "--stage",
        stage,
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        str(settings["batch_size"]),
        "--learning_rate",
        str(settings["learning_rate"]),
        "--lr_scheduler_type",
        "cosine",
        "--warmup_steps",
        str(max(1, steps // 10)),
        "--weight_decay",
        "0",
        "--seed",
        str(seed),
        "--data_seed",
        str(seed),
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        str(max(1, steps // 5)),
        "--dataloader_pin_memory",
        "false",
        "--use_cpu",
        "true",
    ]
    if scales:
        rates = ",".join(f"{name}={scale * settings['learning_rate']:g}" for name, scale in scales.items())
        arguments += ["--parameter_learning_rates", rates]
    start_time = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        train_main(arguments)
    return time.perf_counter() - start_time


def pretrain_llm(llava, work: Path, data: Path, settings: dict, steps: int) -> float:
    """Give `llava` a pretrained language model, as real LLaVAs start from one, and a fresh projector.

    A 2-layer, 64-wide Llama trained from scratch learns to answer from the mean of the image tokens (enough for the
    coarse kinds) but not, within the budget, to attend to the one token that holds a detail. It learns to when every
    answer depends on the image tokens' content: so its weights come from the same tiny LLaVA with an *untrained*
    tower (whose layers all keep the details) trained on the same questions (`stage2`, `steps` steps). Every fuser
    then starts from this language model; the projector is initialised anew. Returns the wall time in seconds."""
    from transformers import AutoProcessor

    from hf_fusedvlm import FusedLlavaForConditionalGeneration
    from hf_fusedvlm.conversion import fused_from_llava
    from hf_fusedvlm.processing_fused_llava import FusedLlavaProcessor

    reader, _ = evidence_llava(seed=0)
    start, output = work / "llm-start", work / "llm-pretrained"
    fused_from_llava(reader, "none").save_pretrained(start)
    FusedLlavaProcessor.from_llava_processor(AutoProcessor.from_pretrained(work / "source")).save_pretrained(start)
    seconds = train(start, data, output, "stage2", steps, 0, settings)
    trained = FusedLlavaForConditionalGeneration.from_pretrained(output)
    llava.model.language_model.load_state_dict(trained.model.language_model.state_dict())
    llava.lm_head.load_state_dict(trained.lm_head.state_dict())
    return seconds


def sampling_on_details(model, processor, samples) -> float:
    """The share of mmfuser's cross-attention (all queries, heads, levels and points) whose sampling point falls in
    the cell of the digit or of the shape, averaged over `samples` (uniform sampling would give 2/16)."""
    from hf_fusedvlm.interpretability import mmfuser_sampling

    pixels = pixel_values(processor.image_processor, samples)
    sampling = mmfuser_sampling(model, pixels)
    rows, columns = sampling.grid_size
    cells = (sampling.locations * torch.tensor([columns, rows])).floor().long()
    column, row = cells[..., 0].clamp(0, columns - 1), cells[..., 1].clamp(0, rows - 1)
    shares = []
    for index, sample in enumerate(samples):
        on_detail = torch.zeros_like(row[index], dtype=torch.bool)
        for detail_row, detail_column in (sample.details["digit_cell"], sample.details["shape_cell"]):
            on_detail |= (row[index] == detail_row) & (column[index] == detail_column)
        weights = sampling.attention_weights[index]
        shares.append((weights * on_detail).sum().item() / weights.sum().item())
    return statistics.mean(shares)


def detail_queries_sampling(model, processor, samples) -> dict:
    """Where the queries at the detail cells read: for the digit's and the shape's cell, the share of that query's
    cross-attention (over heads, levels and points) that samples inside its own cell, per level (hidden state),
    averaged over `samples`. The fused token of a detail cell can only carry the detail from the levels where the
    probe still finds it; at the parity start the weight is spread evenly over the levels."""
    from hf_fusedvlm.interpretability import mmfuser_sampling

    sampling = mmfuser_sampling(model, pixel_values(processor.image_processor, samples))
    rows, columns = sampling.grid_size
    cells = (sampling.locations * torch.tensor([columns, rows])).floor().long()
    column, row = cells[..., 0], cells[..., 1]
    heads = sampling.attention_weights.shape[2]
    shares = {}
    for kind in FINE_KINDS:
        detail_row, detail_column = samples[0].details[f"{kind}_cell"]  # fixed cells in the digits scene
        query = detail_row * columns + detail_column
        inside = (row[:, query] == detail_row) & (column[:, query] == detail_column)
        per_level = (sampling.attention_weights[:, query] * inside).sum(dim=(1, 3)) / heads  # (images, levels)
        shares[kind] = dict(zip(map(str, sampling.level_layers), per_level.mean(0).tolist()))
    return shares


def mmfuser_diagnostics(model, processor, samples) -> dict:
    """Where a trained mmfuser samples, on `samples`: the share of its cross-attention on the detail cells, the share
    whose sampling point lies inside the image (outside, zero padding gives nothing and no gradient), each level's
    share, the mean distance from query to sampling point (in cells) and the mean |gamma1| (0 at the start)."""
    from hf_fusedvlm.interpretability import mmfuser_sampling

    sampling = mmfuser_sampling(model, pixel_values(processor.image_processor, samples))
    weights = sampling.attention_weights
    inside = ((sampling.locations >= 0) & (sampling.locations <= 1)).all(-1)
    return {
        "on_details": sampling_on_details(model, processor, samples),
        "inside_image": ((weights * inside).sum() / weights.sum()).item(),
        "level_share": dict(zip(map(str, sampling.level_layers), sampling.level_share.mean((0, 1)).tolist())),
        "mean_distance": sampling.mean_distance.mean().item(),
        "gamma1": model.model.fuser.gamma1.abs().mean().item(),
    }


def train_and_score(task: dict) -> dict:
    """Worker: convert, train both stages and score one (fuser, seed) on the validation and test questions."""
    from transformers import AutoProcessor

    from hf_fusedvlm import FusedLlavaForConditionalGeneration
    from hf_fusedvlm.synthetic_vqa import answer_questions, score_answers

    torch.set_num_threads(task["threads"])
    fuser, seed, work, settings = task["fuser"], task["seed"], Path(task["work"]), task["settings"]
    start = convert(
        Path(task["source"]),
        fuser,
        work / f"start-{fuser}-{seed}",
        settings["fuser_options"].get(fuser, {}),
        settings["instruction_encoder_steps"],
    )
    stage1, stage2 = work / f"{fuser}-{seed}-stage1", Path(task["final"])
    scales = settings["lr_scales"].get(fuser)
    seconds = train(start, Path(task["data"]), stage1, "stage1", settings["stage1_steps"], seed, settings, scales)
    seconds += train(stage1, Path(task["data"]), stage2, "stage2", settings["stage2_steps"], seed, settings, scales)
    model = FusedLlavaForConditionalGeneration.from_pretrained(stage2).eval()
    processor = AutoProcessor.from_pretrained(stage2)
    run = {"fuser": fuser, "seed": seed, "train_seconds": round(seconds, 1)}
    for split, set_seed in (("validation", VALIDATION_SET), ("test", TEST_SET)):
        samples = generate_samples(settings[f"{split}_samples"], set_seed, scene="digits", split=split)
        answers, weights = answer_questions(model, processor, samples)
        run[split] = score_answers(samples, answers, weights)
        if fuser == "mmfuser" and split == "validation":
            run["mmfuser_validation"] = mmfuser_diagnostics(model, processor, samples[: settings["sampling_images"]])
        if fuser == "mmfuser" and split == "test":
            images = samples[: settings["sampling_images"]]
            run["sampling_on_details"] = sampling_on_details(model, processor, images)
            run["detail_queries"] = detail_queries_sampling(model, processor, images)
            parity_start = FusedLlavaForConditionalGeneration.from_pretrained(start).eval()
            run["detail_queries_at_start"] = detail_queries_sampling(parity_start, processor, images)
    return run


def paired_differences(accuracy: dict, fuser: str, kind: str) -> list[float]:
    """Per seed, `fuser`'s accuracy minus `none`'s on `kind` (the seeds pair the same data order)."""
    return [a - b for a, b in zip(accuracy[fuser][kind], accuracy["none"][kind])]


def evidence_json(settings: dict, runs: list[dict], probe: dict, random_probe: dict, tower_loss: float) -> dict:
    """The results in the committed shape (test split), plus the validation split, the paired differences to
    `none`, chance levels, the settings and every run's details."""
    kinds = [*DIGIT_SCENE_KINDS, "all"]
    fusers = [fuser for fuser in FUSERS if any(run["fuser"] == fuser for run in runs)]

    def accuracy(split):
        return {
            fuser: {kind: [run[split]["accuracy"][kind] for run in runs if run["fuser"] == fuser] for kind in kinds}
            for fuser in fusers
        }

    test = accuracy("test")
    igva = [run for run in runs if run["fuser"] == "igva"]
    igva_weights = (
        {
            kind: [statistics.mean(column) for column in zip(*(run["test"]["group_weights"][kind] for run in igva))]
            for kind in kinds
        }
        if igva
        else {}
    )
    differences = {}
    if "none" in test:
        for fuser in fusers:
            seeds = min(len(test[fuser]["all"]), len(test["none"]["all"]))
            if fuser == "none" or seeds == 0:
                continue
            differences[fuser] = {}
            for kind in kinds:
                values = paired_differences(test, fuser, kind)[:seeds]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                differences[fuser][kind] = {"per_seed": values, "mean": statistics.mean(values), "std": spread}
    sampling = [run["sampling_on_details"] for run in runs if "sampling_on_details" in run]

    def detail_queries(key):
        per_run = [run[key] for run in runs if key in run]
        return (
            {
                kind: {level: statistics.mean(run[kind][level] for run in per_run) for level in per_run[0][kind]}
                for kind in per_run[0]
            }
            if per_run
            else {}
        )

    return {
        "seeds": settings["seeds"],
        "accuracy": test,
        "accuracy_validation": accuracy("validation"),
        "difference_to_none": differences,
        "igva_weights": igva_weights,
        "mmfuser_sampling_on_details": {"per_seed": sampling, "uniform": 2 / GRID**2},
        "mmfuser_detail_queries": {
            "trained": detail_queries("detail_queries"),
            "parity_start": detail_queries("detail_queries_at_start"),
        },
        "probe": probe,
        "probe_random_tower": random_probe,
        "chance": {kind: chance(kind) for kind in DIGIT_SCENE_KINDS},
        "fine_kinds": list(FINE_KINDS),
        "coarse_kinds": list(COARSE_KINDS),
        "tower": {
            "image_size": CELL * GRID,
            "patch_size": CELL,
            "hidden_size": 64,
            "intermediate_size": 256,
            "layers": 6,
            "base_hidden_state": 5,
            "pretraining": "colour and side from the pooled output; hidden states 5 and 6 invariant to the fine details",
            "steps": settings["tower_steps"],
            "batch_size": settings["tower_batch"],
            "invariance_weight": settings["invariance_weight"],
            "final_loss": tower_loss,
        },
        "fuser_options": settings["fuser_options"],
        "lr_scales": settings["lr_scales"],
        "instruction_encoder_steps": settings["instruction_encoder_steps"],
        "budget": {
            key: settings[key]
            for key in (
                "llm_steps",
                "stage1_steps",
                "stage2_steps",
                "batch_size",
                "learning_rate",
                "train_samples",
                "validation_samples",
                "test_samples",
                "quick",
            )
        },
        "runs": runs,
    }


def summary_table(results: dict) -> str:
    """Markdown: accuracy mean ± std over seeds per fuser and kind, the paired differences to `none`, igva's mean
    weights per kind, mmfuser's sampling on the details and the probe curve."""

    def mean_std(values):
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"

    kinds = list(next(iter(results["accuracy"].values())))
    chance_row = " | ".join(f"{results['chance'][kind]:.2f}" if kind in results["chance"] else "" for kind in kinds)
    lines = ["| fuser | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds), f"| chance | {chance_row} |"]
    for fuser, per_kind in results["accuracy"].items():
        lines.append(f"| {fuser} | " + " | ".join(mean_std(per_kind[kind]) for kind in kinds) + " |")
    if results["difference_to_none"]:
        lines += [
            "",
            "| paired difference to none (mean ± std over seeds) | " + " | ".join(kinds) + " |",
            "|---|" + "---:|" * len(kinds),
        ]
        for fuser, per_kind in results["difference_to_none"].items():
            lines.append(
                f"| {fuser} | "
                + " | ".join(f"{per_kind[kind]['mean']:+.3f} ± {per_kind[kind]['std']:.3f}" for kind in kinds)
                + " |"
            )
    harness = results.get("harness")
    if harness:
        lines += [
            "",
            f"| lmms-eval ({harness['model']} model) | " + " | ".join(kinds) + " |",
            "|---|" + "---:|" * len(kinds),
        ]
        for fuser in results["accuracy"]:
            if fuser in harness["accuracy"]:
                per_kind = harness["accuracy"][fuser]
                lines.append(f"| {fuser} | " + " | ".join(mean_std(per_kind[kind]) for kind in kinds) + " |")
    if results["igva_weights"]:
        groups = len(results["igva_weights"]["all"])
        lines += [
            "",
            "| igva: mean group weight | "
            + " | ".join(
                f"group {k + 1} {results['fuser_options']['igva']['fuser_layer_groups'][k]}" for k in range(groups)
            )
            + " |",
            "|---|" + "---:|" * groups,
        ]
        for kind, weights in results["igva_weights"].items():
            lines.append(f"| {kind} | " + " | ".join(f"{value:.3f}" for value in weights) + " |")
    sampling = results.get("mmfuser_sampling_on_details", {})
    if sampling.get("per_seed"):
        lines += [
            "",
            f"mmfuser: share of cross-attention on the digit and shape cells {mean_std(sampling['per_seed'])}"
            f" (uniform {sampling['uniform']:.3f})",
        ]
    detail_queries = results.get("mmfuser_detail_queries", {})
    if detail_queries.get("trained"):
        levels = list(next(iter(detail_queries["trained"].values())))
        lines += [
            "",
            "| mmfuser: a detail cell's query, share sampled inside its own cell, per hidden state | "
            + " | ".join(levels)
            + " |",
            "|---|" + "---:|" * len(levels),
        ]
        for model, shares in detail_queries.items():
            for kind, per_level in shares.items():
                values = " | ".join(f"{per_level[level]:.3f}" for level in levels)
                lines.append(f"| {kind}, {model.replace('_', ' ')} | {values} |")
    if results["probe"]:
        lines += [
            "",
            "| probe: hidden state | " + " | ".join(results["probe"]) + " |",
            "|---|" + "---:|" * len(results["probe"]),
        ]
        for layer in range(len(next(iter(results["probe"].values())))):
            lines.append(
                f"| {layer} | " + " | ".join(f"{curve[layer]:.2f}" for curve in results["probe"].values()) + " |"
            )
    return "\n".join(lines)


def save_plots(results: dict, folder: Path) -> list[Path]:
    """Probe curves, accuracy per kind and fuser (mean ± std bars) and igva's weights as a heatmap, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for kind, curve in results["probe"].items():
        axis.plot(range(len(curve)), curve, marker="o", label=kind)
        colour = axis.lines[-1].get_color()
        axis.plot(range(len(curve)), results["probe_random_tower"][kind], linestyle=":", color=colour)
        axis.axhline(results["chance"][kind], color=colour, linewidth=0.6, alpha=0.5)
    base = results["tower"]["base_hidden_state"]
    axis.axvline(base, color="grey", linestyle="--", linewidth=0.8)
    axis.text(base, 0.03, " LLaVA's layer", fontsize=7, color="grey")
    axis.set(
        xlabel="hidden state (0 = embeddings)",
        ylabel="probe accuracy (held-out)",
        ylim=(0, 1.02),
        title="Coarse-trained tower (dotted: before training)",
    )
    axis.legend(fontsize=8, loc="center left")
    figure.tight_layout()
    paths.append(folder / "fusion_evidence_probe.png")
    figure.savefig(paths[-1], dpi=110)

    kinds = list(next(iter(results["accuracy"].values())))
    fusers = list(results["accuracy"])
    figure, axis = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / len(fusers)
    for index, fuser in enumerate(fusers):
        values = [results["accuracy"][fuser][kind] for kind in kinds]
        means = [statistics.mean(value) for value in values]
        spreads = [statistics.stdev(value) if len(value) > 1 else 0.0 for value in values]
        axis.bar(
            [k + (index - (len(fusers) - 1) / 2) * width for k in range(len(kinds))],
            means,
            width,
            yerr=spreads,
            capsize=2,
            label=fuser,
        )
    for k, kind in enumerate(kinds):
        if kind in results["chance"]:
            axis.plot([k - 0.45, k + 0.45], [results["chance"][kind]] * 2, color="black", linewidth=0.8, linestyle=":")
    axis.set_xticks(range(len(kinds)), kinds)
    axis.set(
        ylabel="held-out accuracy (test)",
        ylim=(0, 1.18),
        title=f"Equal budget, mean ± std over seeds {results['seeds']} (dotted: chance)",
    )
    axis.legend(fontsize=8, ncols=len(fusers), loc="upper center")
    figure.tight_layout()
    paths.append(folder / "fusion_evidence_accuracy.png")
    figure.savefig(paths[-1], dpi=110)

    if results["igva_weights"]:
        rows = list(results["igva_weights"])
        matrix = [results["igva_weights"][kind] for kind in rows]
        groups = results["fuser_options"]["igva"]["fuser_layer_groups"]
        figure, axis = plt.subplots(figsize=(5, 3))
        image = axis.imshow(matrix, cmap="viridis", aspect="auto")
        axis.set_yticks(range(len(rows)), rows)
        axis.set_xticks(range(len(matrix[0])), [f"hs {','.join(map(str, group))}" for group in groups])
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


def fuser_options(overrides: list[str]) -> dict:
    """`FUSER_OPTIONS` with `FUSER:FIELD=VALUE` overrides applied (VALUE read as JSON: `igva:balance_loss_weight=0`,
    `mmfuser:fuser_layers=[0,1,5]`)."""
    options = {fuser: dict(fields) for fuser, fields in FUSER_OPTIONS.items()}
    for override in overrides:
        fuser, _, assignment = override.partition(":")
        field, _, value = assignment.partition("=")
        if fuser not in FUSERS or not field or not value:
            raise ValueError(
                f"--fuser-option {override!r}: write FUSER:FIELD=VALUE with FUSER one of {', '.join(FUSERS)}."
            )
        try:
            options.setdefault(fuser, {})[field] = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"--fuser-option {override!r}: VALUE must be JSON ({error}).") from None
    return options


def lr_scales(overrides: list[str]) -> dict:
    """`LR_SCALES` with `--lr-scale FUSER:NAME=SCALE` overrides as `{fuser: {name part: scale}}`: the parameters of FUSER's models whose names
    contain NAME train at SCALE x --learning-rate in both stages."""
    scales = {fuser: dict(parts) for fuser, parts in LR_SCALES.items()}
    for override in overrides:
        fuser, _, assignment = override.partition(":")
        name, _, value = assignment.partition("=")
        try:
            scale = float(value)
        except ValueError:
            scale = -1.0
        if fuser not in FUSERS or not name or not scale >= 0:
            raise ValueError(
                f"--lr-scale {override!r}: write FUSER:NAME=SCALE with FUSER one of {', '.join(FUSERS)} and SCALE a "
                "number >= 0 (e.g. mmfuser:sampling_offsets=0.1)."
            )
        scales.setdefault(fuser, {})[name] = scale
    return scales


def git_commit(*arguments: str) -> str | None:
    """`git log -1 --format=%H ARGUMENTS` in this repository (None outside a git checkout)."""
    import subprocess

    try:
        completed = subprocess.run(
            ["git", "log", "-1", "--format=%H", *arguments],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return completed.stdout.strip() or None


def kept_runs(path: str, settings: dict, probe: dict) -> tuple[list[dict], dict]:
    """The runs of the fusers this run does not train, taken from the results file `path` of an earlier run, and a
    record of where they come from. Refuses (ValueError) unless that run had the same budget, tower, seeds and probe
    curve and the same options for every kept fuser: only then are the kept runs what this run would have made."""
    previous = json.loads(Path(path).read_text())
    kept = [fuser for fuser in FUSERS if fuser not in settings["fusers"] and fuser in previous["accuracy"]]
    budget = {key: settings[key] for key in previous["budget"]}
    tower = {key: settings[key] for key in ("tower_steps", "tower_batch", "invariance_weight")}
    previous_tower = {
        "tower_steps": previous["tower"]["steps"],
        "tower_batch": previous["tower"]["batch_size"],
        "invariance_weight": previous["tower"]["invariance_weight"],
    }
    mismatches = [
        name
        for name, same in zip(("budget", "tower"), (budget == previous["budget"], tower == previous_tower))
        if not same
    ]
    if not set(settings["seeds"]) <= set(previous["seeds"]):
        mismatches.append("seeds")
    for fuser in kept:
        if previous["fuser_options"].get(fuser, {}) != settings["fuser_options"].get(fuser, {}):
            mismatches.append(f"{fuser}'s fuser options")
        if previous["lr_scales"].get(fuser, {}) != settings["lr_scales"].get(fuser, {}):
            mismatches.append(f"{fuser}'s learning-rate scales")
    if "igva" in kept and previous.get("instruction_encoder_steps", 0) != settings["instruction_encoder_steps"]:
        mismatches.append("igva's instruction encoder pretraining")
    drift = max(abs(a - b) for kind in probe for a, b in zip(probe[kind], previous["probe"][kind]))
    if drift > 0.02:
        mismatches.append(f"probe curve (differs by up to {drift:.3f})")
    if mismatches:
        raise ValueError(f"--keep-runs {path}: the earlier run differs in {', '.join(mismatches)}; rerun every fuser.")
    runs = [run for run in previous["runs"] if run["fuser"] in kept and run["seed"] in settings["seeds"]]
    record = {
        "fusers": kept,
        "file": Path(path).name,
        "commit": previous.get("commit") or git_commit("--", str(Path(path).resolve())),
        "probe_max_difference": drift,
        "wall_seconds": previous.get("wall_seconds"),
    }
    return runs, record


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    settings = {
        key: getattr(args, key)
        for key in (
            "fusers",
            "seeds",
            "tower_steps",
            "tower_batch",
            "invariance_weight",
            "llm_steps",
            "stage1_steps",
            "stage2_steps",
            "batch_size",
            "learning_rate",
            "train_samples",
            "validation_samples",
            "test_samples",
            "sampling_images",
            "instruction_encoder_steps",
            "quick",
        )
    }
    settings["fuser_options"] = fuser_options(args.fuser_option)  # checked in main
    settings["lr_scales"] = lr_scales(args.lr_scale)
    llava, processor, probe, random_probe, tower_loss = coarse_tower_llava(args)
    print(
        f"tower pretrained and probed ({time.perf_counter() - began:.0f} s), final loss {tower_loss:.3f}; probe "
        "per hidden state: "
        + "; ".join(f"{kind} " + " ".join(f"{value:.2f}" for value in curve) for kind, curve in probe.items()),
        file=sys.stderr,
    )
    runs, kept = kept_runs(args.keep_runs, settings, probe) if args.keep_runs else ([], None)
    with tempfile.TemporaryDirectory(prefix="fusion-evidence-") as work:
        work = Path(work)
        source = work / "source"
        processor.save_pretrained(source)
        data = write_llava_dataset(work / "data", args.train_samples, seed=TRAIN_SET, scene="digits", split="train")
        seconds = pretrain_llm(llava, work, data, settings, args.llm_steps)
        print(f"language model pretrained ({seconds:.0f} s)", file=sys.stderr)
        llava.save_pretrained(source)
        if args.keep_checkpoints:
            write_llava_dataset(
                Path(args.keep_checkpoints) / "test", args.test_samples, seed=TEST_SET, scene="digits", split="test"
            )
        tasks = []
        for seed in args.seeds:
            for fuser in args.fusers:
                final = (
                    Path(args.keep_checkpoints) / f"{fuser}-seed{seed}"
                    if args.keep_checkpoints
                    else work / f"{fuser}-{seed}-stage2"
                )
                tasks.append(
                    {
                        "fuser": fuser,
                        "seed": seed,
                        "work": str(work),
                        "source": str(source),
                        "data": str(data),
                        "final": str(final),
                        "settings": settings,
                        "threads": args.threads if args.jobs == 1 else 1,
                    }
                )
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            for result in pool.map(train_and_score, tasks):
                runs.append(result)
                validation = result["validation"]["accuracy"]
                print(
                    f"  {result['fuser']:8s} seed {result['seed']}: validation accuracy "
                    + ", ".join(f"{kind} {value:.3f}" for kind, value in validation.items())
                    + f" ({result['train_seconds']:.0f} s, {time.perf_counter() - began:.0f} s so far)",
                    file=sys.stderr,
                )
                if "mmfuser_validation" in result:
                    print(
                        f"    mmfuser sampling (validation): {json.dumps(result['mmfuser_validation'])}",
                        file=sys.stderr,
                    )
                results = evidence_json(settings, runs, probe, random_probe, tower_loss)
                results["commit"] = git_commit()
                if kept:
                    results["kept_runs"] = kept
                results["wall_seconds"] = round(time.perf_counter() - began, 1)
                Path(args.output).write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke size: 1 seed, a few steps, 20 questions")
    parser.add_argument("--fusers", type=lambda text: tuple(text.split(",")), default=FUSERS)
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0, 1, 2, 3, 4])
    parser.add_argument("--tower-steps", type=int, default=400, help="coarse pretraining steps")
    parser.add_argument("--tower-batch", type=int, default=48, help="images per pretraining step (plus their twins)")
    parser.add_argument("--tower-samples", type=int, default=4000)
    parser.add_argument("--invariance-weight", type=float, default=1.0)
    parser.add_argument("--probe-samples", type=int, default=2000, help="probe training images (half as many test)")
    parser.add_argument("--probe-steps", type=int, default=200)
    parser.add_argument("--llm-steps", type=int, default=1000, help="language-model pretraining steps")
    parser.add_argument("--stage1-steps", type=int, default=1000)
    parser.add_argument("--stage2-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--train-samples", type=int, default=8000)
    parser.add_argument("--validation-samples", type=int, default=400, help="validation questions (all kinds)")
    parser.add_argument("--test-samples", type=int, default=1200, help="test questions (all kinds, 300 per kind)")
    parser.add_argument("--sampling-images", type=int, default=100, help="test images for mmfuser's sampling map")
    parser.add_argument(
        "--fuser-option",
        action="append",
        default=[],
        metavar="FUSER:FIELD=VALUE",
        help="a config field of one fuser over FUSER_OPTIONS (VALUE as JSON); repeatable",
    )
    parser.add_argument(
        "--lr-scale",
        action="append",
        default=[],
        metavar="FUSER:NAME=SCALE",
        help="FUSER's parameters whose names contain NAME train at SCALE x --learning-rate (both stages); repeatable",
    )
    parser.add_argument(
        "--instruction-encoder-steps",
        type=int,
        default=100,
        help="unsupervised SimCSE steps for igva's tiny instruction encoder on the questions (0: left random)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="models trained side by side (one thread each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process (and of --jobs 1)")
    parser.add_argument("--output", default="fusion_evidence.json")
    parser.add_argument("--plots", default=None, help="folder for the PNG plots (none when omitted)")
    parser.add_argument(
        "--keep-checkpoints",
        default=None,
        help="folder that keeps every final checkpoint (`FUSER-seedN/`) and the test set (`test/`)",
    )
    parser.add_argument(
        "--keep-runs",
        default=None,
        metavar="JSON",
        help="take the runs of the fusers not in --fusers from this earlier results file (same budget, tower, seeds, "
        "probe and options for those fusers, else refused); the output records where they come from",
    )
    parser.add_argument(
        "--report",
        default=None,
        metavar="JSON",
        help="train nothing: print the tables of a finished run's JSON (and --plots its plots)",
    )
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print(summary_table(results))
        for path in save_plots(results, Path(args.plots)) if args.plots else []:
            print(f"wrote {path}")
        return 0
    try:
        fuser_options(args.fuser_option)
        lr_scales(args.lr_scale)
    except ValueError as error:
        parser.error(str(error))
    unknown = sorted(set(args.fusers) - set(FUSERS))
    if unknown:
        parser.error(f"unknown fusers {unknown}: choose from {', '.join(FUSERS)}")
    if args.quick:
        args.seeds, args.tower_steps, args.tower_samples, args.tower_batch = args.seeds[:1], 80, 512, 32
        args.probe_samples, args.probe_steps, args.stage1_steps, args.stage2_steps = 600, 150, 2, 2
        args.batch_size, args.train_samples, args.sampling_images = 4, 16, 4
        args.validation_samples = args.test_samples = 20
        args.llm_steps = 2
    results = run(args)
    print(summary_table(results))
    if args.plots:
        for path in save_plots(results, Path(args.plots)):
            print(f"wrote {path}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
