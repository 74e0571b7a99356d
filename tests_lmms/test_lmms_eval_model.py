"""lmms-eval's `fused_llava` model (`hf_fusedvlm.evaluation`), run as a user runs it: the `lmms-eval` command line on
the package's trained toy (`examples/toy-fused-llava`, loaded with its own remote code) and on a tiny IGVA model, over
a small local synthetic VQA task. Needs the `eval` extra; `.ci/lmms-eval` builds that environment and runs this file.

The command-line runs are started once per module, two at a time (`LMMS_TEST_JOBS`), and the tests read their logs.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hf_fusedvlm  # noqa: F401  (registers the Auto classes)
from hf_fusedvlm.evaluation.lmms_eval_model import FusedLlava, FusedLlavaSimple
from hf_fusedvlm.synthetic_vqa import (
    QUESTION_KINDS,
    answer_questions,
    first_word,
    generate_samples,
    question_prompt,
    write_llava_dataset,
)
from hf_fusedvlm.tiny import build_tiny_fused, build_tiny_llava


REPO_ROOT = Path(__file__).resolve().parent.parent
TOY = REPO_ROOT / "examples" / "toy-fused-llava"
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from lmms_eval_fusion import TASK_FOLDER, TASK_NAME, harness_accuracy, project_scores, task_yaml  # noqa: E402


CHOICE_TASK = "fusedvlm_synthetic_vqa_choice"
NUM_SAMPLES = 16
ENVIRONMENT = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
torch.set_num_threads(1)


def choice_task_yaml(test_folder: Path) -> str:
    """The same documents as a multiple-choice (log-likelihood) task: the answers of the question's kind."""
    return (
        f"task: {CHOICE_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(test_folder / 'data.json'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_choice: !function utils.doc_to_choice\n"
        "doc_to_target: !function utils.doc_to_choice_index\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        f"lmms_eval_specific_kwargs:\n  default:\n    image_folder: {json.dumps(str(test_folder))}\n"
        "metadata:\n  version: 0.0\n"
    )


