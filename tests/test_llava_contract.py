"""Where users and tools rely on `LlavaForConditionalGeneration`'s behaviour, the fused classes behave the same: a
list-valued `vision_feature_layer`, the image-mismatch error text, `GenerationMixin` among the direct bases."""

import copy
from unittest import mock

import pytest
import torch
from transformers import GenerationMixin, LlavaForConditionalGeneration, PreTrainedModel, set_seed

from hf_fusedvlm import FusedLlavaForConditionalGeneration, FusedLlavaPreTrainedModel
from hf_fusedvlm.conversion import convert_checkpoint, fused_from_llava

from conftest import FUSER_TYPES, instruction_inputs, randomise


PROMPT = "USER: <image>\nWhat colour is the triangle? ASSISTANT:"
# The start of LlavaModel.get_placeholder_mask's error, which code written for LLaVA catches.
LLAVA_MISMATCH = "Image features and image tokens do not match"
# LLaVA concatenates these hidden states on channels (as Granite Vision's and VipLlava's configs do).
LAYER_LIST = [-2, -5, -1]


@pytest.fixture(scope="module")
def list_llava(tiny_llava):
    """A plain tiny LLaVA whose `vision_feature_layer` is `LAYER_LIST`, with random (non-zero) weights."""
    llava, _ = tiny_llava
    config = copy.deepcopy(llava.config)
    config.vision_feature_layer = list(LAYER_LIST)
    model = LlavaForConditionalGeneration(config).eval()
    randomise(model, seed=3)
    return model


@pytest.fixture(scope="module")
def inputs(tiny_llava, image):
    return dict(tiny_llava[1](images=image, text=PROMPT, return_tensors="pt"))


@pytest.mark.parametrize("fuser_type", ["none", "concat"])
def test_a_list_valued_llava_converts_to_concat_with_parity(fuser_type, list_llava, inputs):
    fused = fused_from_llava(list_llava, fuser_type)
    assert (fused.config.fuser_type, fused.config.vision_feature_layer) == ("concat", LAYER_LIST)
    assert fused.config.fuser_layers == [5, 2, 6]
    with torch.no_grad():
        expected = list_llava(**inputs).logits
        actual = fused(**inputs).logits
        # The call may name the layers as LLaVA's callers do.
        named = fused(**inputs, vision_feature_layer=LAYER_LIST).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(named, actual, rtol=0, atol=0)


@pytest.mark.parametrize("fuser_type", ["mmfuser", "average"])
def test_a_list_valued_llava_refuses_fusers_that_read_one_base_layer(fuser_type, list_llava):
    with pytest.raises(ValueError, match=f"fuser_type='{fuser_type}' reads one base layer: .*fuser_layers"):
        fused_from_llava(list_llava, fuser_type)


