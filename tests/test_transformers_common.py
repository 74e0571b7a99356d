"""transformers' own common model tests (`ModelTesterMixin` of the installed release) for every fuser type.

The tester follows transformers' `tests/models/llava/test_modeling_llava.py`: a tiny Llama and CLIP tower, three
images, the image tokens at the start of each row. Tests that cannot apply to a fused LLaVA are skipped through
`NOT_APPLICABLE`, each with its reason. The tests where the sub-configs matter also run, for every fuser, on that
tester's own configs verbatim (`LLAVA_TESTER_TEXT_CONFIG`, `LLAVA_TESTER_VISION_CONFIG`), with the LLaVA-specific tests
of that file.
"""

import copy
import unittest

import pytest
import torch
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

from hf_fusedvlm import (
    FusedLlavaConfig,
    FusedLlavaForConditionalGeneration,
    FusedLlavaModel,
    FusedLlavaNextConfig,
    FusedLlavaNextForConditionalGeneration,
    FusedLlavaNextModel,
)

from conftest import FUSER_TYPES, reads_instruction
from transformers_sdist import load_test_modeling_common


pytest.importorskip("parameterized", reason="transformers' common tests need `parameterized` (the test extra)")
common = load_test_modeling_common()
# The mixin picks base models and label shapes from transformers' static auto-mapping names, which an in-tree model
# would be listed in; rebinding the names inside the test module leaves transformers' own tables untouched.
common.MODEL_MAPPING_NAMES = {**common.MODEL_MAPPING_NAMES, "fused_llava": "FusedLlavaModel"}
common.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES = {
    **common.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    "fused_llava": "FusedLlavaForConditionalGeneration",
}


# Test name -> why it cannot apply to a fused LLaVA (the same for every fuser unless listed in NOT_APPLICABLE_FOR).
NOT_APPLICABLE = {
    "test_generation_tester_mixin_inheritance": (
        "GenerationTesterMixin lives in tests/generation/, which the transformers sdist does not ship; generate() is "
        "tested in tests/test_modeling.py"
    ),
}
NOT_APPLICABLE_FOR: dict[str, dict[str, str]] = {
    "dense_connector": {
        "test_get_image_features_hidden_states": (
            "the check wants a hidden state left unrecorded, but on this 2-layer tower dense_connector reads all three, "
            "as the official code does (means of hidden states 0 and 1, base layer 2); that only the fuser's layers "
            "are recorded is tested in tests/test_dense_connector.py"
        ),
    },
}

# transformers' LLaVA tester's sub-configs, verbatim: the tower config names no model_type (LlavaConfig's default, a
# CLIP tower) and sets projection_dim; the text config carries the tester's extra fields.
LLAVA_TESTER_TEXT_CONFIG = {
    "model_type": "llama",
    "seq_length": 7,
    "is_training": True,
    "use_input_mask": True,
    "use_token_type_ids": False,
    "use_labels": True,
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 16,
    "type_sequence_label_size": 2,
    "initializer_range": 0.02,
    "num_labels": 3,
    "num_choices": 4,
    "pad_token_id": 1,
}
LLAVA_TESTER_VISION_CONFIG = {
    "image_size": 8,
    "patch_size": 2,
    "num_channels": 3,
    "is_training": True,
    "hidden_size": 32,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "initializer_range": 0.02,
}
# The common tests that also run on those configs: the ones that build, initialise, save or train from the config.
LLAVA_TESTER_COMMON_TESTS = (
    "test_can_init_all_missing_weights",
    "test_save_load",
    "test_training",
)
# The start of LLaVA's error for images that do not match the image tokens.
LLAVA_MISMATCH = "Image features and image tokens do not match"


