"""Training (issue 7): synthetic data, the collator, stage presets, saving, QLoRA, multi-process, Hub push, toy model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor

from hf_fusedvlm import FusedLlavaForConditionalGeneration
from hf_fusedvlm.conversion import fused_from_llava
from hf_fusedvlm.processing_fused_llava import FusedLlavaProcessor
from hf_fusedvlm.synthetic_vqa import (
    BACKGROUND,
    COLOURS,
    DIGIT_FONT,
    INK,
    QUESTION_KINDS,
    generate_samples,
    write_llava_dataset,
)
from hf_fusedvlm.training import (
    STAGES,
    FusedLlavaDataCollator,
    LlavaConversationDataset,
    conversation_to_messages,
    main,
    parameter_part,
)

from conftest import run_without_package
from hub_server import FakeHub


REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_IGVA = {"aggregator_hidden_size": 64, "aggregator_num_layers": 2}
TRAIN_OPTIONS = [
    "--per_device_train_batch_size",
    "4",
    "--learning_rate",
    "2e-3",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--seed",
    "0",
    "--disable_tqdm",
    "true",
    "--dataloader_pin_memory",
    "false",
    "--weight_decay",
    "0",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llava, tiny_instruction_encoder):
    """A folder with `igva/` (a converted tiny igva checkpoint with its processor) and `data/data.json` (16 synthetic
    samples, every 4th a two-round conversation)."""
    root = tmp_path_factory.mktemp("training")
    llava, llava_processor = tiny_llava
    encoder, instruction_tokenizer = tiny_instruction_encoder
    fused_from_llava(llava, "igva", instruction_encoder=encoder, **SMALL_IGVA).save_pretrained(root / "igva")
    FusedLlavaProcessor.from_llava_processor(llava_processor, instruction_tokenizer).save_pretrained(root / "igva")
    write_llava_dataset(root / "data", 16, seed=1, multi_turn_every=4)
    return root


@pytest.fixture(scope="module")
def processor(workspace):
    return AutoProcessor.from_pretrained(workspace / "igva")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}


def tokens_for_second_image(folder: Path, processor, workspace) -> tuple[Path, list[int]]:
    """The data set's second image and the greedy tokens the checkpoint in `folder` answers a question about it with."""
    from PIL import Image

    image_path = workspace / "data" / json.loads((workspace / "data" / "data.json").read_text())[1]["image"]
    model = FusedLlavaForConditionalGeneration.from_pretrained(folder).eval()
    inputs = processor(
        images=Image.open(image_path), text="USER: <image>\nHow many dots are there? ASSISTANT:", return_tensors="pt"
    )
    return image_path, model.generate(**inputs, max_new_tokens=5, do_sample=False)[0].tolist()


