"""Score the checkpoints of `fusion_evidence.py --keep-checkpoints DIR` with lmms-eval, offline, and check that the
project's own scorer (`hf_fusedvlm.synthetic_vqa.score_answers`) gives the same numbers on the harness's answers.

lmms-eval runs each checkpoint through the package's own lmms-eval model (`--model fused_llava`, see
docs/evaluation.md; float32 on CPU unless `--dtype` and `--device` say otherwise) on a local task over the held-out set
that `fusion_evidence.py` wrote to `DIR/test/`: the task folder `benchmarks/lmms_eval_tasks/synthetic_vqa/` plus a
YAML written here, because the YAML has to name the data files by absolute path. Nothing is downloaded
(`HF_HUB_OFFLINE=1`, `HF_DATASETS_OFFLINE=1`).

    python benchmarks/lmms_eval_fusion.py --checkpoints DIR --evidence benchmarks/results/fusion_evidence.json

needs lmms-eval and the package (`pip install -e ".[eval]"`) in the running interpreter; `--lmms-python` runs it with
another one (a virtual environment of its own, e.g. the `.venv-lmms/` that `.ci/lmms-eval` builds). The harness's
accuracy per fuser, kind and seed is written to `--evidence` under `harness`, next to the in-process numbers.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hf_fusedvlm.synthetic_vqa import SyntheticSample, first_word, score_answers


TASK_FOLDER = Path(__file__).resolve().parent / "lmms_eval_tasks" / "synthetic_vqa"
TASK_NAME = "fusedvlm_synthetic_vqa"
CHECKPOINT_NAME = re.compile(r"^(?P<fuser>[a-z]+)-seed(?P<seed>\d+)$")


def task_yaml(test_folder: Path) -> str:
    """The task config over `test_folder/data.json` (greedy, at most 4 new tokens, accuracy per question kind of the
    set, in order of first appearance)."""
    records = json.loads((test_folder / "data.json").read_text())
    kinds = list(dict.fromkeys(record["kind"] for record in records))
    metrics = "".join(
        f"  - metric: accuracy_{kind}\n    aggregation: !function utils.aggregate_{kind}\n    higher_is_better: true\n"
        for kind in (*kinds, "all")
    )
    return (
        f"task: {TASK_NAME}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(test_folder / 'data.json'))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_messages: !function utils.doc_to_messages\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 4\n  temperature: 0\n  do_sample: false\n"
        "process_results: !function utils.process_results\n"
        f"metric_list:\n{metrics}"
        f"lmms_eval_specific_kwargs:\n  default:\n    image_folder: {json.dumps(str(test_folder))}\n"
        "metadata:\n  version: 0.0\n"
    )


def run_harness(
    python: str,
    checkpoint: Path,
    task_dir: Path,
    output_dir: Path,
    batch_size: int,
    dtype: str = "float32",
    device: str = "cpu",
) -> tuple[dict, list]:
    """lmms-eval's `fused_llava` model on one checkpoint; returns its aggregated metrics and its logged samples."""
    model_args = f"pretrained={checkpoint},dtype={dtype},device={device}"
    command = [
        python,
        "-m",
        "lmms_eval",
        "--model",
        "fused_llava",
        "--model_args",
        model_args,
        "--tasks",
        TASK_NAME,
        "--include_path",
        str(task_dir),
        "--output_path",
        str(output_dir),
        "--log_samples",
        "--batch_size",
        str(batch_size),
        "--verbosity",
        "WARNING",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"lmms-eval failed on {checkpoint} ({completed.returncode}):\n{completed.stderr[-4000:]}")
    results_files = sorted(output_dir.rglob("*_results.json"))
    samples_files = sorted(output_dir.rglob(f"*samples_{TASK_NAME}.jsonl"))
    if not results_files or not samples_files:
        raise RuntimeError(f"lmms-eval wrote no results under {output_dir}:\n{completed.stdout[-2000:]}")
    metrics = json.loads(results_files[-1].read_text())["results"][TASK_NAME]
    samples = [json.loads(line) for line in samples_files[-1].read_text().splitlines() if line.strip()]
    return metrics, samples


def harness_accuracy(metrics: dict) -> dict[str, float]:
    """`{kind: accuracy}` from lmms-eval's metrics (keys like `accuracy_colour,none`)."""
    return {
        key.split(",")[0].removeprefix("accuracy_"): value
        for key, value in metrics.items()
        if key.startswith("accuracy_") and "_stderr" not in key
    }


