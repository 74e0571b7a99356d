"""Shared tiny fixtures: every test builds from these, nothing is downloaded."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hf_fusedvlm  # noqa: F401  (registers the Auto classes)
from hf_fusedvlm.conversion import fused_from_llava
from hf_fusedvlm.tiny import build_tiny_instruction_encoder, build_tiny_llava


REPO_ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

# The built-in fusers, as registered (a test that registers its own removes it again).
FUSER_TYPES = tuple(hf_fusedvlm.FUSERS)


def reads_instruction(fuser_type: str) -> bool:
    """Whether the registered fuser reads the user's instruction (and so takes instruction inputs)."""
    return hf_fusedvlm.FUSERS[fuser_type].reads_instruction


def make_image(seed: int = 0, size: int = 32) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def instruction_inputs(tokenizer, instructions: list[str]) -> dict:
    """Instruction tensors as the model's forward / generate() take them."""
    encoded = tokenizer(instructions, padding=True, return_tensors="pt")
    return {"instruction_input_ids": encoded["input_ids"], "instruction_attention_mask": encoded["attention_mask"]}


def run_without_package(code: str, cwd) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `hf_fusedvlm` cannot be imported (as on a Hub user's machine)."""
    blocker = (
        "import sys, importlib.abc\n"
        "class _Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'hf_fusedvlm' or name.startswith('hf_fusedvlm.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, "-c", blocker + code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-zero random weights everywhere (gammas included), so no term of the math hides behind a zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.fixture(scope="session")
def tiny_llava():
    """(plain LlavaForConditionalGeneration, LlavaProcessor), deterministic."""
    return build_tiny_llava(seed=0)


@pytest.fixture(scope="session")
def tiny_instruction_encoder():
    """(BertModel, its tokenizer), deterministic."""
    return build_tiny_instruction_encoder(seed=0)


@pytest.fixture(scope="session")
def fused_models(tiny_llava, tiny_instruction_encoder):
    """Every fuser type converted from the same tiny LLaVA with parity initialisation."""
    llava, _ = tiny_llava
    encoder, _ = tiny_instruction_encoder
    return {
        fuser_type: fused_from_llava(
            llava, fuser_type, instruction_encoder=encoder if reads_instruction(fuser_type) else None
        )
        for fuser_type in FUSER_TYPES
    }


@pytest.fixture(scope="session")
def image():
    return make_image(0)


@pytest.fixture(scope="session")
def trained_igva(fused_models):
    """An igva model whose projector reads the fused half, as after training, so the instruction matters."""
    model = copy.deepcopy(fused_models["igva"])
    with torch.no_grad():
        weight = model.model.multi_modal_projector.linear_1.weight
        fused_columns = weight[:, weight.shape[1] // 2 :]
        fused_columns.copy_(torch.randn(fused_columns.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    return model
