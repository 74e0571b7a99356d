"""The commands answer `--help` without importing torch, and importing the package stays light while still registering
`fused_llava` with transformers' Auto classes before they can be used. Structural checks on fresh interpreters (which
modules got imported), not timings."""

import json
import os
import subprocess
import sys
from dataclasses import fields
from importlib.metadata import entry_points

import pytest
from transformers import TrainingArguments

from hf_fusedvlm.training.arguments import COMMON_TRAINER_OPTIONS

from conftest import REPO_ROOT


# Modules whose presence means the heavy stack was loaded.
HEAVY = (
    "torch",
    "transformers.training_args",
    "peft",
    "bitsandbytes",
    "hf_fusedvlm.modeling_fusion",
    "hf_fusedvlm.modeling_fused_llava",
    "hf_fusedvlm.modeling_fused_llava_next",
)
# Runs a console-script target (`module:function`) or a `python -m` module with the given argv, then reports the exit
# code and which HEAVY modules were imported, as the last line of stderr.
COMMAND_RUNNER = """
import json, runpy, sys
from importlib import import_module

target, sys.argv = sys.argv[1], sys.argv[2:]
code = 0
try:
    if ":" in target:
        module, function = target.split(":")
        code = getattr(import_module(module), function)()
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
heavy = [name for name in %r if name in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""
# What each command's help must still show (options the registry or the module's tables give included).
EXPECTED_HELP = {
    "fusedvlm-train": [
        "--stage {stage1,stage2,stage2-lora,qlora}",
        "--model_name_or_path",
        "--data_path",
        "--parameter_learning_rates",
        "--help-all",
    ]
    + [f"--{name}" for name in COMMON_TRAINER_OPTIONS],
    "fusedvlm-synthetic-vqa": ["--scene {digits,glyphs}", "--split", "--kinds", "--output"],
    "fusedvlm-convert": ["--input", "--fuser {none,", "--fuser-option NAME=VALUE", "--vision-tower", "--verify"],
    "fusedvlm-convert-original": ["--input", "--fuser {none,", "--fuser-option NAME=VALUE", "--vision-tower"],
}
MODULE_COMMANDS = {"hf_fusedvlm.training": "fusedvlm-train", "hf_fusedvlm.synthetic_vqa": "fusedvlm-synthetic-vqa"}


def run_command(target: str, *argv: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", COMMAND_RUNNER % (HEAVY,), target, *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(completed.stderr.strip().splitlines()[-1])
    return completed, report


def console_scripts() -> dict[str, str]:
    """The package's installed console scripts, `{name: "module:function"}`."""
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.value.startswith("hf_fusedvlm")}
    if not scripts:
        pytest.skip("the package's console scripts are not installed: run `pip install -e .`")
    return scripts


def test_every_console_script_is_checked_here():
    assert set(console_scripts()) == set(EXPECTED_HELP)


@pytest.mark.parametrize("command", [*EXPECTED_HELP, *MODULE_COMMANDS])
def test_help_imports_no_torch(command):
    target = console_scripts()[command] if command.startswith("fusedvlm-") else command
    completed, report = run_command(target, command, "--help")
    assert report["code"] in (0, None), completed.stderr[-3000:]
    assert report["heavy"] == [], f"{command} --help imported {report['heavy']}"
    for needle in EXPECTED_HELP.get(MODULE_COMMANDS.get(command, command), []):
        assert needle in completed.stdout, needle


def test_train_help_all_lists_the_trainer_options_too():
    completed, report = run_command(console_scripts()["fusedvlm-train"], "fusedvlm-train", "--help-all")
    assert report["code"] == 0, completed.stderr[-3000:]
    for name in ("--stage", "--data_path", "--output_dir", "--lr_scheduler_type", "--hub_model_id", "--deepspeed"):
        assert name in completed.stdout, name


