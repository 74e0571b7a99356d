"""The trained toy model in examples/ (the README demo) reads the image: it answers held-out questions correctly."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoModel, AutoProcessor

from hf_fusedvlm.synthetic_vqa import answer_questions, generate_samples, score_answers


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOY_MODEL = EXAMPLES / "toy-fused-llava"


def test_demo_command_answers_its_question_correctly(tmp_path):
    image_path = tmp_path / "question.png"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "ask_toy.py"), "--image", str(image_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert lines["answer"].strip() == lines["truth"].strip() == "red"  # the README shows this image and answer
    assert Image.open(image_path).size == (256, 256)


@pytest.mark.parametrize("kind", ["colour", "position"])
def test_held_out_accuracy_of_the_trained_kinds(kind):
    model = AutoModel.from_pretrained(TOY_MODEL, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(TOY_MODEL, trust_remote_code=True)
    samples = generate_samples(100, seed=2000, kinds=(kind,))
    answers, _ = answer_questions(model, processor, samples)
    chance = 1 / len({sample.answer for sample in samples})
    accuracy = score_answers(samples, answers)["accuracy"][kind]
    assert accuracy >= 0.85 > 2 * chance, (accuracy, chance)
