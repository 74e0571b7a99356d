"""The fusion-evidence tools: the digits scene, the coarse tower pretraining, the layer-wise probe, the benchmark's
quick run (which must already show the premise: fine detail decaying with depth) and the lmms-eval task's scoring
(which must agree with the project's scorer)."""

import importlib.util
import json
import os
import random
import subprocess
import sys

import numpy
import pytest
import torch

from hf_fusedvlm.evidence import (
    chance,
    detail_labels,
    layer_features,
    layer_probe,
    pixel_values,
    pretrain_coarse_tower,
    pretrain_instruction_encoder,
    probe_accuracy,
)
from hf_fusedvlm.modeling_fusion import pool_sentence_embeddings
from hf_fusedvlm.synthetic_vqa import (
    DIGIT_SCENE_KINDS,
    HANDWRITING_SPLITS,
    NUMBER_WORDS,
    QUESTION_KINDS,
    QUESTIONS,
    SyntheticSample,
    digit_scene_details,
    draw_digit_scene,
    generate_samples,
    handwritten_digits,
    resample_fine_details,
    score_answers,
)
from hf_fusedvlm.tiny import build_tiny_instruction_encoder, build_tiny_llava

from conftest import REPO_ROOT


FUSERS = ("none", "concat", "average", "mmfuser", "igva")
FINE_KINDS = ("digit", "shape")
BASE_HIDDEN_STATE = 5  # the 6-layer tower's hidden state -2


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fusion-evidence")
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "fusion_evidence.py"),
            "--quick",
            "--output",
            str(folder / "results.json"),
            "--plots",
            str(folder),
        ],
        cwd=folder,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((folder / "results.json").read_text()), folder, completed.stdout


def test_quick_run_writes_the_committed_shape(quick_results):
    results, folder, stdout = quick_results
    assert results["seeds"] == [0]
    kinds = [*DIGIT_SCENE_KINDS, "all"]
    assert list(results["accuracy"]) == list(FUSERS)
    for split in ("accuracy", "accuracy_validation"):
        for per_kind in results[split].values():
            assert list(per_kind) == kinds
            assert all(len(values) == 1 and 0.0 <= values[0] <= 1.0 for values in per_kind.values())
    assert set(results["difference_to_none"]) == set(FUSERS) - {"none"}
    assert list(results["igva_weights"]) == kinds
    for weights in results["igva_weights"].values():
        assert len(weights) == 4 and all(weight > 0 for weight in weights)
        assert sum(weights) == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= results["mmfuser_sampling_on_details"]["per_seed"][0] <= 1.0
    # With one sampling point starting on its query, a detail cell's query reads its own cell evenly over the levels
    # at the parity start; training may only move that weight between levels or out of the cell.
    detail_queries = results["mmfuser_detail_queries"]
    assert list(detail_queries["parity_start"]) == list(detail_queries["trained"]) == ["digit", "shape"]
    for per_level in detail_queries["parity_start"].values():
        assert per_level == pytest.approx(dict.fromkeys(["0", "1", "2", "3"], 0.25), abs=1e-6)
    for per_level in detail_queries["trained"].values():
        assert list(per_level) == ["0", "1", "2", "3"] and 0.0 <= sum(per_level.values()) <= 1.0 + 1e-5
    # the defaults are the mmfuser and igva settings chosen on validation (docs/evidence.md, Diagnosis)
    assert results["fuser_options"]["mmfuser"]["fuser_offset_init"] == "from_query"
    assert results["fuser_options"]["igva"]["balance_loss_weight"] == 0.005
    assert results["lr_scales"] == {"mmfuser": {"sampling_offsets": 0.1}, "igva": {"model.fuser.": 0.1}}
    assert results["instruction_encoder_steps"] == 100
    (diagnostics,) = [run["mmfuser_validation"] for run in results["runs"] if run["fuser"] == "mmfuser"]
    assert 0.0 <= diagnostics["inside_image"] <= 1.0 and list(diagnostics["level_share"]) == ["0", "1", "2", "3"]
    assert sum(diagnostics["level_share"].values()) == pytest.approx(1.0, abs=1e-4)
    assert results["chance"] == {"colour": 0.25, "position": 0.25, "digit": 0.1, "shape": 0.25}
    assert results["tower"]["base_hidden_state"] == BASE_HIDDEN_STATE and results["tower"]["layers"] == 6
    for curve in [*results["probe"].values(), *results["probe_random_tower"].values()]:
        assert len(curve) == 7 and all(0.0 <= value <= 1.0 for value in curve)
    assert "| fuser | colour | position | digit | shape | all |" in stdout
    for name in ("probe", "accuracy", "igva_weights"):
        assert (folder / f"fusion_evidence_{name}.png").stat().st_size > 1000


