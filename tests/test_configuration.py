import json
import re
import warnings

import pytest
from transformers import AutoConfig

from hf_fusedvlm import FusedLlavaConfig, FusedLlavaNextConfig
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
TINY_ENCODER = {
    "model_type": "bert",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
}


def tiny_config(**kwargs):
    return FusedLlavaConfig(**{"vision_config": TINY_VISION, "fuser_num_heads": 4, **kwargs})


def test_clip_l_defaults_follow_the_papers():
    config = FusedLlavaConfig()  # LLaVA-1.5 shapes: CLIP-L/336, 24 layers
    assert config.fuser_type == "mmfuser"
    assert config.fuser_layers == [3, 8, 13, 18, 23]  # -22, -17, -12, -7, -2
    assert config.fuser_layer_groups == [
        list(range(1, 7)),
        list(range(7, 13)),
        list(range(13, 19)),
        list(range(19, 25)),
    ]
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
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 27,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
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
        ({"vision_feature_layer": [-2, -9]}, "vision_feature_layer holds -9"),
        (
            {"vision_feature_layer": [-2, -3], "fuser_type": "mmfuser"},
            "vision_feature_layer=[-2, -3] lists several layers, which LLaVA concatenates (the 'concat' fuser), but "
            "fuser_type='mmfuser' reads one base layer: set vision_feature_layer to that layer (an int) and the layers "
            "to fuse in fuser_layers.",
        ),
        ({"vision_feature_layer": [-2, -3], "fuser_type": "average"}, "fuser_type='average' reads one base layer"),
        (
            {
                "vision_feature_layer": [-2, -3],
                "fuser_type": "igva",
                "instruction_encoder_config": TINY_ENCODER,
                "aggregator_hidden_size": 64,
            },
            "fuser_type='igva' reads one base layer",
        ),
        (
            {"vision_feature_layer": [-2, -3], "fuser_type": "concat", "fuser_layers": [1, 5]},
            "vision_feature_layer=[-2, -3] and fuser_layers=[1, 5] name different layers for the 'concat' fuser",
        ),
        ({"vision_feature_layer": [-2, -2]}, "fuser_layers must not repeat a layer"),
        ({"fuser_num_heads": 5}, "fuser_num_heads=5 must divide the vision hidden size 64"),
        ({"fuser_type": "igva"}, "fuser_type='igva' needs instruction_encoder_config"),
        (
            {
                "fuser_type": "igva",
                "instruction_encoder_config": TINY_ENCODER,
                "aggregator_hidden_size": 64,
                "aggregator_num_heads": 3,
            },
            "aggregator_num_heads=3 must divide aggregator_hidden_size=64",
        ),
        ({"balance_loss_weight": -1.0}, "balance_loss_weight must be >= 0"),
        (
            {"fuser_type": "igva", "instruction_encoder_config": TINY_ENCODER, "balance_loss_type": "entropy"},
            "balance_loss_type must be one of sample_entropy, batch_entropy, got 'entropy'",
        ),
        ({"fuser_layer_norm_eps": -1.0}, "fuser_layer_norm_eps must be > 0, got -1.0"),
        ({"fuser_layer_norm_eps": 0.0}, "fuser_layer_norm_eps must be > 0"),
        ({"fuser_type": "average", "fuser_layer_groups": [[1, 2], [2, 1]]}, "must not repeat a group"),
        (
            {"fuser_type": "average", "fuser_layer_groups": [[2, 2, 2], [5]]},
            "group 1 [2, 2, 2] repeats hidden state(s) [2]",
        ),
        ({"fuser_type": "igva", "fuser_layer_groups": [[1, -6], [5]]}, "group 1 [1, 1] repeats hidden state(s) [1]"),
        ({"vision_feature_layers": [-2, -3]}, "unknown keyword 'vision_feature_layers'.*'vision_feature_layer'"),
        ({"fusertype": "concat"}, "unknown keyword 'fusertype'.*did you mean 'fuser_type'"),
        ({"fuser_layer": [1, 5]}, "unknown keyword 'fuser_layer'.*did you mean 'fuser_layers'"),
        (
            {
                "fuser_type": "igva",
                "instruction_encoder_config": TINY_ENCODER,
                "aggregator_hidden_size": 64,
                "fuser_layer_groups": [[1, 2, 3]],
            },
            "needs at least two fuser_layer_groups",
        ),
        (
            {"fuser_type": "igva", "instruction_encoder_config": TINY_ENCODER, "aggregator_hidden_size": 0},
            "aggregator_hidden_size must be at least 1, got 0",
        ),
        (
            {
                "fuser_type": "igva",
                "instruction_encoder_config": TINY_ENCODER,
                "aggregator_hidden_size": 64,
                "instruction_pooling": "weightedmean",
            },
            "Unknown instruction_pooling 'weightedmean'",
        ),
        (
            {"vision_config": {**TINY_VISION, "model_type": "siglip_vision_model"}},
            "has no class token, so vision_feature_select_strategy='default' would drop a real patch",
        ),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**kwargs)
    assert message in str(error.value) or re.search(message, str(error.value)), str(error.value)