def lmms_eval_command(pretrained, model_args: str, tasks: str, batch_size: int, output: Path, *extra) -> list[str]:
    """`lmms-eval --model fused_llava ...` as a user types it (the console script beside this interpreter)."""
    return [
        str(Path(sys.executable).parent / "lmms-eval"), "--model", "fused_llava",
        "--model_args", f"pretrained={pretrained},{model_args}", "--tasks", tasks, "--batch_size", str(batch_size),
        "--include_path", str(output.parent.parent / "tasks"), "--output_path", str(output), "--log_samples", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A data set of every question kind (the toy was trained on colour and position only, so it gets some right and
    some wrong), the task folder with both YAMLs, and a saved tiny trained IGVA."""
    root = tmp_path_factory.mktemp("lmms")
    data = root / "data"
    write_llava_dataset(data, NUM_SAMPLES, seed=7)
    tasks = root / "tasks"
    shutil.copytree(TASK_FOLDER, tasks, ignore=shutil.ignore_patterns("__pycache__"))
    (tasks / f"{TASK_NAME}.yaml").write_text(task_yaml(data))
    (tasks / f"{CHOICE_TASK}.yaml").write_text(choice_task_yaml(data))
    model, processor = build_tiny_fused("igva", seed=0, trained=True)
    model.save_pretrained(root / "igva")
    processor.save_pretrained(root / "igva")
    (root / "runs").mkdir()
    return root


# name -> (checkpoint, model_args, tasks, batch size, extra arguments)
RUNS = {
    "toy-bs1": ("toy", "dtype=float32,device=cpu,trust_remote_code=True", TASK_NAME, 1, ()),
    "toy-bs2": ("toy", "dtype=float32,device=cpu,trust_remote_code=True", TASK_NAME, 2, ()),
    "toy-bf16": ("toy", "dtype=bfloat16,device=cpu,trust_remote_code=True", TASK_NAME, 2, ()),
    "toy-simple": ("toy", "dtype=float32,device=cpu,trust_remote_code=True", f"{TASK_NAME},{CHOICE_TASK}", 2,
                   ("--force_simple",)),
    "igva": ("igva", "dtype=float32", TASK_NAME, 2, ()),
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(workspace):
    """`{name: {task: (metrics, logged samples)}}` for every entry of RUNS, run on the command line."""
    checkpoints = {"toy": TOY, "igva": workspace / "igva"}
    pending = [
        (name, lmms_eval_command(checkpoints[checkpoint], args, tasks, batch, workspace / "runs" / name, *extra))
        for name, (checkpoint, args, tasks, batch, extra) in RUNS.items()
    ]
    jobs = int(os.environ.get("LMMS_TEST_JOBS", "2"))
    running, finished = {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name, command = pending.pop(0)
            log = open(workspace / "runs" / f"{name}.log", "w")
            running[name] = (subprocess.Popen(command, env=ENVIRONMENT, stdout=log, stderr=subprocess.STDOUT), log)
        for name, (process, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                finished[name] = process.returncode
                del running[name]
        time.sleep(0.5)
    results = {}
    for name, returncode in finished.items():
        log = (workspace / "runs" / f"{name}.log").read_text()
        output = workspace / "runs" / name
        # lmms-eval exits with 0 when the evaluation itself fails: no results file is the failure.
        assert returncode == 0 and list(output.rglob("*_results.json")), f"lmms-eval run {name} failed:\n{log[-4000:]}"
        metrics = json.loads(sorted(output.rglob("*_results.json"))[-1].read_text())["results"]
        results[name] = {}
        for task in metrics:
            samples_file = sorted(output.rglob(f"*samples_{task}.jsonl"))[-1]
            samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
            results[name][task] = (metrics[task], sorted(samples, key=lambda sample: sample["doc_id"]))
    return results


@pytest.fixture(scope="module")
def records(workspace):
    return json.loads((workspace / "data" / "data.json").read_text())


def task_utils():
    """The task folder's `utils.py` (what lmms-eval loads through `!function`)."""
    spec = importlib.util.spec_from_file_location("synthetic_vqa_task_utils", TASK_FOLDER / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def responses(samples) -> list[str]:
    # lmms-eval leaves `resps` out of a logged sample when it equals `filtered_resps`.
    answers = [sample.get("resps", sample["filtered_resps"]) for sample in samples]
    return [answer if isinstance(answer, str) else answer[0] for answer in answers]


def test_importing_the_package_leaves_lmms_eval_out():
    code = "import sys, hf_fusedvlm, hf_fusedvlm.evaluation; print(sorted(m for m in sys.modules if 'lmms' in m))"
    completed = subprocess.run([sys.executable, "-c", code], env=ENVIRONMENT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_entry_point_registers_both_model_kinds():
    from lmms_eval import models

    assert models.get_model("fused_llava") is FusedLlava
    assert models.get_model("fused_llava", force_simple=True) is FusedLlavaSimple


@pytest.mark.parametrize("name", ["toy-bs1", "toy-bs2", "toy-bf16", "toy-simple", "igva"])
def test_harness_accuracy_is_the_project_scorer_on_its_answers(runs, records, name):
    metrics, samples = runs[name][TASK_NAME]
    harness, ours = harness_accuracy(metrics), project_scores(samples, records)
    print(f"{name}: harness {harness['all']:.3f}, project scorer {ours['all']:.3f}")
    assert set(ours) == {*QUESTION_KINDS, "all"}
    for kind, value in ours.items():
        assert harness[kind] == pytest.approx(value, abs=1e-12), kind
    if name.startswith("toy"):
        # The toy answers the kinds it was trained on (0.935 on its own 400-question test set) and not the others.
        assert ours["colour"] + ours["position"] >= 1.5
        assert ours["all"] < 1


def test_harness_answers_are_the_projects_own_evaluation(runs, records):
    """The float32 harness answers are those of the project's batched in-process evaluation (`answer_questions`)."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(TOY, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(TOY)
    samples = generate_samples(NUM_SAMPLES, seed=7)
    assert [sample.answer for sample in samples] == [record["answer"] for record in records]
    ours, _ = answer_questions(model, processor, samples, batch_size=4)
    assert [first_word(answer) for answer in responses(runs["toy-bs1"][TASK_NAME][1])] == ours


def test_batch_size_2_gives_the_answers_of_batch_size_1(runs):
    assert responses(runs["toy-bs2"][TASK_NAME][1]) == responses(runs["toy-bs1"][TASK_NAME][1])


def test_bfloat16_runs_and_mostly_agrees_with_float32(runs):
    bf16, fp32 = responses(runs["toy-bf16"][TASK_NAME][1]), responses(runs["toy-bs1"][TASK_NAME][1])
    assert all(answer.strip() for answer in bf16)
    assert sum(a.split() == b.split() for a, b in zip(bf16, fp32)) >= len(fp32) // 2


def test_simple_mode_asks_the_same_questions(runs):
    """--force_simple builds the conversation from doc_to_text and doc_to_visual: the same prompts, the same answers."""
    assert responses(runs["toy-simple"][TASK_NAME][1]) == responses(runs["toy-bs1"][TASK_NAME][1])


def test_loglikelihood_scores_choices_as_one_sample_forward(runs, records, workspace):
    """Batched negative log-likelihoods (left-padded prompts, right-padded continuations) equal an unbatched forward
    pass, and lmms-eval's scorer (smallest value wins) counts the choices the model prefers."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    metrics, samples = runs["toy-simple"][CHOICE_TASK]
    model = AutoModel.from_pretrained(TOY, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(TOY)
    correct = {kind: 0 for kind in QUESTION_KINDS}
    for sample in samples:
        record = records[sample["doc_id"]]
        choices = task_utils().CHOICES[record["kind"]]
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        with Image.open(workspace / "data" / record["image"]) as image:
            inputs = processor(images=[image.convert("RGB")], text=[question_prompt(processor, question)],
                               return_tensors="pt")  # fmt: skip
        logged = sample.get("resps", sample["filtered_resps"])
        logged = [response[0] if isinstance(response[0], list) else response for response in logged]
        expected = []
        for choice in choices:
            continuation = processor.tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]
            input_ids = torch.cat([inputs["input_ids"], torch.tensor([continuation])], dim=1)
            with torch.no_grad():
                logits = model(input_ids=input_ids, pixel_values=inputs["pixel_values"]).logits[0]
            log_probs = torch.log_softmax(logits[inputs["input_ids"].shape[1] - 1 : -1], dim=-1)
            target = torch.tensor(continuation)
            expected.append(
                (-log_probs.gather(-1, target[:, None]).sum().item(), bool((log_probs.argmax(-1) == target).all()))
            )
        for (value, greedy), (expected_value, expected_greedy) in zip(logged, expected):
            assert float(value) == pytest.approx(expected_value, abs=1e-4)
            assert str(greedy) == str(expected_greedy)  # the samples log writes both as strings
        chosen = min(range(len(choices)), key=lambda index: expected[index][0])
        correct[record["kind"]] += chosen == choices.index(record["answer"])
    assert metrics["acc,none"] == pytest.approx(sum(correct.values()) / len(samples))
    # The toy prefers the right answers of the kinds it was trained on.
    trained = sum(record["kind"] in ("colour", "position") for record in records)
    assert correct["colour"] + correct["position"] >= 0.75 * trained


def test_igva_instruction_is_the_question(runs, records, workspace):
    """The harness's IGVA answers are generate() given each question as the instruction, and another instruction
    changes some of them (so the comparison can tell)."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(workspace / "igva", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(workspace / "igva")
    harness = responses(runs["igva"][TASK_NAME][1])

    def answers(instruction=None) -> list[str]:
        results = []
        for record in records:
            question = record["conversations"][0]["value"].replace("<image>", "").strip()
            prompt = question_prompt(processor, question)
            assert processor.get_instruction(prompt) == question
            with Image.open(workspace / "data" / record["image"]) as image:
                inputs = processor(images=[image.convert("RGB")], text=[prompt], instructions=[instruction or question],
                                   return_tensors="pt")  # fmt: skip
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            text = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            results.append(text.split("\n\n")[0])  # the task's default stop string
        return results

    assert harness == answers()
    assert answers("Describe the picture in detail.") != harness


def test_dtype_is_the_one_asked_for():
    """No dtype is hard-coded: `auto` keeps the checkpoint's (float32), bfloat16 casts all but the fp32 fuser."""
    assert FusedLlava(pretrained=str(TOY), device="cpu").model.dtype == torch.float32
    model = FusedLlava(pretrained=str(TOY), dtype="bfloat16", device="cpu").model
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert {parameter.dtype for parameter in model.model.fuser.parameters()} == {torch.float32}


def test_trust_remote_code_runs_the_checkpoints_code():
    remote = FusedLlava(pretrained=str(TOY), device="cpu", trust_remote_code=True)
    assert type(remote.model).__module__.startswith("transformers_modules")
    assert type(remote.processor).__module__.startswith("transformers_modules")
    installed = FusedLlava(pretrained=str(TOY), device="cpu")
    assert type(installed.model).__module__ == "hf_fusedvlm.modeling_fused_llava"


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"dtype": "fp8"}, "dtype=fp8 is not supported"),
        ({"batch_size": "auto"}, "batch_size=auto is not supported"),
        ({"temperature": 0.5}, "Unknown fused_llava model arguments ['temperature']"),
    ],
)
def test_bad_model_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        FusedLlava(pretrained=str(TOY), device="cpu", **arguments)


def test_a_plain_llava_checkpoint_is_refused(tmp_path):
    model, processor = build_tiny_llava()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a 'llava' checkpoint, not a fused LLaVA"):
        FusedLlava(pretrained=str(tmp_path), device="cpu")


def test_kinds_cover_the_task():
    # The task's choices are every answer the synthetic set can give.
    from hf_fusedvlm.synthetic_vqa import COLOURS, MAX_DOTS, NUMBER_WORDS, POSITIONS, SCENES, SHAPES

    utils = task_utils()

    assert set(utils.CHOICES) == {kind for kinds in SCENES.values() for kind in kinds}
    assert set(utils.CHOICES["colour"]) == set(COLOURS)
    assert utils.CHOICES["position"] == POSITIONS
    assert utils.CHOICES["count"] == NUMBER_WORDS[1 : MAX_DOTS + 1]
    assert utils.CHOICES["digit"] == NUMBER_WORDS
    assert set(utils.CHOICES["shape"]) == set(SHAPES)