def test_quick_run_shows_the_premise_fine_detail_decays_with_depth(quick_results):
    """Even on the smoke budget the coarse-trained tower holds the fine details in a shallow hidden state the fusers
    read and has lost most of them at LLaVA's layer; the coarse kind stays readable there."""
    results = quick_results[0]
    for kind in FINE_KINDS:
        curve, level = results["probe"][kind], results["chance"][kind]
        shallow = max(curve[:4]) - level
        assert shallow > 0.1, (kind, curve)
        assert curve[BASE_HIDDEN_STATE] - level < shallow / 2, (kind, curve)
    assert results["probe"]["colour"][BASE_HIDDEN_STATE] > 0.9


def test_digits_scene_is_deterministic_and_keeps_the_handwriting_splits_apart():
    first, again = generate_samples(8, seed=3, scene="digits"), generate_samples(8, seed=3, scene="digits")
    assert [sample.image.tobytes() for sample in first] == [sample.image.tobytes() for sample in again]
    assert [sample.kind for sample in first] == list(DIGIT_SCENE_KINDS) * 2
    assert first[0].image.size == (32, 32)
    for split, (low, high) in HANDWRITING_SPLITS.items():
        samples = generate_samples(40, seed=4, scene="digits", split=split)
        assert all(low <= sample.details["handwriting"] < high for sample in samples)
        assert all(
            sample.details["digit"] == handwritten_digits()[1][sample.details["handwriting"]] for sample in samples
        )
    shape = next(sample for sample in first if sample.kind == "shape")
    assert shape.answer == shape.details["shape"]
    digit = next(sample for sample in first if sample.kind == "digit")
    assert digit.answer == NUMBER_WORDS[digit.details["digit"]]
    with pytest.raises(ValueError, match="Unknown question kinds"):
        generate_samples(4, scene="digits", kinds=("count",))
    with pytest.raises(ValueError, match="32 pixels"):
        generate_samples(4, image_size=64, scene="digits")
    with pytest.raises(ValueError, match="Unknown split"):
        generate_samples(4, scene="digits", split="dev")


def test_a_twin_changes_only_the_cells_of_the_fine_details():
    rng = random.Random(0)
    details = digit_scene_details(rng)
    twin = resample_fine_details(rng, details)
    assert {key: value for key, value in twin.items() if key not in ("handwriting", "digit", "shape")} == {
        key: value for key, value in details.items() if key not in ("handwriting", "digit", "shape")
    }
    image, twin_image = (torch.tensor(numpy.asarray(draw_digit_scene(d))).view(4, 8, 4, 8, 3) for d in (details, twin))
    changed = {
        (row, column)
        for row in range(4)
        for column in range(4)
        if not torch.equal(image[row, :, column], twin_image[row, :, column])
    }
    assert changed <= {details["digit_cell"], details["shape_cell"]} and changed


@pytest.fixture(scope="module")
def digits_llava():
    llava, processor = build_tiny_llava(seed=0, image_size=32)
    return llava, processor


def test_invariance_pretraining_makes_the_top_ignore_the_fine_details_and_restores_the_tower(digits_llava):
    llava, processor = digits_llava
    tower = llava.model.vision_tower
    tower.requires_grad_(False)
    rng = random.Random(1)
    details = [digit_scene_details(rng) for _ in range(96)]
    twins = [resample_fine_details(rng, detail) for detail in details]
    samples, twin_samples = (
        [SyntheticSample(draw_digit_scene(d), "colour", "", "", d) for d in group] for group in (details, twins)
    )
    pixels, twin_pixels = (
        pixel_values(processor.image_processor, samples),
        pixel_values(processor.image_processor, twin_samples),
    )

    def relative_change(layer):
        before, after = layer_features(tower, pixels)[layer], layer_features(tower, twin_pixels)[layer]
        return ((before - after).pow(2).mean() / before.var(dim=(0, 1)).mean()).item()

    top_before = relative_change(6)
    state = {name: tensor.clone() for name, tensor in tower.state_dict().items()}
    losses = pretrain_coarse_tower(tower, pixels, samples, steps=40, batch_size=16, twin_pixels=twin_pixels)
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert relative_change(6) < top_before / 3
    assert relative_change(0) > relative_change(6)  # the patch embeddings still see the details
    assert not tower.training and not any(parameter.requires_grad for parameter in tower.parameters())
    with pytest.raises(ValueError, match="one twin per image"):
        pretrain_coarse_tower(tower, pixels, samples, steps=1, twin_pixels=twin_pixels[:3])
    with pytest.raises(ValueError, match="one sample per image"):
        pretrain_coarse_tower(tower, pixels[:3], samples, steps=1)
    tower.load_state_dict(state)