class FusedLlavaModelTester:
    """Tiny configs and inputs for one fuser type, shaped like transformers' LLaVA tester."""

    def __init__(self, parent, fuser_type: str):
        self.parent = parent
        self.fuser_type = fuser_type
        self.batch_size = 3
        self.is_training = True
        self.image_token_index = 0
        self.pad_token_id = 1
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.image_size, self.patch_size = 8, 2
        self.num_image_tokens = (self.image_size // self.patch_size) ** 2
        self.seq_length = 7 + self.num_image_tokens
        self.encoder_seq_length = self.seq_length
        self.instruction_length = 5
        self.instruction_vocab_size = 50

        self.text_config = {
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": 37,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "pad_token_id": self.pad_token_id,
        }
        self.vision_config = {
            "model_type": "clip_vision_model",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": 3,
            "hidden_size": 32,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "dropout": 0.1,
            "attention_dropout": 0.1,
            "initializer_range": 0.02,
        }

    def llava_tester_configs(self) -> "FusedLlavaModelTester":
        """This tester with transformers' LLaVA tester's own sub-configs (same sizes)."""
        self.text_config, self.vision_config = dict(LLAVA_TESTER_TEXT_CONFIG), dict(LLAVA_TESTER_VISION_CONFIG)
        return self

    def get_config(self) -> FusedLlavaConfig:
        instruction_encoder_config = None
        if reads_instruction(self.fuser_type):
            instruction_encoder_config = AutoConfig.for_model(
                "bert",
                vocab_size=self.instruction_vocab_size,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=37,
                max_position_embeddings=64,
                pad_token_id=0,
            )
        return FusedLlavaConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_index=self.image_token_index,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            # The last layer is the base, as in transformers' LLaVA tester; mmfuser and concat fuse both layers.
            vision_feature_layer=-1,
            fuser_layers=[1, 2],
            image_seq_length=self.num_image_tokens,
            fuser_type=self.fuser_type,
            fuser_num_heads=4,
            fuser_num_points=2,
            aggregator_hidden_size=32,
            aggregator_num_layers=1,
            aggregator_num_heads=2,
            instruction_encoder_config=instruction_encoder_config,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        pixel_values = common.floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[:, : self.num_image_tokens] = self.image_token_index
        inputs = {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": torch.ones(input_ids.shape, dtype=torch.long),
        }
        if reads_instruction(self.fuser_type):
            inputs["instruction_input_ids"] = (
                common.ids_tensor([self.batch_size, self.instruction_length], self.instruction_vocab_size - 1) + 1
            )
            inputs["instruction_attention_mask"] = torch.ones(
                self.batch_size, self.instruction_length, dtype=torch.long
            )
        return config, inputs


class FusedLlavaCommonTest(common.ModelTesterMixin):
    """transformers' `ModelTesterMixin` on both fused classes; subclassed once per fuser type below."""

    fuser_type: str
    all_model_classes = (FusedLlavaModel, FusedLlavaForConditionalGeneration)
    _is_composite = True
    # LLaVA reads the tower's hidden states, which come before CLIP's post-layernorm: that norm never gets a gradient
    # (transformers' LLaVA tester skips the gradient-checkpointing tests for the same reason).
    test_all_params_have_gradient = False
    # The mixin runs this test only for models it dates from 2023 on, reading a copyright line this package does not
    # write: it applies to every model (weights missing from a checkpoint must get the weights __init__ gives).
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = FusedLlavaModelTester(self, self.fuser_type)
        reason = NOT_APPLICABLE_FOR.get(self.fuser_type, {}).get(self._testMethodName) or NOT_APPLICABLE.get(
            self._testMethodName
        )
        if reason is not None:
            self.skipTest(reason)

    def _image_features_prepare_config_and_inputs(self):
        """The mixin keeps only inputs named like images; the instruction is an input of the fused image features
        too (as `qformer_input_ids` is for InstructBLIP)."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        return config, {key: value for key, value in inputs.items() if key.startswith(("pixel", "instruction"))}


class FusedLlavaOnLlavaTesterConfigs(FusedLlavaCommonTest):
    """The common tests on transformers' LLaVA tester's own sub-configs; only `LLAVA_TESTER_COMMON_TESTS` are run
    (`test_common_tests_on_llava_tester_configs`), so these classes are kept out of module scope."""

    def setUp(self):
        super().setUp()
        self.model_tester.llava_tester_configs()


LLAVA_TESTER_CASES = {}
for _fuser_type in FUSER_TYPES:
    _name = f"FusedLlava{_fuser_type.title()}CommonTest"
    globals()[_name] = type(_name, (FusedLlavaCommonTest, unittest.TestCase), {"fuser_type": _fuser_type})
    LLAVA_TESTER_CASES[_fuser_type] = type(
        f"FusedLlava{_fuser_type.title()}OnLlavaTesterConfigs",
        (FusedLlavaOnLlavaTesterConfigs, unittest.TestCase),
        {"fuser_type": _fuser_type},
    )
del _fuser_type, _name


@pytest.mark.parametrize("test_name", LLAVA_TESTER_COMMON_TESTS)
@pytest.mark.parametrize("fuser_type", FUSER_TYPES)
def test_common_tests_on_llava_tester_configs(fuser_type, test_name):
    case = LLAVA_TESTER_CASES[fuser_type](test_name)
    case.setUp()
    getattr(case, test_name)()


def llava_tester_inputs(fuser_type: str):
    return FusedLlavaModelTester(None, fuser_type).llava_tester_configs().prepare_config_and_inputs_for_common()


@pytest.mark.parametrize("vision_feature_layer", [-1, [-1], [-1, -2]], ids=["int", "one-layer-list", "list"])
@pytest.mark.parametrize("fuser_type", FUSER_TYPES)
def test_llava_vision_feature_layers(fuser_type, vision_feature_layer):
    """LLaVA's `test_vision_feature_layers`: the layers set on a built config. A list is the concat fuser over those
    layers (projector width: one vision width per layer) where the fuser is `none` or `concat`, and refused at once,
    naming fuser_layers, by the fusers that read one base layer."""
    config, inputs = llava_tester_inputs(fuser_type)
    several = isinstance(vision_feature_layer, list) and len(vision_feature_layer) > 1
    if several and fuser_type not in ("none", "concat"):
        with pytest.raises(ValueError, match=f"fuser_type='{fuser_type}' reads one base layer: .*fuser_layers"):
            config.vision_feature_layer = vision_feature_layer
        return
    config.vision_feature_layer = vision_feature_layer
    for model_class in (FusedLlavaModel, FusedLlavaForConditionalGeneration):
        model = model_class(config).eval()
        base_model = getattr(model, "model", model)
        if fuser_type == "none" or several:
            num_layers = len(vision_feature_layer) if several else 1
            expected_width = num_layers * config.vision_config.hidden_size
            assert base_model.multi_modal_projector.linear_1.in_features == expected_width
        with torch.no_grad():
            model(**inputs)


@pytest.fixture(scope="module")
def llava_mismatch_error() -> type[Exception]:
    """The exception LlavaForConditionalGeneration raises, on the LLaVA tester's inputs, for one image too few."""
    config, inputs = llava_tester_inputs("none")
    llava_config = LlavaConfig(
        text_config=LLAVA_TESTER_TEXT_CONFIG,
        vision_config=LLAVA_TESTER_VISION_CONFIG,
        image_token_index=config.image_token_index,
        vision_feature_layer=config.vision_feature_layer,
        image_seq_length=config.image_seq_length,
    )
    llava = LlavaForConditionalGeneration(llava_config).eval()
    with pytest.raises(Exception, match=LLAVA_MISMATCH) as error, torch.no_grad():
        llava(**{**inputs, "pixel_values": inputs["pixel_values"][-1:]})
    return error.type


@pytest.mark.parametrize("fuser_type", FUSER_TYPES)
def test_llava_mismatching_num_image_tokens(fuser_type, llava_mismatch_error):
    """LLaVA's `test_mismatching_num_image_tokens`, raising what LLaVA raises, with LLaVA's phrase. An instruction
    row per prompt stays given (`igva`); `image_sample_index` then says which prompt each image belongs to."""
    config, inputs = llava_tester_inputs(fuser_type)

    def image_index(rows):
        return {"image_sample_index": torch.tensor(rows)} if fuser_type == "igva" else {}

    for model_class in (FusedLlavaModel, FusedLlavaForConditionalGeneration):
        model = model_class(config).eval()
        current = copy.deepcopy(inputs)
        with torch.no_grad():
            model(**current)
            # One image removed, its image tokens left in the text.
            current["pixel_values"] = current["pixel_values"][-1:]
            with pytest.raises(llava_mismatch_error, match=LLAVA_MISMATCH):
                model(**current, **image_index([2]))
            # Two prompts with one image's tokens each: one image is too few, two are right.
            two_prompts = {key: torch.cat([value[:1]] * 2) for key, value in current.items() if key != "pixel_values"}
            with pytest.raises(llava_mismatch_error, match=LLAVA_MISMATCH):
                model(**two_prompts, pixel_values=current["pixel_values"][:1], **image_index([0]))
            model(**two_prompts, pixel_values=torch.cat([current["pixel_values"][:1]] * 2))


def test_not_applicable_names_existing_common_tests():
    """Every skip names a test the mixin defines, so the list cannot go stale silently."""
    names = set(NOT_APPLICABLE) | {name for reasons in NOT_APPLICABLE_FOR.values() for name in reasons}
    assert names and all(hasattr(common.ModelTesterMixin, name) for name in names), names


# ------------------------------------------------------------------------------------------------------ LLaVA-NeXT

common.MODEL_MAPPING_NAMES["fused_llava_next"] = "FusedLlavaNextModel"
common.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES["fused_llava_next"] = "FusedLlavaNextForConditionalGeneration"


class FusedLlavaNextModelTester(FusedLlavaModelTester):
    """Shaped like transformers' LLaVA-NeXT tester: 16 px crops of 2 px patches, one `[32, 32]` pinpoint, so a 16 px
    image gives its base view and a 2 x 2 grid of tiles (5 crops)."""

    def __init__(self, parent, fuser_type: str):
        super().__init__(parent, fuser_type)
        self.image_size = self.vision_config["image_size"] = 16
        self.image_grid_pinpoints = [[32, 32]]
        side = self.image_size // self.patch_size
        # The base view, then the 2 x 2 tiles as one (2 side) x (2 side) grid with a newline token after each row
        # (a square image needs no unpadding).
        self.num_image_tokens = side * side + 2 * side * (2 * side + 1)
        self.seq_length = 7 + self.num_image_tokens
        self.encoder_seq_length = self.seq_length
        self.text_config["max_position_embeddings"] = 1024

    def get_config(self) -> FusedLlavaNextConfig:
        fields = super().get_config().to_dict()
        fields.pop("model_type")
        return FusedLlavaNextConfig(**fields, image_grid_pinpoints=self.image_grid_pinpoints)

    def prepare_config_and_inputs_for_common(self):
        config, inputs = super().prepare_config_and_inputs_for_common()
        inputs["pixel_values"] = common.floats_tensor([self.batch_size, 5, 3, self.image_size, self.image_size])
        inputs["image_sizes"] = torch.tensor([[self.image_size, self.image_size]] * self.batch_size)
        return config, inputs


class FusedLlavaNextCommonTest(FusedLlavaCommonTest):
    all_model_classes = (FusedLlavaNextModel, FusedLlavaNextForConditionalGeneration)
    # The tower runs on the crops, so `last_hidden_state` has one row per crop (15 for 3 images), as LLaVA-NeXT's does;
    # the mixin's check wants one per image. The packed features per image are checked in tests/test_llava_next.py.
    skip_test_image_features_output_shape = True

    def setUp(self):
        super().setUp()
        self.model_tester = FusedLlavaNextModelTester(self, self.fuser_type)

    def _image_features_prepare_config_and_inputs(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        return config, {
            key: value for key, value in inputs.items() if key.startswith(("pixel", "image", "instruction"))
        }


for _fuser_type in FUSER_TYPES:
    _name = f"FusedLlavaNext{_fuser_type.title()}CommonTest"
    globals()[_name] = type(_name, (FusedLlavaNextCommonTest, unittest.TestCase), {"fuser_type": _fuser_type})
del _fuser_type, _name