def project_scores(samples: list[dict], records: list[dict]) -> dict[str, float]:
    """`score_answers` on the harness's own answers: the raw response logged for each document (`doc_id` = row of
    the test set's `records`), cut to its first word as the project's evaluation does."""
    # lmms-eval leaves `resps` out of a logged sample when it equals `filtered_resps`.
    responses = {sample["doc_id"]: sample.get("resps", sample["filtered_resps"]) for sample in samples}
    if sorted(responses) != list(range(len(records))):
        raise RuntimeError(f"lmms-eval logged {len(responses)} answers for a test set of {len(records)} records.")
    answers = [
        first_word(responses[row] if isinstance(responses[row], str) else responses[row][0])
        for row in range(len(records))
    ]
    references = [SyntheticSample(None, record["kind"], "", record["answer"], {}) for record in records]
    return score_answers(references, answers)["accuracy"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", required=True, help="the --keep-checkpoints folder of fusion_evidence.py")
    parser.add_argument("--evidence", default=None, help="fusion_evidence.json to add the `harness` section to")
    parser.add_argument("--output", default=None, help="also write the harness section alone to this JSON")
    parser.add_argument("--lmms-python", default=sys.executable, help="the Python that has lmms-eval installed")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--dtype", default="float32", help="the model's dtype: float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--seeds",
        type=lambda text: {int(seed) for seed in text.split(",")},
        default=None,
        help="only the checkpoints of these seeds (default: all)",
    )
    parser.add_argument(
        "--fusers",
        type=lambda text: set(text.split(",")),
        default=None,
        help="only the checkpoints of these fusers (default: all)",
    )
    parser.add_argument("--work-dir", default=None, help="where the temporary task and outputs go")
    args = parser.parse_args(argv)
    checkpoints = Path(args.checkpoints).resolve()
    test_folder = checkpoints / "test"
    if not (test_folder / "data.json").is_file():
        parser.error(
            f"{test_folder / 'data.json'} is missing: pass the --keep-checkpoints folder of fusion_evidence.py"
        )
    records = json.loads((test_folder / "data.json").read_text())
    runs = sorted(
        (match["fuser"], int(match["seed"]), path)
        for path in checkpoints.iterdir()
        if (match := CHECKPOINT_NAME.match(path.name))
        and (args.seeds is None or int(match["seed"]) in args.seeds)
        and (args.fusers is None or match["fuser"] in args.fusers)
    )
    if not runs:
        parser.error(f"no FUSER-seedN checkpoints in {checkpoints}")
    section = {
        "accuracy": {},
        "project_scorer_on_harness_answers": {},
        "agree": True,
        "model": "fused_llava",
        "dtype": args.dtype,
    }
    with tempfile.TemporaryDirectory(prefix="lmms-eval-", dir=args.work_dir) as work:
        task_dir = Path(work) / "tasks"
        shutil.copytree(TASK_FOLDER, task_dir, ignore=shutil.ignore_patterns("__pycache__"))
        (task_dir / f"{TASK_NAME}.yaml").write_text(task_yaml(test_folder))
        for fuser, seed, path in runs:
            metrics, samples = run_harness(
                args.lmms_python, path, task_dir, Path(work) / path.name, args.batch_size, args.dtype, args.device
            )
            harness, ours = harness_accuracy(metrics), project_scores(samples, records)
            agree = all(abs(harness[kind] - ours[kind]) < 1e-9 for kind in ours)
            section["agree"] &= agree
            for name, values in (("accuracy", harness), ("project_scorer_on_harness_answers", ours)):
                for kind, value in values.items():
                    section[name].setdefault(fuser, {}).setdefault(kind, []).append(value)
            print(
                f"  {fuser:8s} seed {seed}: harness {harness['all']:.3f}, project scorer {ours['all']:.3f}"
                f"{'' if agree else '  DISAGREE'}",
                file=sys.stderr,
            )
    if args.output:
        Path(args.output).write_text(json.dumps(section, indent=1))
    if args.evidence:
        evidence = json.loads(Path(args.evidence).read_text())
        evidence["harness"] = section
        Path(args.evidence).write_text(json.dumps(evidence, indent=1))
    print(json.dumps(section["accuracy"], indent=1))
    print(f"harness and project scorer agree: {section['agree']}")
    return 0 if section["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