def test_the_trainer_options_named_in_help_are_training_arguments():
    assert set(COMMON_TRAINER_OPTIONS) <= {field.name for field in fields(TrainingArguments)}


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: --model_name_or_path"),
        (["--model_name_or_path", "m", "--data_path", "d", "--stage", "stage3"], "argument --stage: invalid choice"),
    ],
)
def test_train_argument_errors_answer_without_torch(argv, message):
    completed, report = run_command(console_scripts()["fusedvlm-train"], "fusedvlm-train", *argv)
    assert report["code"] == 2 and message in completed.stderr
    assert report["heavy"] == []


def test_an_unknown_train_option_is_one_line(tmp_path):
    completed, report = run_command(
        console_scripts()["fusedvlm-train"],
        "fusedvlm-train",
        "--model_name_or_path",
        "m",
        "--data_path",
        "d",
        "--bogus",
    )
    assert report["code"] == 2 and "Traceback" not in completed.stderr
    assert "fusedvlm-train: error: unrecognized arguments: --bogus" in completed.stderr


# Each runs in a fresh interpreter and prints what it checked; `registered()` is true when the Auto classes know both
# fused families (config, model for AutoModel and AutoModelForImageTextToText, processor) and the classes are marked
# for `auto_map`.
REGISTERED = """
import sys
FAMILIES = {
    "fused_llava": ("FusedLlavaConfig", "FusedLlavaForConditionalGeneration", "FusedLlavaProcessor"),
    "fused_llava_next": ("FusedLlavaNextConfig", "FusedLlavaNextForConditionalGeneration", "FusedLlavaNextProcessor"),
}
def registered():
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, MODEL_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    for model_type, names in FAMILIES.items():
        config = type(AutoConfig.for_model(model_type))
        model, processor = MODEL_MAPPING[config], PROCESSOR_MAPPING[config]
        found = (config.__name__, model.__name__, processor.__name__)
        if found != names or MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[config] is not model:
            return False
        auto_classes = (config._auto_class, model._auto_class, processor._auto_class)
        if auto_classes != ("AutoConfig", "AutoModelForImageTextToText", "AutoProcessor"):
            return False
    return True
"""


@pytest.mark.parametrize(
    "code, expected",
    [
        # The package alone imports neither torch nor transformers (and looking transformers up without importing
        # it, as availability checks do, changes nothing); the Auto classes know the model once it is imported.
        (
            "import importlib.util, hf_fusedvlm\nimportlib.util.find_spec('transformers')\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, registered())",
            "False False True",
        ),
        # transformers imported first: registered at once.
        ("import transformers, hf_fusedvlm\nprint(registered())", "True"),
        # A package module that imports transformers itself: registered once it has executed (not half-way).
        ("from hf_fusedvlm.configuration_fused_llava import FusedLlavaConfig\nprint(registered())", "True"),
        ("from hf_fusedvlm import FusedLlavaNextProcessor\nprint(registered())", "True"),
        # Deferred (the commands' argument parsing): no torch inside; registered on leaving normally, not on an exit.
        (
            "import hf_fusedvlm\nwith hf_fusedvlm.auto_registration_deferred():\n    import transformers\n"
            "    inside = ('torch' in sys.modules, hf_fusedvlm._registered)\nprint(inside, hf_fusedvlm._registered)",
            "(False, False) True",
        ),
        (
            "import hf_fusedvlm\ntry:\n    with hf_fusedvlm.auto_registration_deferred():\n        import transformers\n"
            "        raise SystemExit(0)\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, hf_fusedvlm._registered)",
            "False False",
        ),
    ],
    ids=["package-first", "transformers-first", "own-module", "lazy-name", "deferred", "deferred-exit"],
)
def test_importing_the_package_registers_the_auto_classes(code, expected):
    completed = subprocess.run(
        [sys.executable, "-c", REGISTERED + code],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == expected


def test_every_public_name_loads_on_first_use():
    code = (
        "import sys, hf_fusedvlm\n"
        "assert 'torch' not in sys.modules\n"
        "missing = [name for name in hf_fusedvlm.__all__ if getattr(hf_fusedvlm, name, None) is None]\n"
        "lazy = set(hf_fusedvlm._EXPORTS) | {'auto_registration_deferred', 'register_auto_classes'}\n"
        "print(missing, sorted(lazy ^ set(hf_fusedvlm.__all__)), hf_fusedvlm._registered)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "[] [] True"
