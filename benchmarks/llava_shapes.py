"""llava-hf/llava-1.5-7b-hf's shapes (CLIP-L/336 + Llama-7B), shared by the benchmarks."""

from transformers import AutoConfig, LlavaConfig


CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    pad_token_id=0,
)
IMAGE_TOKEN_INDEX = 32000


def llava_1_5_config(vision: dict = CLIP_L_336, text: dict = LLAMA_7B, **kwargs) -> LlavaConfig:
    """A LLaVA-1.5 config with the given CLIP vision and Llama text fields (default: the 7B shapes)."""
    return LlavaConfig(
        vision_config=AutoConfig.for_model("clip_vision_model", **vision),
        text_config=AutoConfig.for_model("llama", **text),
        image_token_index=IMAGE_TOKEN_INDEX,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **kwargs,
    )