def test_a_list_valued_llava_hf_checkpoint_converts_and_verifies(list_llava, tiny_llava, inputs, tmp_path):
    """The command-line path: a saved llava-hf checkpoint with a list converts, `verify` compares the logits."""
    list_llava.save_pretrained(tmp_path / "source")
    tiny_llava[1].save_pretrained(tmp_path / "source")
    result = convert_checkpoint(tmp_path / "source", tmp_path / "out", "none", verify=True, progress=False)
    fused = FusedLlavaForConditionalGeneration.from_pretrained(result.output).eval()
    assert fused.config.fuser_type == "concat"
    with torch.no_grad():
        torch.testing.assert_close(fused(**inputs).logits, list_llava(**inputs).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("vision_feature_layer", [-1, [-1], [-1, -2]])
def test_vision_feature_layers_as_transformers_llava_test_sets_them(vision_feature_layer, tiny_llava, inputs):
    """transformers' `test_vision_feature_layers`: set on a built `none` config, the projector reads one vision width
    per listed layer and the model runs."""
    config = fused_from_llava(tiny_llava[0], "none").config
    config.vision_feature_layer = copy.deepcopy(vision_feature_layer)
    num_layers = 1 if isinstance(vision_feature_layer, int) else len(vision_feature_layer)
    model = FusedLlavaForConditionalGeneration(config).eval()
    assert model.model.multi_modal_projector.linear_1.in_features == num_layers * config.vision_config.hidden_size
    with torch.no_grad():
        model(**inputs)


@pytest.mark.parametrize("fuser_type", FUSER_TYPES)
def test_image_mismatch_error_keeps_llava_text(fuser_type, fused_models, tiny_llava, tiny_instruction_encoder, image):
    """Two images' worth of image tokens but one image: LLaVA's message start, then the fused model's explanation."""
    llava, processor = tiny_llava
    inputs = processor(images=[image, image], text=PROMPT.replace("<image>", "<image><image>"), return_tensors="pt")
    inputs = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"][:1]}
    extra = instruction_inputs(tiny_instruction_encoder[1], ["What?"]) if fuser_type == "igva" else {}
    with pytest.raises(ValueError, match=LLAVA_MISMATCH):
        llava(**inputs)
    with pytest.raises(ValueError, match=rf"^{LLAVA_MISMATCH}: the prompts hold 32 image tokens \(2 images' worth\)"):
        fused_models[fuser_type](**inputs, **extra)


@pytest.mark.parametrize("fuser_type", FUSER_TYPES)
def test_missing_weights_get_the_weights_init_gives(fuser_type, fused_models):
    """transformers' `test_can_init_all_missing_weights`, also where its mixin skips this model (transformers < 5.23):
    with the same seed before each module's initialisation, as that test sets it, a model loaded with no weights at
    all equals one built with `__init__`. CLIP's attention and MLP blocks used to keep the generic Linear init."""
    config = fused_models[fuser_type].config
    initialize_weights = PreTrainedModel._initialize_weights

    def seeded(*args, **kwargs):
        set_seed(42)
        initialize_weights(*args, **kwargs)

    with mock.patch.object(PreTrainedModel, "_initialize_weights", seeded):
        built = FusedLlavaForConditionalGeneration(copy.deepcopy(config)).state_dict()
        loaded = FusedLlavaForConditionalGeneration.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    differing = [name for name, tensor in loaded.state_dict().items() if not torch.equal(tensor, built[name])]
    assert not differing


def test_generation_mixin_is_a_direct_base():
    """transformers' `test_inherits_generation_mixin` (the rule for generative models since v4.50)."""
    assert "GenerationMixin" in str(FusedLlavaForConditionalGeneration.__bases__)
    assert FusedLlavaForConditionalGeneration.can_generate()
    assert FusedLlavaForConditionalGeneration.generate is GenerationMixin.generate

    # Naming it changes nothing else: the method resolution order is the one inherited through LLaVA.
    class WithoutExplicitMixin(FusedLlavaPreTrainedModel, LlavaForConditionalGeneration):
        pass

    assert WithoutExplicitMixin.__mro__[1:] == FusedLlavaForConditionalGeneration.__mro__[1:]


def test_llava_class_on_a_fused_checkpoint_is_not_silent(fused_models, tmp_path):
    """`LlavaForConditionalGeneration.from_pretrained(<fused>)` builds a plain LLaVA: the fuser is dropped. No file of
    a checkpoint can refuse that class without breaking its own loading (transformers reads config.json into
    `LlavaConfig` and keeps unknown keys), so the stated behaviour is transformers' own two warnings, which name the
    model type and every dropped fuser weight."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    fused_models["mmfuser"].save_pretrained(tmp_path)
    config_logger = logging.get_logger("transformers.configuration_utils")
    report_logger = logging.get_logger("transformers.modeling_utils")
    with CaptureLogger(config_logger) as config_log, CaptureLogger(report_logger) as report_log:
        llava = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert "You are using a model of type `fused_llava` to instantiate a model of type `llava`" in config_log.out
    fuser_keys = [key for key in fused_models["mmfuser"].state_dict() if key.startswith("model.fuser.")]
    assert fuser_keys and all(f"{key} " in report_log.out for key in fuser_keys)
    assert "UNEXPECTED" in report_log.out and not hasattr(llava.model, "fuser")
