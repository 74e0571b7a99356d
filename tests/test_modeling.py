import copy
import json

import pytest
import torch
from transformers import AutoModel

from hf_fusedvlm import FusedLlavaForConditionalGeneration

from conftest import FUSER_TYPES, instruction_inputs, randomise, run_without_package


QUESTION = "What colour is the triangle?"
PROMPT = f"USER: <image>\n{QUESTION} ASSISTANT:"


@pytest.fixture(scope="module")
def inputs(tiny_llava, image):
    _, processor = tiny_llava
    return dict(processor(images=image, text=PROMPT, return_tensors="pt"))


@pytest.fixture(scope="module")
def instruction(tiny_instruction_encoder):
    return instruction_inputs(tiny_instruction_encoder[1], [QUESTION])


def extra_inputs(fuser_type, instruction):
    return instruction if fuser_type == "igva" else {}


@pytest.mark.parametrize("fuser_type", FUSER_TYPES)
def test_converted_model_reproduces_plain_llava(fuser_type, tiny_llava, fused_models, inputs, instruction):
    llava, _ = tiny_llava
    fused = fused_models[fuser_type]
    extra = extra_inputs(fuser_type, instruction)
    with torch.no_grad():
        expected = llava(**inputs).logits
        actual = fused(**inputs, **extra).logits
    assert (actual - expected).abs().max().item() <= 1e-6
    generation = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(fused.generate(**inputs, **extra, **generation), llava.generate(**inputs, **generation))


@pytest.mark.parametrize("fuser_type", ["mmfuser", "igva"])
def test_generate_with_and_without_cache_and_beam_search(fuser_type, tiny_llava, fused_models, inputs, instruction):
    llava, _ = tiny_llava
    fused = fused_models[fuser_type]
    extra = extra_inputs(fuser_type, instruction)
    cached = fused.generate(**inputs, **extra, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = fused.generate(**inputs, **extra, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    beams = fused.generate(**inputs, **extra, max_new_tokens=5, do_sample=False, num_beams=2)
    assert torch.equal(beams, llava.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=2))


def count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("num_beams", [1, 2])
def test_vision_tower_and_instruction_encoder_run_once_per_generate(num_beams, trained_igva, inputs, instruction):
    model = copy.deepcopy(trained_igva)
    tower_calls = count_calls(model.model.vision_tower)
    encoder_calls = count_calls(model.model.instruction_encoder)
    output = model.generate(**inputs, **instruction, max_new_tokens=5, min_new_tokens=5, num_beams=num_beams)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 5
    assert (len(tower_calls), len(encoder_calls)) == (1, 1)


def test_prefill_computes_the_logits_of_the_last_position_only(fused_models, inputs):
    """generate() passes `logits_to_keep` only to a forward that names it; without it prefill projects every
    position through the LM head."""
    model = copy.deepcopy(fused_models["mmfuser"])
    head_positions = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_positions.append(args[0].shape[1]))
    model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert head_positions == [1, 1, 1]


def test_vision_tower_records_only_the_fuser_layers(fused_models, inputs):
    model = fused_models["concat"]
    with torch.no_grad():
        output = model.get_image_features(inputs["pixel_values"])
    recorded = [index for index, state in enumerate(output.hidden_states) if state is not None]
    assert recorded == model.config.vision_layers_needed == model.config.fuser_layers
    assert len(output.pooler_output) == 1
    assert output.pooler_output[0].shape == (16, model.config.text_config.hidden_size)