def test_pooled_probe_finds_a_detail_wherever_it_is_and_not_in_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    tokens = torch.randn(400, 9, 16, generator=generator)
    where = torch.randint(0, 9, (400,), generator=generator)
    tokens[torch.arange(400), where, :4] += 4 * torch.nn.functional.one_hot(labels, 4)
    tokens[torch.arange(400), where, 4] += 6  # what marks the detail's token, as a drawn detail does
    assert probe_accuracy(tokens[:300], labels[:300], tokens[300:], labels[300:], 4) > 0.9
    noise = torch.randn(400, 9, 16, generator=generator)
    assert probe_accuracy(noise[:300], labels[:300], noise[300:], labels[300:], 4) < 0.45


def test_layer_probe_gives_one_curve_per_kind_over_all_hidden_states(digits_llava):
    llava, processor = digits_llava
    train, test = generate_samples(64, seed=8, scene="digits"), generate_samples(32, seed=9, scene="digits")
    train_pixels, test_pixels = (pixel_values(processor.image_processor, samples) for samples in (train, test))
    curves = layer_probe(llava.model.vision_tower, train_pixels, train, test_pixels, test, ("colour", "shape"), steps=5)
    assert set(curves) == {"colour", "shape"} and all(len(curve) == 7 for curve in curves.values())
    assert detail_labels(train, "shape").max() < 4 and detail_labels(train, "digit").max() <= 9
    assert chance("digit") == 0.1 and chance("shape") == 0.25
    with pytest.raises(ValueError, match="Unknown detail kind"):
        detail_labels(train, "size")