def changed_parts(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {parameter_part(key) for key in before if not torch.equal(before[key], after[key])}


def fixed_batch_loss(model, processor, workspace) -> float:
    """The LM loss (balance loss excluded) on the first 8 training samples."""
    dataset = LlavaConversationDataset(workspace / "data" / "data.json")
    batch = FusedLlavaDataCollator(processor)([dataset[index] for index in range(8)])
    with torch.no_grad():
        output = model.eval()(**batch)
    return (output.loss - output.balance_loss).item()


def train(workspace, output: Path, stage: str, *extra: str) -> Path:
    main(
        [
            "--model_name_or_path",
            str(workspace / "igva"),
            "--data_path",
            str(workspace / "data" / "data.json"),
            "--output_dir",
            str(output),
            "--stage",
            stage,
            "--max_steps",
            "8",
            "--save_steps",
            "4",
            *TRAIN_OPTIONS,
            *extra,
        ]
    )
    return output


# ------------------------------------------------------------------------------------------------------ synthetic data


def test_synthetic_samples_are_deterministic_balanced_and_drawn_as_described():
    samples = generate_samples(40, seed=3)
    again = generate_samples(40, seed=3)
    other = generate_samples(40, seed=4)
    assert [np.asarray(s.image).tobytes() for s in samples] == [np.asarray(s.image).tobytes() for s in again]
    assert [s.question for s in samples] == [s.question for s in again]
    assert [np.asarray(s.image).tobytes() for s in samples] != [np.asarray(s.image).tobytes() for s in other]
    assert [s.kind for s in samples] == list(QUESTION_KINDS) * 10
    for sample in samples:
        pixels = np.asarray(sample.image).reshape(-1, 3)
        colour_pixels = (pixels == COLOURS[sample.details["colour"]]).all(1).sum()
        ink_pixels = (pixels == INK).all(1).sum()
        digit_pixels = sum(row.count("#") for row in DIGIT_FONT[sample.details["digit"]])
        assert colour_pixels == 16  # the 4x4 square, nothing else in its colour
        assert ink_pixels == digit_pixels + 4 * sample.details["dots"]  # the digit and 2x2 dots, none overlapping
        assert (pixels == BACKGROUND).all(1).sum() == len(pixels) - colour_pixels - ink_pixels
        rows, columns = np.nonzero((np.asarray(sample.image) == COLOURS[sample.details["colour"]]).all(-1))
        side = {
            "left": columns.max() < 8,
            "right": columns.min() >= 24,
            "top": rows.max() < 8,
            "bottom": rows.min() >= 24,
        }
        assert side[sample.details["position"]]
    assert {s.answer for s in samples if s.kind == "digit"} <= {
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    }


def test_llava_dataset_files(workspace):
    records = json.loads((workspace / "data" / "data.json").read_text())
    assert len(records) == 16
    assert all((workspace / "data" / record["image"]).is_file() for record in records)
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")
    assert [len(record["conversations"]) for record in records[:4]] == [2, 2, 2, 4]
    assert records[3]["answer"] == records[3]["conversations"][-1]["value"]


# ----------------------------------------------------------------------------------------------------------- collator


def test_collator_labels_only_the_answers_and_routes_the_last_instruction(workspace, processor):
    dataset = LlavaConversationDataset(workspace / "data" / "data.json")
    items = [dataset[index] for index in range(4)]
    batch = FusedLlavaDataCollator(processor)(items)
    tokenizer = processor.tokenizer
    records = dataset.records[:4]
    assert batch["labels"].shape == batch["input_ids"].shape
    lengths = batch["attention_mask"].sum(1)
    for row, record in enumerate(records):
        labels, input_ids = batch["labels"][row], batch["input_ids"][row]
        answers = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
        # Exactly the answer tokens (each " answer " as the template writes it, EOS after the last) are labelled.
        labelled = tokenizer.decode(input_ids[labels != -100])
        assert labelled == " " + "  ".join(f"{answer}" for answer in answers) + " </s>"
        assert torch.equal(labels[labels != -100], input_ids[labels != -100])
        # Right padding, never labelled; image tokens never labelled.
        assert (
            batch["attention_mask"][row, : lengths[row]].all()
            and not batch["attention_mask"][row, lengths[row] :].any()
        )
        assert (labels[lengths[row] :] == -100).all()
        assert (labels[input_ids == processor.tokenizer.convert_tokens_to_ids("<image>")] == -100).all()
        last_question = [turn["value"] for turn in record["conversations"] if turn["from"] == "human"][-1]
        instruction = processor.instruction_tokenizer.decode(
            batch["instruction_input_ids"][row], skip_special_tokens=True
        )
        assert instruction == last_question.replace("<image>", "").strip().lower()
    # The first answer of the two-round sample is labelled too, separately from the second.
    assert (batch["labels"][3] != -100).sum() > (batch["labels"][0] != -100).sum()


def test_collator_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 images but 1 <image> tokens"):
        conversation_to_messages([{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}], 2)
    with pytest.raises(ValueError, match="Unknown speaker 'bot'"):
        conversation_to_messages([{"from": "bot", "value": "Q"}], 0)
    messages = conversation_to_messages([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], 1)
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Q"}]  # image added, as LLaVA does


# ------------------------------------------------------------------------------------------------------------- stages


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_stage_trains_only_its_parts_reduces_the_loss_and_saves_a_loadable_checkpoint(workspace, processor, stage):
    output = train(workspace, workspace / f"out-{stage}", stage)
    before, after = read_weights(workspace / "igva"), read_weights(output)
    assert changed_parts(before, after) == set(STAGES[stage])
    for checkpoint in ("checkpoint-4", "checkpoint-8"):
        assert (output / checkpoint / "model.safetensors").is_file()
        assert (output / checkpoint / "modeling_fused_llava.py").is_file()
        assert (output / checkpoint / "instruction_tokenizer" / "tokenizer.json").is_file()
    loss_before = fixed_batch_loss(
        FusedLlavaForConditionalGeneration.from_pretrained(workspace / "igva"), processor, workspace
    )
    loss_after = fixed_batch_loss(FusedLlavaForConditionalGeneration.from_pretrained(output), processor, workspace)
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)
    card = (output / "README.md").read_text()
    assert "Trained fuser" in card and f"stage: `{stage}`" in card and "| fuser | " in card


