"""The `dense_connector` fuser (Dense Connector, Yao et al., NeurIPS 2024) against the official code's math.

The official code is not importable here, so `reference_math.dense_connector_reference` follows its `encode_images`
and `dense_connector_dci` / `_sci` step by step, with their hard-coded indices; the towers run as the official code
runs them (SigLIP without its last layer) with transformers' own vision models.
"""

import pytest
import torch
from conftest import randomise
from reference_math import dense_connector_reference, mlp_projector_reference
from transformers import AutoConfig, AutoModel, LlamaForCausalLM

from hf_fusedvlm import FusedLlavaConfig, build_fuser


SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 27, "num_attention_heads": 4, "image_size": 384, "patch_size": 14,
                 "vision_use_head": False}
CLIP_L = {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 24,
          "num_attention_heads": 4, "image_size": 56, "patch_size": 14}
TEXT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 1024}
IMAGE_TOKEN = 100


def dense_config(vision: dict, variant: str = "dci", **fields) -> FusedLlavaConfig:
    siglip = vision["model_type"].startswith("siglip")
    return FusedLlavaConfig(
        vision_config=vision,
        text_config=TEXT,
        image_token_index=IMAGE_TOKEN,
        # The official SigLIP tower reads its last layer, the 26th of 27; CLIP towers read layer -2.
        vision_feature_layer=-2,
        vision_feature_select_strategy="full" if siglip else "default",
        fuser_type="dense_connector",
        dense_connector_type=variant,
        **fields,
    )


@pytest.mark.parametrize(
    ("vision", "variant", "groups", "base"),
    [
        (SIGLIP_SO400M, "dci", [list(range(0, 13)), list(range(13, 26))], 26),
        (CLIP_L, "dci", [list(range(0, 12)), list(range(12, 24))], 23),
        (SIGLIP_SO400M, "sci", [[7], [15]], 26),
        (CLIP_L, "sci", [[7], [15]], 23),
    ],
)
def test_hidden_states_are_the_official_codes(vision, variant, groups, base):
    config = dense_config(vision, variant)
    fuser = build_fuser(config)
    assert fuser.layer_groups == groups and fuser.base_layer == base
    assert config.vision_layers_needed == sorted({layer for group in groups for layer in group} | {base})
    assert fuser.output_size == 3 * 64 and not any(True for _ in fuser.parameters())


@pytest.mark.parametrize(
    ("vision", "fields", "message"),
    [
        (SIGLIP_SO400M, {"dense_connector_type": "sti"}, "'sti'.*image-token count"),
        (SIGLIP_SO400M, {"dense_connector_type": "dc"}, "Unknown dense_connector_type 'dc'"),
        ({**CLIP_L, "num_hidden_layers": 12}, {"dense_connector_type": "sci"}, r"hidden states \(7, 15\).*12 layers"),
        ({**SIGLIP_SO400M, "num_hidden_layers": 2}, {}, "runs only 1 layer .*leaves its last layer out"),
        (CLIP_L, {"vision_feature_select_strategy": "full"}, "drops the class token.*'default'"),
    ],
)
def test_unsupported_settings_are_refused_by_name(vision, fields, message):
    with pytest.raises(ValueError, match=message):
        config = dense_config(vision)
        FusedLlavaConfig(**{**config.to_dict(), **fields})


def official_tower(model, siglip: bool):
    """The fused model's tower as the official code runs it: transformers' model of the same weights, SigLIP's last
    layer deleted (`del self.vision_model.encoder.layers[-1:]`)."""
    config = model.config.vision_config.to_dict()
    if siglip:
        config["num_hidden_layers"] -= 1
    tower = AutoModel.from_config(AutoConfig.for_model(**config)).eval()
    missing, unexpected = tower.load_state_dict(model.model.vision_tower.state_dict(), strict=False)
    assert not missing and (not siglip or unexpected)
    return tower


def reference_logits(model, input_ids, image_features) -> torch.Tensor:
    """The official `prepare_inputs_labels_for_multimodal` for one sample and image: the text embedded around the
    image placeholder, the image features in its place, then the LLM."""
    llm = LlamaForCausalLM(model.config.text_config).eval()
    llm.model.load_state_dict(model.model.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    ids = input_ids[0]
    first = int((ids == IMAGE_TOKEN).nonzero()[0])
    after = first + image_features.shape[0]
    embed = llm.get_input_embeddings()
    embeds = torch.cat([embed(ids[:first]), image_features.float(), embed(ids[after:])])
    with torch.no_grad():
        return llm(inputs_embeds=embeds[None]).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("variant", ["dci", "sci"])
@pytest.mark.parametrize("vision", [SIGLIP_SO400M, CLIP_L], ids=["siglip-so400m", "clip-l"])
def test_image_features_and_logits_match_the_official_math(vision, variant, tmp_path):
    """A fused model with random non-zero weights, saved and loaded through AutoModel with trust_remote_code, gives
    the official code's image features and first-step logits."""
    from hf_fusedvlm import FusedLlavaForConditionalGeneration

    siglip = vision["model_type"].startswith("siglip")
    model = FusedLlavaForConditionalGeneration(dense_config(vision, variant)).eval()
    randomise(model, seed=0)
    model.save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    num_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    assert num_patches == (729 if siglip else 16)
    pixel_values = torch.randn(1, 3, vision["image_size"], vision["image_size"], generator=torch.Generator().manual_seed(1))
    input_ids = torch.tensor([[1, 5, 6, *[IMAGE_TOKEN] * num_patches, 7, 8, 9]])
    with torch.no_grad():
        features = model.get_image_features(pixel_values).pooler_output[0]
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        hidden_states = [state[0] for state in official_tower(model, siglip)(pixel_values, output_hidden_states=True).hidden_states]
    projector = model.model.multi_modal_projector
    expected = mlp_projector_reference(
        dense_connector_reference(hidden_states, variant, is_siglip=siglip), projector.linear_1, projector.linear_2
    )
    assert features.shape == (num_patches, 64)
    assert relative_error(features, expected) <= 1e-5
    assert relative_error(logits, reference_logits(model, input_ids, expected)) <= 1e-5
