"""FusedLlava model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlavaConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


FUSER_TYPES = ("mmfuser", "igva", "concat", "average", "none")
# Fusers that need an embedding of the user's instruction.
INSTRUCTION_FUSERS = ("igva",)
# How the instruction encoder's token states become one sentence embedding (sentence-transformers' pooling modes).
INSTRUCTION_POOLINGS = ("mean", "cls", "max")

# Reference layouts for a 24-layer CLIP-L tower (hidden-state indices, 0 = embeddings).
_REFERENCE_DEPTH = 24
_REFERENCE_MMFUSER_LAYERS = (3, 8, 13, 18, 23)
_REFERENCE_NUM_GROUPS = 4


def default_fuser_layers(num_hidden_layers: int) -> list[int]:
    """MMFuser's layers (-22, -17, -12, -7, -2 of CLIP-L) moved to the same relative depths.

    The scale keeps the penultimate layer as the last (query) layer, so parity with a LLaVA that reads
    hidden state -2 holds for any depth. Duplicates that appear on shallow towers are dropped.
    """
    scale = (num_hidden_layers - 1) / (_REFERENCE_DEPTH - 1)
    layers = [max(1, round(index * scale)) for index in _REFERENCE_MMFUSER_LAYERS]
    return sorted(set(layers))


def default_fuser_layer_groups(num_hidden_layers: int) -> list[list[int]]:
    """IGVA's groups ([1..6], [7..12], [13..18], [19..24] on CLIP-L): all layers split into 4 contiguous groups."""
    num_groups = min(_REFERENCE_NUM_GROUPS, num_hidden_layers)
    base, extra = divmod(num_hidden_layers, num_groups)
    groups, start = [], 1
    for group_index in range(num_groups):
        size = base + (1 if group_index < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


@strict
class FusedLlavaConfig(LlavaConfig):
    r"""
    Configuration of a LLaVA model whose visual tokens are a fusion of several vision-encoder layers.

    All [`LlavaConfig`] arguments are accepted. `vision_feature_layer` (an `int`) is the *base* layer: the one a plain
    LLaVA projects. It is the query of `mmfuser`, the layer `igva` and `average` concatenate first, and the only layer
    of `none`. Layer indices index the vision tower's `hidden_states` (0 = embeddings, `num_hidden_layers` = last
    layer); negative indices count from the end. `fuser_layers` and `fuser_layer_groups` are stored normalised to
    non-negative values.

    fuser_type (`str`, defaults to `"mmfuser"`):
        One of `"mmfuser"`, `"igva"`, `"concat"`, `"average"`, `"none"`.
    fuser_layers (`list[int]`, *optional*):
        Layers fused by `mmfuser` (the last one is the query, so it must equal `vision_feature_layer`) and `concat`
        (concatenated along channels in this order). Defaults to MMFuser's CLIP-L layers 3, 8, 13, 18, 23 scaled to the
        tower's depth.
    fuser_layer_groups (`list[list[int]]`, *optional*):
        Groups of layers averaged by `igva` and `average`. Defaults to the tower's layers 1..L split into four
        contiguous groups (IGVA's `[[1..6], [7..12], [13..18], [19..24]]` on CLIP-L).
    fuser_num_heads (`int`, defaults to 16):
        Heads of MMFuser's deformable attention; must divide the vision hidden size.
    fuser_num_points (`int`, defaults to 4):
        Sampling points per head and level of MMFuser's deformable attention.
    fuser_layer_norm_eps (`float`, defaults to 1e-6):
        Epsilon of MMFuser's layer norms.
    aggregator_hidden_size (`int`, defaults to 1024):
        Width of IGVA's aggregator.
    aggregator_num_layers (`int`, defaults to 4):
        Query-transformer blocks of IGVA's aggregator.
    aggregator_num_heads (`int`, defaults to 4):
        Attention heads of IGVA's aggregator; must divide `aggregator_hidden_size`.
    balance_loss_weight (`float`, defaults to 0.02):
        Weight of IGVA's balance loss (negative mean entropy of the group weights), added to the LM loss when
        `labels` are given. 0 disables it.
    instruction_encoder_config (`dict` or `PreTrainedConfig`, *optional*):
        Config of the text encoder that embeds the instruction for `igva` (any `AutoModel` text encoder, e.g. MPNet
        for all-mpnet-base-v2). Required for `igva`, ignored otherwise.
    instruction_pooling (`str`, defaults to `"mean"`):
        How the instruction encoder's last hidden state is pooled into the sentence embedding, as sentence-transformers'
        `Pooling` module does: `"mean"` (mean over the attention mask, all-mpnet-base-v2), `"cls"` (the first token)
        or `"max"` (channel-wise maximum over the attended tokens).
    instruction_embedding_normalize (`bool`, defaults to `True`):
        Whether the pooled instruction embedding is L2-normalised (sentence-transformers' `Normalize` module, as in
        all-mpnet-base-v2).

    Example:

    ```python
    >>> from hf_fusedvlm import FusedLlavaConfig, FusedLlavaForConditionalGeneration

    >>> config = FusedLlavaConfig(fuser_type="mmfuser")  # LLaVA-1.5-7B shapes with MMFuser on CLIP-L/336
    >>> config.fuser_layers
    [3, 8, 13, 18, 23]
    ```"""

    model_type = "fused_llava"
    sub_configs_defaults = {
        **LlavaConfig.sub_configs_defaults,
        "instruction_encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="mpnet", optional=True),
    }

    fuser_type: str = "mmfuser"
    fuser_layers: list[int] | None = None
    fuser_layer_groups: list[list[int]] | None = None
    fuser_num_heads: int = 16
    fuser_num_points: int = 4
    fuser_layer_norm_eps: float = 1e-6
    aggregator_hidden_size: int = 1024
    aggregator_num_layers: int = 4
    aggregator_num_heads: int = 4
    balance_loss_weight: float | int = 0.02
    instruction_encoder_config: dict | PreTrainedConfig | None = None
    instruction_pooling: str = "mean"
    instruction_embedding_normalize: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.fuser_type not in FUSER_TYPES:
            raise ValueError(
                f"Unknown fuser_type {self.fuser_type!r}: choose one of {', '.join(FUSER_TYPES)}."
            )
        if not isinstance(self.vision_feature_layer, int):
            raise ValueError(
                f"vision_feature_layer must be a single int (the base layer), got {self.vision_feature_layer!r}: "
                "to concatenate several layers use fuser_type='concat' with fuser_layers."
            )
        depth = self.vision_config.num_hidden_layers
        self._normalise_layer(self.vision_feature_layer, "vision_feature_layer")
        if self.fuser_layers is None:
            self.fuser_layers = default_fuser_layers(depth)
        if self.fuser_layer_groups is None:
            self.fuser_layer_groups = default_fuser_layer_groups(depth)
        self.fuser_layers = [self._normalise_layer(layer, "fuser_layers") for layer in self.fuser_layers]
        self.fuser_layer_groups = [
            [self._normalise_layer(layer, "fuser_layer_groups") for layer in group] for group in self.fuser_layer_groups
        ]
        self._validate_fuser()

    @property
    def base_layer(self) -> int:
        """`vision_feature_layer` as a non-negative hidden-state index."""
        return self.vision_feature_layer % (self.vision_config.num_hidden_layers + 1)

    @property
    def vision_layers_needed(self) -> list[int]:
        """The hidden-state indices the fuser reads, sorted; the vision tower is asked for these only."""
        if self.fuser_type in ("mmfuser", "concat"):
            layers = set(self.fuser_layers)
        elif self.fuser_type in ("igva", "average"):
            layers = {layer for group in self.fuser_layer_groups for layer in group} | {self.base_layer}
        else:
            layers = {self.base_layer}
        return sorted(layers)

    def _normalise_layer(self, layer, field: str) -> int:
        num_hidden_states = self.vision_config.num_hidden_layers + 1
        if not isinstance(layer, int) or isinstance(layer, bool) or not -num_hidden_states <= layer < num_hidden_states:
            raise ValueError(
                f"{field} holds {layer!r}, outside the vision tower's hidden states: with "
                f"{num_hidden_states - 1} layers valid indices are 0..{num_hidden_states - 1} "
                f"(or -{num_hidden_states}..-1 from the end)."
            )
        return layer % num_hidden_states

    def _validate_fuser(self):
        vision_size = self.vision_config.hidden_size
        if self.fuser_type in ("mmfuser", "concat"):
            if len(self.fuser_layers) < 2:
                raise ValueError(
                    f"fuser_type={self.fuser_type!r} needs at least two fuser_layers, got {self.fuser_layers}."
                )
            if len(set(self.fuser_layers)) != len(self.fuser_layers):
                raise ValueError(f"fuser_layers must not repeat a layer, got {self.fuser_layers}.")
        if self.fuser_type == "mmfuser":
            if self.fuser_layers[-1] != self.base_layer:
                raise ValueError(
                    f"mmfuser's query is the last of fuser_layers ({self.fuser_layers[-1]}) and must equal "
                    f"vision_feature_layer ({self.base_layer}): reorder fuser_layers or set vision_feature_layer."
                )
            if self.fuser_num_heads < 1 or vision_size % self.fuser_num_heads:
                raise ValueError(
                    f"fuser_num_heads={self.fuser_num_heads} must divide the vision hidden size {vision_size}."
                )
            if self.fuser_num_points < 1:
                raise ValueError(f"fuser_num_points must be at least 1, got {self.fuser_num_points}.")
        if self.fuser_type in ("igva", "average"):
            if not self.fuser_layer_groups or any(len(group) == 0 for group in self.fuser_layer_groups):
                raise ValueError(
                    f"fuser_layer_groups must be a non-empty list of non-empty groups, got {self.fuser_layer_groups}."
                )
        if self.fuser_type == "igva":
            if self.instruction_encoder_config is None:
                raise ValueError(
                    "fuser_type='igva' needs instruction_encoder_config (the config of the sentence encoder, e.g. "
                    "AutoConfig.from_pretrained('sentence-transformers/all-mpnet-base-v2'))."
                )
            if self.aggregator_num_heads < 1 or self.aggregator_hidden_size % self.aggregator_num_heads:
                raise ValueError(
                    f"aggregator_num_heads={self.aggregator_num_heads} must divide "
                    f"aggregator_hidden_size={self.aggregator_hidden_size}."
                )
            if self.aggregator_num_layers < 1:
                raise ValueError(f"aggregator_num_layers must be at least 1, got {self.aggregator_num_layers}.")
            if self.instruction_pooling not in INSTRUCTION_POOLINGS:
                raise ValueError(
                    f"Unknown instruction_pooling {self.instruction_pooling!r}: choose one of "
                    f"{', '.join(INSTRUCTION_POOLINGS)} (sentence-transformers' pooling_mode_mean_tokens, "
                    "pooling_mode_cls_token, pooling_mode_max_tokens)."
                )
        if self.balance_loss_weight < 0:
            raise ValueError(f"balance_loss_weight must be >= 0, got {self.balance_loss_weight}.")


__all__ = ["FusedLlavaConfig"]