def test_balance_loss_weight_flag_overrides_the_checkpoint(workspace):
    output = train(workspace, workspace / "out-balance", "stage1", "--max_steps", "1", "--balance_loss_weight", "0.5")
    config = json.loads((output / "config.json").read_text())
    assert config["balance_loss_weight"] == 0.5
    model = FusedLlavaForConditionalGeneration.from_pretrained(output)
    assert model.model.fuser.balance_loss_weight == 0.5


def test_parameter_learning_rates_give_named_parameters_their_own_rate(workspace):
    """`--parameter_learning_rates` (MMFuser's official recipe trains its block at a tenth of the projector's rate):
    a rate of 0 for the fuser leaves it as it was while the projector trains; the optimizer holds both rates."""
    from hf_fusedvlm.training import FusedLlavaTrainer

    rates = []
    original = FusedLlavaTrainer.create_optimizer

    def recording(self, model=None):
        optimizer = original(self, model)
        rates.append(sorted({group["lr"] for group in optimizer.param_groups if group["params"]}))
        return optimizer

    FusedLlavaTrainer.create_optimizer = recording
    try:
        output = train(
            workspace,
            workspace / "out-rates",
            "stage1",
            "--max_steps",
            "2",
            "--parameter_learning_rates",
            "model.fuser.=0,projector.linear_2=1e-4",
        )
    finally:
        FusedLlavaTrainer.create_optimizer = original
    assert rates[0] == [0.0, 1e-4, 2e-3]
    before, after = read_weights(workspace / "igva"), read_weights(output)
    assert changed_parts(before, after) == {"projector"}
    assert not torch.equal(
        before["model.multi_modal_projector.linear_2.weight"], after["model.multi_modal_projector.linear_2.weight"]
    )


def test_lora_checkpoint_is_the_merged_model(workspace, processor):
    """stage2-lora saves LoRA merged into the LLM: the reloaded plain checkpoint computes what the PEFT model did."""
    from transformers import TrainingArguments

    from hf_fusedvlm.training import ModelArguments, load_model_for_stage

    output = train(workspace, workspace / "out-lora", "stage2-lora", "--lora_dropout", "0")
    before, after = read_weights(workspace / "igva"), read_weights(output)
    assert not any(".lora_" in key or "base_layer" in key for key in after)
    assert changed_parts(before, after) == {"fuser", "projector", "language_model"}  # LLM changed only by the merge
    changed_llm = {
        key.rsplit(".", 2)[-2]
        for key in before
        if parameter_part(key) == "language_model" and not torch.equal(before[key], after[key])
    }
    assert changed_llm == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # Resume the adapters from the saved merge is not possible; instead check the merge against a live PEFT model.
    peft_model = load_model_for_stage(
        ModelArguments(str(workspace / "igva"), stage="stage2-lora", lora_dropout=0.0),
        TrainingArguments(output_dir=str(workspace / "unused"), report_to="none"),
    )
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_B"):
                for parameter in module.lora_B.values():
                    parameter.weight.normal_(0, 0.1)
    merged_folder = workspace / "merged"
    from hf_fusedvlm.training import save_fused_checkpoint

    save_fused_checkpoint(peft_model, merged_folder)
    # The same merge from a gathered state dict, keys as a wrapper (FSDP1 here) prefixes them: what sharded runs save.
    wrapped_state = {f"_fsdp_wrapped_module.{key}": value for key, value in peft_model.state_dict().items()}
    save_fused_checkpoint(peft_model, workspace / "merged-from-state-dict", state_dict=wrapped_state)
    from_state_dict, from_model = read_weights(workspace / "merged-from-state-dict"), read_weights(merged_folder)
    assert from_state_dict.keys() == from_model.keys()
    assert all(torch.equal(from_state_dict[key], from_model[key]) for key in from_model)
    dataset = LlavaConversationDataset(workspace / "data" / "data.json")
    batch = FusedLlavaDataCollator(processor)([dataset[index] for index in range(4)])
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits
        actual = FusedLlavaForConditionalGeneration.from_pretrained(merged_folder).eval()(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)  # fp32 sums in another order
    assert not torch.allclose(
        expected, FusedLlavaForConditionalGeneration.from_pretrained(workspace / "igva").eval()(**batch).logits
    )


