import copy
import json

import pytest
import torch
from transformers import AutoModel

from hf_fusedvlm import FusedLlavaForConditionalGeneration, FusedLlavaModel

from conftest import FUSER_TYPES, instruction_inputs, randomise, reads_instruction, run_without_package


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
    return instruction if reads_instruction(fuser_type) else {}


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
    assert json.loads(line[len("RESULT") :]) == expected


def deformable_attentions(model):
    from hf_fusedvlm.fusers import MultiScaleDeformableAttention

    return [module for module in model.model.fuser.modules() if isinstance(module, MultiScaleDeformableAttention)]


def assert_deformable_detr_init(model):
    """Offsets start on Deformable-DETR's ring (bias of head h, point p: p * direction_h) with zero weights, the
    attention-weight projection at zero (uniform weights), and the layer scales at zero."""
    attentions = deformable_attentions(model)
    assert len(attentions) == 2
    for attention in attentions:
        heads, points = attention.num_heads, attention.num_points
        ring = attention.sampling_offsets.bias.detach().view(heads, attention.num_levels, points, 2)
        assert torch.equal(ring[:, :, 1], 2 * ring[:, :, 0])  # radius grows with the point index
        assert torch.equal(ring[0, 0, 0], torch.tensor([1.0, 0.0]))  # head 0 points along +x
        assert ring.abs().amax(-1).min() >= 1.0
        assert torch.count_nonzero(attention.sampling_offsets.weight) == 0
        assert torch.count_nonzero(attention.attention_weights.weight) == 0
        assert torch.count_nonzero(attention.attention_weights.bias) == 0
    assert torch.count_nonzero(model.model.fuser.gamma1) == torch.count_nonzero(model.model.fuser.gamma2) == 0


def test_mmfuser_gets_deformable_detr_init_on_every_construction_path(fused_models, tmp_path):
    config = fused_models["mmfuser"].config
    assert_deformable_detr_init(FusedLlavaForConditionalGeneration(config))
    assert_deformable_detr_init(FusedLlavaForConditionalGeneration._from_config(config))
    assert_deformable_detr_init(AutoModel.from_config(config))
    # A checkpoint without the fuser's weights (e.g. saved before the fuser was added): the fuser is initialised.
    trained = copy.deepcopy(fused_models["mmfuser"])
    randomise(trained.model.fuser, seed=1)
    trained.save_pretrained(
        tmp_path, state_dict={name: tensor for name, tensor in trained.state_dict().items() if ".fuser." not in name}
    )
    loaded = FusedLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert_deformable_detr_init(loaded)
    # Weights that are in the checkpoint are loaded, not re-initialised.
    trained.save_pretrained(tmp_path / "full")
    reloaded = FusedLlavaForConditionalGeneration.from_pretrained(tmp_path / "full")
    for name, tensor in trained.model.fuser.state_dict().items():
        assert torch.equal(reloaded.model.fuser.state_dict()[name], tensor), name


@pytest.mark.parametrize("fuser_type", FUSER_TYPES)
def test_fp32_module_lists_name_only_existing_modules(fuser_type, fused_models):
    model = fused_models[fuser_type]
    has_fuser_weights = fuser_type in ("mmfuser", "igva")
    encoder = ["instruction_encoder"] if reads_instruction(fuser_type) else []
    fuser = ["fuser"] if has_fuser_weights else []
    assert model.model._keep_in_fp32_modules == set(encoder)
    assert model.model._keep_in_fp32_modules_strict == set(fuser)
    # The generation class names them under `model.` (quantisers match from the start of the full module name).
    assert model._keep_in_fp32_modules == set(encoder) | {f"model.{name}" for name in encoder}
    assert model._keep_in_fp32_modules_strict == set(fuser) | {f"model.{name}" for name in fuser}
    assert not model._keep_in_fp32_modules & model._keep_in_fp32_modules_strict


def test_get_image_features_accepts_output_flags_as_plain_llava(tiny_llava, fused_models, inputs):
    llava, _ = tiny_llava
    fused = fused_models["concat"]
    pixel_values = inputs["pixel_values"]
    with torch.no_grad():
        default = fused.get_image_features(pixel_values)
        for flags in ({"output_hidden_states": True}, {"output_hidden_states": False}, {"output_attentions": True}):
            plain = llava.get_image_features(pixel_values, **flags)
            output = fused.get_image_features(pixel_values, **flags)
            torch.testing.assert_close(output.pooler_output, default.pooler_output)
            recorded = [index for index, state in enumerate(output.hidden_states) if state is not None]
            if flags.get("output_hidden_states"):
                assert len(recorded) == len(plain.hidden_states), flags  # every layer, as plain LLaVA
            else:  # the layers the fuser reads, on every supported transformers
                assert recorded == fused.config.vision_layers_needed, flags
            assert (output.attentions is None) == (plain.attentions is None), flags


def test_changed_vision_feature_layer_gives_a_clear_error(fused_models, inputs):
    model = copy.deepcopy(fused_models["mmfuser"])
    with pytest.raises(ValueError, match="fuser_type='mmfuser' reads one base layer"):
        model.config.vision_feature_layer = [-2, -1]
    # On a plain (`none`) config a list means the concat fuser, which the built model does not have.
    model = copy.deepcopy(fused_models["none"])
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match=r"\[-2, -1\] \(from the config\) differs from 5, the layer\(s\) this model's"):
        model(**inputs)
    for fuser_type in ("mmfuser", "none"):
        model = copy.deepcopy(fused_models[fuser_type])
        model.config.vision_feature_layer = -1
        with pytest.raises(ValueError, match="differs from 5, the layer\\(s\\) this model's fuser was built for"):
            model(**inputs)
    model = fused_models["average"]
    with pytest.raises(ValueError, match="vision_feature_layer=-1 \\(from the call\\) differs"):
        model(**inputs, vision_feature_layer=-1)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full' \\(from the call\\)"):
        model.get_image_features(inputs["pixel_values"], vision_feature_select_strategy="full")
    # The config's own values are accepted, as LlavaForConditionalGeneration accepts them.
    model(**inputs, vision_feature_layer=-2, vision_feature_select_strategy="default")


def test_forward_names_llava_parameters(fused_models):
    import inspect

    from transformers import LlavaForConditionalGeneration, LlavaModel

    for fused_class, plain_class in (
        (FusedLlavaForConditionalGeneration, LlavaForConditionalGeneration),
        (FusedLlavaModel, LlavaModel),
    ):
        plain = [name for name in inspect.signature(plain_class.forward).parameters if name != "kwargs"]
        fused = list(inspect.signature(fused_class.forward).parameters)
        assert fused[: len(plain)] == plain, fused_class


def test_from_pretrained_refuses_a_plain_llava_checkpoint(tiny_llava, tmp_path):
    llava, _ = tiny_llava
    llava.save_pretrained(tmp_path)
    for loader in (FusedLlavaForConditionalGeneration, FusedLlavaModel):
        with pytest.raises(ValueError, match=rf"model_type='llava'.*fusedvlm-convert --input {tmp_path} --output"):
            loader.from_pretrained(tmp_path)