def test_unknown_keywords_that_resemble_no_field_are_kept_or_warned(tmp_path):
    """A key of the user's own is kept (as transformers keeps it); one starting like a fuser field but resembling
    none warns; the keys transformers itself writes load without a word."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = tiny_config(fuser_type="concat", my_note="kept")
        config.save_pretrained(tmp_path)
        loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.my_note == "kept" and loaded.fuser_layers == config.fuser_layers
    with pytest.warns(UserWarning, match="unknown keyword 'fuser_colour', which no fuser reads. Fuser fields: "):
        tiny_config(fuser_colour="red")


def test_a_misspelt_key_in_config_json_is_refused_on_load(tmp_path):
    tiny_config(fuser_type="concat").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["vision_feature_layers"] = saved.pop("vision_feature_layer")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="'vision_feature_layers'.*did you mean 'vision_feature_layer'.*config.json"):
        AutoConfig.from_pretrained(tmp_path)


NEXT_TINY_VISION = {**TINY_VISION, "image_size": 32}
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fuser_type": "average", "fuser_layer_groups": [[2, 2, 2], [5]]}, "group 1 [2, 2, 2] repeats hidden state"),
        ({"fusertype": "concat"}, "FusedLlavaNextConfig got an unknown keyword 'fusertype'.*'fuser_type'"),
        ({"vision_feature_layers": [-2, -3]}, "unknown keyword 'vision_feature_layers'.*'vision_feature_layer'"),
        ({"image_grid_pinpoint": NEXT_PINPOINTS}, "unknown keyword 'image_grid_pinpoint'.*'image_grid_pinpoints'"),
    ],
)
def test_llava_next_config_refuses_the_same_mistakes(kwargs, message):
    """FusedLlavaNextConfig inherits FusedLlavaConfig's checks, and its own field is among the near misses."""
    fields = {"vision_config": NEXT_TINY_VISION, "fuser_num_heads": 4, "image_grid_pinpoints": NEXT_PINPOINTS}
    with pytest.raises(ValueError) as error:
        FusedLlavaNextConfig(**{**fields, **kwargs})
    assert re.search(message, str(error.value)) or message in str(error.value), str(error.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = FusedLlavaNextConfig(**fields, my_note="kept")  # a key of the user's own: kept, no warning
    assert config.my_note == "kept" and config.image_grid_pinpoints == NEXT_PINPOINTS


@pytest.mark.parametrize(
    "fuser_kwargs",
    [{}, {"fuser_type": "none"}, {"fuser_type": "concat"}, {"fuser_type": "concat", "fuser_layers": [-2, 1]}],
)
def test_a_list_of_feature_layers_is_the_concat_fuser_over_them(fuser_kwargs, tmp_path):
    """LLaVA's `vision_feature_layer=[...]` concatenates those layers on channels: the concat fuser over them."""
    config = tiny_config(vision_feature_layer=[-2, -6], **fuser_kwargs)
    assert (config.fuser_type, config.fuser_layers) == ("concat", [5, 1])
    assert config.vision_feature_layer == [-2, -6]  # kept as LLaVA keeps it
    assert config.vision_layers_needed == [1, 5]
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert (loaded.fuser_type, loaded.fuser_layers, loaded.vision_feature_layer) == ("concat", [5, 1], [-2, -6])


def test_a_one_layer_list_is_that_layer():
    config = tiny_config(vision_feature_layer=[-1], fuser_type="none")
    assert (config.fuser_type, config.vision_feature_layer, config.base_layer) == ("none", -1, 6)


def test_a_list_assigned_to_a_built_config_keeps_its_llava_meaning():
    """As transformers' LLaVA tests do: build the config, then set `vision_feature_layer` to a list."""
    config = tiny_config(fuser_type="none")
    config.vision_feature_layer = [-1, -2]
    assert (config.fuser_type, config.fuser_layers) == ("concat", [6, 5])
    config = tiny_config(fuser_type="mmfuser")
    with pytest.raises(ValueError, match="fuser_type='mmfuser' reads one base layer: .* fuser_layers"):
        config.vision_feature_layer = [-1, -2]
    config = tiny_config(fuser_type="none")
    with pytest.raises(ValueError, match="fuser_layers must not repeat a layer"):
        config.vision_feature_layer = [-1, 6]
    assert (config.vision_feature_layer, config.fuser_type, config.fuser_layers) == (-2, "none", [1, 2, 3, 4, 5])