def test_qlora_keeps_the_fuser_fp32_and_trains_it(workspace):
    pytest.importorskip("bitsandbytes", reason="the quantization extra is not installed")
    import bitsandbytes as bnb
    from transformers import TrainingArguments

    from hf_fusedvlm.training import ModelArguments, load_model_for_stage

    model = load_model_for_stage(
        ModelArguments(str(workspace / "igva"), stage="qlora"),
        TrainingArguments(output_dir=str(workspace / "unused"), report_to="none"),
    )
    base = model.get_base_model()
    assert isinstance(base.model.language_model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in base.model.vision_tower.modules())
    assert all(
        parameter.dtype == torch.float32 and parameter.requires_grad for parameter in base.model.fuser.parameters()
    )
    assert all(parameter.requires_grad for parameter in base.model.multi_modal_projector.parameters())
    del model

    output = train(workspace, workspace / "out-qlora", "qlora")
    before, after = read_weights(workspace / "igva"), read_weights(output)
    assert "quantization_config" not in json.loads((output / "config.json").read_text())
    assert all(tensor.dtype == torch.float32 for tensor in after.values())
    assert {"fuser", "projector", "language_model"} <= changed_parts(before, after)
    assert all(torch.equal(before[key], after[key]) for key in before if parameter_part(key) == "instruction_encoder")


# -------------------------------------------------------------------------------------------- loading, launch, Hub


GENERATE_CODE = """
import sys, json, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
folder, image_path = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
prompt = "USER: <image>\\nHow many dots are there? ASSISTANT:"
inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
print("RESULT" + json.dumps(model.generate(**inputs, max_new_tokens=5, do_sample=False)[0].tolist()))
"""


def generate_without_package(folder: Path, image_path: Path, cwd: Path) -> list[int]:
    code = f"import sys\nsys.argv = ['-', {str(folder)!r}, {str(image_path)!r}]\n" + GENERATE_CODE
    completed = run_without_package(code, cwd)
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


def test_trained_checkpoint_loads_and_generates_without_the_package(workspace, processor, tmp_path):
    output = workspace / "out-stage2"
    if not output.is_dir():
        train(workspace, output, "stage2")
    image_path, expected = tokens_for_second_image(output, processor, workspace)
    assert generate_without_package(output, image_path, tmp_path) == expected
    assert generate_without_package(output / "checkpoint-8", image_path, tmp_path) == expected


FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: NO_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
"""


def launch_two_processes(workspace, output: Path, *launcher: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of 3 stage1 steps (2 CPU processes over gloo, 2 samples each per step) into `output`;
    `launcher`: the accelerate options and the script or `-m module` to run."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher,
        "--use_cpu",
        "true",
        "--model_name_or_path",
        str(workspace / "igva"),
        "--data_path",
        str(workspace / "data" / "data.json"),
        "--output_dir",
        str(output),
        "--stage",
        "stage1",
        "--max_steps",
        "3",
        "--save_steps",
        "3",
        *TRAIN_OPTIONS,
        "--per_device_train_batch_size",
        "2",
        "--ddp_backend",
        "gloo",
        # Plain SGD: attention's key bias has an exactly zero gradient (softmax ignores a shift shared by all keys),
        # so it receives rounding noise (1e-11 to 1e-8) that Adam normalises into steps of up to the learning rate,
        # with a sign that differs between two runs equal up to summation order. Its learning rate keeps the steps
        # far above the comparison's tolerance.
        "--optim",
        "sgd",
        "--learning_rate",
        "0.5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(command, cwd=output.parent, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


@pytest.fixture(scope="module")
def ddp_run(workspace):
    """(output folder, completed process) of a 2-process DDP run: every process holds the whole model.
    accelerate's `--cpu` alone starts one process (several only through mpirun), so the processes come from
    `--multi_gpu`, and Trainer's `--use_cpu` keeps them on the CPU."""
    output = workspace / "ddp"
    output.mkdir()
    completed = launch_two_processes(
        workspace,
        output,
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "hf_fusedvlm.training",
    )
    return output, completed


def test_accelerate_launch_two_processes(workspace, ddp_run):
    """`accelerate launch` with 2 CPU processes (torchrun, gloo DDP) runs the recipe and writes the same kind of
    checkpoint."""
    output, completed = ddp_run
    assert completed.stdout.count("Stage stage1: trainable parameters per part") == 1  # printed by rank 0 only
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    arguments = json.loads((output / "training_args.json").read_text())
    assert (arguments["world_size"], arguments["parallel_mode"]) == (2, "distributed")
    assert not (output / "training_args.bin").exists()
    assert changed_parts(read_weights(workspace / "igva"), read_weights(output)) == {"fuser", "projector"}
    model = FusedLlavaForConditionalGeneration.from_pretrained(output / "checkpoint-3")
    assert model.config.fuser_type == "igva"