def test_gradients_reach_the_fuser_but_not_the_instruction_encoder(trained_igva, fused_models, inputs, instruction):
    fresh_mmfuser = copy.deepcopy(fused_models["mmfuser"])
    fresh_mmfuser(**inputs, labels=inputs["input_ids"]).loss.backward()
    # At parity init only gamma1 carries a gradient (gamma1 = 0 gates the block, zero offset/weight
    # projections gate the query); training opens the rest.
    assert fresh_mmfuser.model.fuser.gamma1.grad.abs().sum() > 0
    stepped_mmfuser = copy.deepcopy(fused_models["mmfuser"])
    randomise(stepped_mmfuser.model.fuser, seed=0)  # as after some training: no zero gates left
    for model, extra in ((copy.deepcopy(trained_igva), instruction), (stepped_mmfuser, {})):
        model.train()
        model(**inputs, **extra, labels=inputs["input_ids"]).loss.backward()
        for name, parameter in model.model.fuser.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        if model.model.instruction_encoder is not None:
            assert all(not p.requires_grad and p.grad is None for p in model.model.instruction_encoder.parameters())


def test_balance_loss_is_weighted_negative_mean_entropy(tiny_llava, fused_models, inputs, instruction):
    llava, _ = tiny_llava
    model = fused_models["igva"]
    with torch.no_grad():
        output = model(**inputs, **instruction, labels=inputs["input_ids"])
        plain_loss = llava(**inputs, labels=inputs["input_ids"]).loss
    weights = output.fusion_weights
    entropy = -(weights * weights.log()).sum(-1).mean()
    torch.testing.assert_close(output.balance_loss, -model.config.balance_loss_weight * entropy)
    torch.testing.assert_close(output.loss, plain_loss + output.balance_loss)
    assert output.balance_loss.abs() > 0


def test_instruction_errors_are_clear(fused_models, inputs, instruction):
    model = fused_models["igva"]
    with pytest.raises(ValueError, match="reads the user's instruction: pass instruction_input_ids"):
        model(**inputs)
    two = {key: value.repeat(2, 1) for key, value in instruction.items()}
    with pytest.raises(ValueError, match="Got 2 instructions for 1 images: pass image_sample_index"):
        model(**inputs, **two)
    with pytest.raises(ValueError, match=r"image_sample_index must have shape \(1,\)"):
        model(**inputs, **two, image_sample_index=torch.tensor([0, 1]))
    # With the mapping, the second image row may use the second instruction.
    output = model(**inputs, **two, image_sample_index=torch.tensor([1]))
    assert output.logits.shape[0] == 1


def test_autoconfig_and_automodel_in_process(fused_models, tmp_path):
    fused_models["average"].save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is FusedLlavaForConditionalGeneration
    for name, tensor in fused_models["average"].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


REMOTE_CODE = """
import json, sys, torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
inputs = torch.load("inputs.pt")
result = {}
for fuser_type in sys.argv[1:] or %r:
    path = "saved_" + fuser_type
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert type(config).__name__ == "FusedLlavaConfig" and type(config).__module__.startswith("transformers_modules")
    extra = inputs["instruction"] if fuser_type == "igva" else {}
    tokens = []
    for auto in (AutoModel, AutoModelForImageTextToText):
        model = auto.from_pretrained(path, trust_remote_code=True)
        assert type(model).__name__ == "FusedLlavaForConditionalGeneration", type(model)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        tokens.append(model.generate(**inputs["inputs"], **extra, max_new_tokens=6, do_sample=False).tolist())
    assert tokens[0] == tokens[1]
    result[fuser_type] = tokens[0]
print("RESULT" + json.dumps(result))
""" % (list(FUSER_TYPES),)


def test_saved_checkpoint_loads_with_remote_code_without_the_package(fused_models, inputs, instruction, tmp_path):
    expected = {}
    for fuser_type, model in fused_models.items():
        model.save_pretrained(tmp_path / f"saved_{fuser_type}")
        expected[fuser_type] = model.generate(
            **inputs, **extra_inputs(fuser_type, instruction), max_new_tokens=6, do_sample=False
        ).tolist()
        saved = json.loads((tmp_path / f"saved_{fuser_type}" / "config.json").read_text())
        assert set(saved["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
        assert (tmp_path / f"saved_{fuser_type}" / "fusers.py").exists()
    torch.save({"inputs": inputs, "instruction": instruction}, tmp_path / "inputs.pt")
    result = run_without_package(REMOTE_CODE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    assert json.loads(line[len("RESULT"):]) == expected
