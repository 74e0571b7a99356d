import pytest
from transformers import AutoConfig

from hf_fusedvlm import FusedLlavaConfig
from hf_fusedvlm.configuration_fused_llava import default_fuser_layer_groups, default_fuser_layers


TINY_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
TINY_ENCODER = {"model_type": "bert", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                "num_attention_heads": 4}


def tiny_config(**kwargs):
    return FusedLlavaConfig(**{"vision_config": TINY_VISION, "fuser_num_heads": 4, **kwargs})


def test_clip_l_defaults_follow_the_papers():
    config = FusedLlavaConfig()  # LLaVA-1.5 shapes: CLIP-L/336, 24 layers
    assert config.fuser_type == "mmfuser"
    assert config.fuser_layers == [3, 8, 13, 18, 23]  # -22, -17, -12, -7, -2
    assert config.fuser_layer_groups == [list(range(1, 7)), list(range(7, 13)), list(range(13, 19)), list(range(19, 25))]
    assert config.base_layer == 23
    assert (config.fuser_num_heads, config.fuser_num_points) == (16, 4)
    assert (config.aggregator_hidden_size, config.aggregator_num_layers, config.aggregator_num_heads) == (1024, 4, 4)


@pytest.mark.parametrize("depth", [4, 6, 12, 26, 27, 32])
def test_defaults_scale_to_other_depths(depth):
    layers = default_fuser_layers(depth)
    assert layers[-1] == depth - 1  # the penultimate layer stays the query (LLaVA's -2)
    assert layers == sorted(set(layers)) and all(1 <= layer <= depth for layer in layers)
    groups = default_fuser_layer_groups(depth)
    assert [layer for group in groups for layer in group] == list(range(1, depth + 1))
    assert len(groups) == min(4, depth)


def test_siglip_depth_defaults_build_a_valid_config():
    vision = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 27, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    config = FusedLlavaConfig(vision_config=vision, fuser_num_heads=4, vision_feature_select_strategy="full")
    assert config.fuser_layers == [3, 9, 15, 20, 26]


def test_negative_indices_are_normalised():
    config = tiny_config(fuser_type="concat", fuser_layers=[-6, -2], fuser_layer_groups=[[-1], [1, 2]])
    assert config.fuser_layers == [1, 5]
    assert config.fuser_layer_groups == [[6], [1, 2]]
    assert config.vision_layers_needed == [1, 5]


def test_round_trip_through_save_and_autoconfig(tmp_path):
    config = tiny_config(fuser_type="igva", instruction_encoder_config=TINY_ENCODER, aggregator_hidden_size=64)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, FusedLlavaConfig)
    assert loaded.instruction_encoder_config.model_type == "bert"
    assert loaded.to_diff_dict() == config.to_diff_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fuser_type": "deformable"}, "Unknown fuser_type 'deformable'"),
        ({"fuser_layers": [1, 9, 5]}, "fuser_layers holds 9, outside the vision tower's hidden states"),
        ({"fuser_layers": [2, 3]}, "must equal vision_feature_layer (5)"),
        ({"fuser_layers": [5]}, "needs at least two fuser_layers"),
        ({"fuser_type": "concat", "fuser_layers": [2, 2]}, "must not repeat a layer"),
        ({"fuser_type": "average", "fuser_layer_groups": [[1, 2], []]}, "non-empty groups"),
        ({"fuser_type": "average", "fuser_layer_groups": []}, "non-empty list"),
        ({"vision_feature_layer": -8}, "vision_feature_layer holds -8"),
        ({"vision_feature_layer": [-2, -3]}, "vision_feature_layer must be a single int"),
        ({"fuser_num_heads": 5}, "fuser_num_heads=5 must divide the vision hidden size 64"),
        ({"fuser_type": "igva"}, "fuser_type='igva' needs instruction_encoder_config"),
        ({"fuser_type": "igva", "instruction_encoder_config": TINY_ENCODER, "aggregator_hidden_size": 64,
          "aggregator_num_heads": 3}, "aggregator_num_heads=3 must divide aggregator_hidden_size=64"),
        ({"balance_loss_weight": -1.0}, "balance_loss_weight must be >= 0"),
        ({"fuser_layer_norm_eps": -1.0}, "fuser_layer_norm_eps must be > 0, got -1.0"),
        ({"fuser_layer_norm_eps": 0.0}, "fuser_layer_norm_eps must be > 0"),
        ({"fuser_type": "average", "fuser_layer_groups": [[1, 2], [2, 1]]}, "must not repeat a group"),
        ({"fuser_type": "igva", "instruction_encoder_config": TINY_ENCODER, "aggregator_hidden_size": 64,
          "fuser_layer_groups": [[1, 2, 3]]}, "needs at least two fuser_layer_groups"),
        ({"fuser_type": "igva", "instruction_encoder_config": TINY_ENCODER, "aggregator_hidden_size": 0},
         "aggregator_hidden_size must be at least 1, got 0"),
        ({"fuser_type": "igva", "instruction_encoder_config": TINY_ENCODER, "aggregator_hidden_size": 64,
          "instruction_pooling": "weightedmean"}, "Unknown instruction_pooling 'weightedmean'"),
        ({"vision_config": {**TINY_VISION, "model_type": "siglip_vision_model"}},
         "has no class token, so vision_feature_select_strategy='default' would drop a real patch"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**kwargs)
    assert message in str(error.value)


def test_a_misspelt_fuser_field_warns_with_the_field_it_resembles():
    with pytest.warns(UserWarning, match="unknown keyword 'fuser_layer'.*Did you mean 'fuser_layers'"):
        config = tiny_config(fuser_type="concat", fuser_layer=[1, 5])
    assert config.fuser_layers == default_fuser_layers(6)  # the misspelt keyword was not applied