def test_fsdp_checkpoint_equals_the_unsharded_run_and_loads_without_the_package(
    workspace, ddp_run, processor, tmp_path
):
    """FSDP2 (2 CPU processes, each holding half of every parameter) saves, from the full state dict Trainer gathers,
    the weights the unsharded DDP run of the same seed, data and steps saves: equal up to float32 summation order
    (the gradients are reduce-scattered instead of all-reduced; measured |diff| <= 2e-7, tolerance 1e-6)."""
    ddp_output, _ = ddp_run
    output = workspace / "fsdp"
    output.mkdir()
    config = workspace / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    launch_two_processes(workspace, output, "--config_file", str(config), str(REPO_ROOT / "tests" / "fsdp_on_cpu.py"))
    arguments = json.loads((output / "training_args.json").read_text())
    assert (arguments["world_size"], arguments["distributed_type"]) == (2, "FSDP")
    start, unsharded = read_weights(workspace / "igva"), read_weights(ddp_output)
    for folder in (output, output / "checkpoint-3"):
        sharded = read_weights(folder)
        assert sharded.keys() == unsharded.keys()
        for key in unsharded:
            torch.testing.assert_close(sharded[key], unsharded[key], rtol=0, atol=1e-6, msg=key)
    assert changed_parts(start, read_weights(output)) == {"fuser", "projector"}
    largest_step = max(float((unsharded[key] - start[key]).abs().max()) for key in start)
    assert largest_step > 1e-3, largest_step  # the runs moved the weights far more than they may differ
    image_path, expected = tokens_for_second_image(ddp_output, processor, workspace)
    assert generate_without_package(output, image_path, tmp_path) == expected


def test_push_to_hub_through_trainer(workspace, tmp_path):
    """--push_to_hub uploads the final fused checkpoint (code, processor, card with the training summary); with
    --hub_strategy checkpoint also the last checkpoint, without the optimizer, scheduler and RNG pickles."""
    output = tmp_path / "push"
    with FakeHub() as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": "hf_fake_token_123",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(REPO_ROOT),
        }
        command = [
            sys.executable,
            "-m",
            "hf_fusedvlm.training",
            "--model_name_or_path",
            str(workspace / "igva"),
            "--data_path",
            str(workspace / "data" / "data.json"),
            "--output_dir",
            str(output),
            "--stage",
            "stage1",
            "--max_steps",
            "2",
            "--save_steps",
            "2",
            *TRAIN_OPTIONS,
            "--push_to_hub",
            "--hub_model_id",
            "user/trained",
            "--hub_token",
            "hf_fake_token_123",
            "--hub_strategy",
            "checkpoint",
        ]
        completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-4000:]
        files = hub.repos["user/trained"].files
    for name in (
        "model.safetensors",
        "config.json",
        "modeling_fused_llava.py",
        "fusers.py",
        "processor_config.json",
        "instruction_tokenizer/tokenizer.json",
        "README.md",
    ):
        assert name in files, name
    assert not any(name.startswith("checkpoint-") for name in files)
    assert "last-checkpoint/model.safetensors" in files and "last-checkpoint/trainer_state.json" in files
    local_pickles = {path.name for path in (output / "checkpoint-2").iterdir() if path.suffix in (".pt", ".pth")}
    assert {"optimizer.pt", "scheduler.pt"} <= local_pickles  # kept for a local resume, never uploaded:
    assert not [name for name in files if name.endswith((".pt", ".pth", ".bin", ".pkl"))]
    card = files["README.md"].decode()
    assert "Trained fuser" in card and "stage: `stage1`" in card and "fusedvlm-train" in card
    assert files["model.safetensors"] == (output / "model.safetensors").read_bytes()
    # Issue 14: the token is written nowhere (card, argument record, any pushed or local file); no pickle is
    # published; the card names folders by name, not by this machine's absolute paths.
    assert "training_args.bin" not in files and "training_args.json" in files
    local_files = [path for path in output.rglob("*") if path.is_file()]
    for content in [*files.values(), *(path.read_bytes() for path in local_files)]:
        assert b"hf_fake_token_123" not in content
    assert str(workspace) not in card and str(tmp_path) not in card
    assert "--model_name_or_path igva" in card and "--output_dir push" in card and "--hub_token" not in card
    record = json.loads(files["training_args.json"])
    assert record["model_name_or_path"] == "igva" and not any("token" in key for key in record)