def evidence_benchmark():
    """`benchmarks/fusion_evidence.py` as a module."""
    spec = importlib.util.spec_from_file_location("fusion_evidence", REPO_ROOT / "benchmarks" / "fusion_evidence.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_keep_runs_takes_other_fusers_only_from_a_run_with_the_same_settings(quick_results, tmp_path):
    """`--keep-runs`: a run of igva alone may keep the other fusers' runs of an earlier results file only when that
    run had the same budget, tower, seeds, probe and options for those fusers."""
    benchmark = evidence_benchmark()
    previous = quick_results[0]
    path = tmp_path / "previous.json"
    path.write_text(json.dumps(previous))
    settings = {
        **previous["budget"],
        "tower_steps": previous["tower"]["steps"],
        "tower_batch": previous["tower"]["batch_size"],
        "invariance_weight": previous["tower"]["invariance_weight"],
        "seeds": [0],
        "fusers": ("igva",),
        "fuser_options": {**previous["fuser_options"], "igva": {"balance_loss_weight": 1.0}},
        "lr_scales": previous["lr_scales"],
    }
    runs, record = benchmark.kept_runs(str(path), settings, previous["probe"])
    assert record["fusers"] == ["none", "concat", "average", "mmfuser"]
    assert sorted(run["fuser"] for run in runs) == sorted(record["fusers"])
    assert record["probe_max_difference"] == 0
    changed = [
        ({**settings, "stage1_steps": settings["stage1_steps"] + 1}, "budget"),
        ({**settings, "seeds": [0, 1]}, "seeds"),
        ({**settings, "fuser_options": {**settings["fuser_options"], "mmfuser": {}}}, "mmfuser's fuser options"),
    ]
    for other, reason in changed:
        with pytest.raises(ValueError, match=reason):
            benchmark.kept_runs(str(path), other, previous["probe"])
    assert previous["instruction_encoder_steps"] == 100
    only_mmfuser = {
        **settings,
        "fusers": ("mmfuser",),
        "fuser_options": previous["fuser_options"],
        "instruction_encoder_steps": 0,
    }
    with pytest.raises(ValueError, match="igva's instruction encoder pretraining"):
        benchmark.kept_runs(str(path), only_mmfuser, previous["probe"])
    shifted = {kind: [value + 0.1 for value in curve] for kind, curve in previous["probe"].items()}
    with pytest.raises(ValueError, match="probe curve"):
        benchmark.kept_runs(str(path), settings, shifted)


def test_simcse_pretraining_tells_the_questions_apart_and_restores_the_encoder():
    """The random tiny sentence encoder embeds every question of the digits scene alike; unsupervised SimCSE (no
    labels) spreads them apart, and the encoder comes back in eval mode with its requires_grad flags."""
    encoder, tokenizer = build_tiny_instruction_encoder(seed=0)
    encoder.requires_grad_(False)
    questions = [question for kind in DIGIT_SCENE_KINDS for question in QUESTIONS[kind]]
    pooling = type("Pooling", (), {"instruction_pooling": "mean", "instruction_embedding_normalize": True})

    def largest_cosine_between_questions() -> float:
        batch = tokenizer(questions, return_tensors="pt", padding=True)
        with torch.no_grad():
            embeds = pool_sentence_embeddings(encoder(**batch).last_hidden_state, batch["attention_mask"], pooling)
        cosine = embeds @ embeds.T
        return cosine.masked_fill(torch.eye(len(questions), dtype=torch.bool), -1).max().item()

    before = largest_cosine_between_questions()
    losses = pretrain_instruction_encoder(encoder, tokenizer, questions, steps=60)
    after = largest_cosine_between_questions()
    assert before > 0.9 and after < 0.8, (before, after)
    assert losses[-1] < losses[0] / 4
    assert not encoder.training and not any(parameter.requires_grad for parameter in encoder.parameters())
    with pytest.raises(ValueError, match="two different sentences"):
        pretrain_instruction_encoder(encoder, tokenizer, [questions[0]] * 3)


def test_experiment_gives_igva_the_pretrained_instruction_encoder_only_when_asked(tmp_path):
    """`--instruction-encoder-steps`: the converted igva checkpoint carries the SimCSE-trained encoder; with 0 steps
    the random one the other runs use."""
    from hf_fusedvlm import FusedLlavaForConditionalGeneration

    benchmark = evidence_benchmark()
    llava, processor = benchmark.evidence_llava(seed=0)
    llava.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    random_encoder, _ = build_tiny_instruction_encoder(seed=0)
    options = benchmark.FUSER_OPTIONS["igva"]
    for steps in (0, 5):
        folder = benchmark.convert(tmp_path / "llava", "igva", tmp_path / f"igva-{steps}", options, steps)
        encoder = FusedLlavaForConditionalGeneration.from_pretrained(folder).model.instruction_encoder
        same = all(
            torch.equal(weight, random_weight)
            for weight, random_weight in zip(encoder.state_dict().values(), random_encoder.state_dict().values())
        )
        assert same == (steps == 0), steps


@pytest.mark.parametrize("scene", ["glyphs", "digits"])
def test_lmms_eval_task_scores_as_the_project_scorer(scene):
    spec = importlib.util.spec_from_file_location(
        "synthetic_vqa_task", REPO_ROOT / "benchmarks" / "lmms_eval_tasks" / "synthetic_vqa" / "utils.py"
    )
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    samples = generate_samples(60, seed=5, scene=scene)
    kinds = QUESTION_KINDS if scene == "glyphs" else DIGIT_SCENE_KINDS
    rng = random.Random(0)
    # Right, wrong and decorated answers ("Red." counts as "red", as the project's first-word rule says).
    responses = [rng.choice([f" {sample.answer.title()}. more", rng.choice(NUMBER_WORDS), ""]) for sample in samples]
    docs = [{"kind": sample.kind, "answer": sample.answer} for sample in samples]
    per_metric = {}
    for doc, response in zip(docs, responses):
        for metric, outcome in task.process_results(doc, [response]).items():
            per_metric.setdefault(metric, []).append(outcome)
    expected = score_answers(samples, [task.first_word(response) for response in responses])["accuracy"]
    for kind in (*kinds, "all"):
        assert getattr(task, f"aggregate_{kind}")(per_metric[f"accuracy_{kind}"]) == pytest.approx(expected[kind])
    assert 0.1 < expected["all"] < 0.9
