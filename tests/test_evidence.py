"""The fusion-evidence tools: the coarse tower pretraining, the layer-wise probe, the benchmark's quick run, and the
lmms-eval task's scoring (which must agree with the project's scorer)."""

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from hf_fusedvlm.evidence import detail_labels, layer_probe, linear_probe_accuracy, pixel_values, pretrain_coarse_tower
from hf_fusedvlm.synthetic_vqa import QUESTION_KINDS, NUMBER_WORDS, generate_samples, score_answers
from hf_fusedvlm.tiny import build_tiny_llava

from conftest import REPO_ROOT


FUSERS = ("none", "concat", "average", "mmfuser", "igva")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fusion-evidence")
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "fusion_evidence.py"), "--quick", "--output",
         str(folder / "results.json"), "--plots", str(folder)],
        cwd=folder, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((folder / "results.json").read_text()), folder, completed.stdout


def test_quick_run_writes_the_committed_shape(quick_results):
    results, folder, stdout = quick_results
    assert results["seeds"] == [0]
    kinds = [*QUESTION_KINDS, "all"]
    assert list(results["accuracy"]) == list(FUSERS)
    for per_kind in results["accuracy"].values():
        assert list(per_kind) == kinds
        assert all(len(values) == 1 and 0.0 <= values[0] <= 1.0 for values in per_kind.values())
    assert list(results["igva_weights"]) == kinds
    for weights in results["igva_weights"].values():
        assert len(weights) == 4 and all(weight > 0 for weight in weights)
        assert sum(weights) == pytest.approx(1.0, abs=1e-4)
    num_hidden_states = 7  # embeddings + 6 layers of the tiny tower
    assert set(results["probe"]) == set(QUESTION_KINDS)
    for curve in [*results["probe"].values(), *results["probe_random_tower"].values()]:
        assert len(curve) == num_hidden_states and all(0.0 <= value <= 1.0 for value in curve)
    assert "| fuser | colour | count | digit | position | all |" in stdout
    for name in ("probe", "accuracy", "igva_weights"):
        assert (folder / f"fusion_evidence_{name}.png").stat().st_size > 1000


def test_coarse_pretraining_learns_the_coarse_details_and_restores_the_tower():
    llava, processor = build_tiny_llava(seed=0)
    tower = llava.model.vision_tower
    tower.requires_grad_(False)
    samples = generate_samples(256, seed=7)
    pixels = pixel_values(processor.image_processor, samples)
    losses = pretrain_coarse_tower(tower, pixels, samples, steps=150, batch_size=32)
    # Chance is log(4) + log(4) = 2.77 for the two heads.
    assert len(losses) == 150 and sum(losses[-10:]) / 10 < 2.2 < sum(losses[:10]) / 10
    assert not tower.training and not any(parameter.requires_grad for parameter in tower.parameters())
    with pytest.raises(ValueError, match="one sample per image"):
        pretrain_coarse_tower(tower, pixels[:3], samples, steps=1)


def test_linear_probe_separates_what_is_linearly_there_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    features = torch.randn(400, 32, generator=generator)
    features[:, :4] += 4 * torch.nn.functional.one_hot(labels, 4)
    assert linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:], 4) > 0.95
    noise = torch.randn(400, 32, generator=generator)
    assert linear_probe_accuracy(noise[:300], labels[:300], noise[300:], labels[300:], 4) < 0.5


def test_layer_probe_gives_one_curve_per_kind_over_all_hidden_states():
    llava, processor = build_tiny_llava(seed=0)
    train, test = generate_samples(64, seed=8), generate_samples(32, seed=9)
    train_pixels, test_pixels = (pixel_values(processor.image_processor, samples) for samples in (train, test))
    curves = layer_probe(llava.model.vision_tower, train_pixels, train, test_pixels, test, ("colour", "digit"), steps=5)
    assert set(curves) == {"colour", "digit"} and all(len(curve) == 7 for curve in curves.values())
    assert detail_labels(train, "count").max() < 4 and detail_labels(train, "digit").max() <= 9
    with pytest.raises(ValueError, match="Unknown detail kind"):
        detail_labels(train, "shape")


def test_lmms_eval_task_scores_as_the_project_scorer():
    spec = importlib.util.spec_from_file_location(
        "synthetic_vqa_task", REPO_ROOT / "benchmarks" / "lmms_eval_tasks" / "synthetic_vqa" / "utils.py"
    )
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    samples = generate_samples(60, seed=5)
    rng = random.Random(0)
    # Right, wrong and decorated answers ("Red." counts as "red", as the project's first-word rule says).
    responses = [rng.choice([f" {sample.answer.title()}. more", rng.choice(NUMBER_WORDS), ""]) for sample in samples]
    docs = [{"kind": sample.kind, "answer": sample.answer} for sample in samples]
    per_metric = {}
    for doc, response in zip(docs, responses):
        for metric, outcome in task.process_results(doc, [response]).items():
            per_metric.setdefault(metric, []).append(outcome)
    expected = score_answers(samples, [task.first_word(response) for response in responses])["accuracy"]
    for kind in (*QUESTION_KINDS, "all"):
        assert getattr(task, f"aggregate_{kind}")(per_metric[f"accuracy_{kind}"]) == pytest.approx(expected[kind])
    assert 0.1 < expected["all"] < 0.9
