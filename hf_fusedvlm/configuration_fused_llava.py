"""FusedLlava model configuration."""

import difflib
import warnings

from huggingface_hub.dataclasses import strict
from transformers import CONFIG_MAPPING, AutoConfig, LlavaConfig, PreTrainedConfig


try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.20 declares sub-configs as a plain mapping and builds them in __post_init__
    SubConfigSpec = None

from .fusers import FUSERS, fuser_class


# The built-in fusers; `FUSERS` also holds any registered later.
FUSER_TYPES = tuple(FUSERS)
# How the instruction encoder's token states become one sentence embedding (sentence-transformers' pooling modes).
INSTRUCTION_POOLINGS = ("mean", "cls", "max")

# Vision towers whose hidden states have no class token: LLaVA's "default" strategy would drop a real patch.
TOWERS_WITHOUT_CLASS_TOKEN = ("siglip_vision_model", "siglip2_vision_model", "siglip", "siglip2")
# Prefixes of this config's own fields: an unknown keyword with one of them is most likely a misspelt field.
_FUSER_FIELD_PREFIXES = ("fuser_", "aggregator_", "instruction_", "balance_", "dense_connector_")

# Reference layouts for a 24-layer CLIP-L tower (hidden-state indices, 0 = embeddings).
_REFERENCE_DEPTH = 24
_REFERENCE_MMFUSER_LAYERS = (3, 8, 13, 18, 23)
_REFERENCE_NUM_GROUPS = 4
# all-mpnet-base-v2, IGVA's sentence encoder: the model type of an instruction encoder config that names none.
_INSTRUCTION_ENCODER_DEFAULT_TYPE = "mpnet"


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
        A registered fuser (`hf_fusedvlm.fusers.FUSERS`): `"mmfuser"`, `"igva"`, `"dense_connector"`, `"concat"`,
        `"average"`, `"none"`.
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
    dense_connector_type (`str`, defaults to `"dci"`):
        The Dense Connector variant of `dense_connector`: `"dci"` (the base layer with the means of the lower and the
        upper half of the tower's hidden states, as the released checkpoints) or `"sci"` (the base layer with hidden
        states 7 and 15). `"sti"`, which adds image tokens, is refused.
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
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            **LlavaConfig.sub_configs_defaults,
            "instruction_encoder_config": SubConfigSpec(
                config_class=AutoConfig, model_type=_INSTRUCTION_ENCODER_DEFAULT_TYPE, optional=True
            ),
        }
    else:
        sub_configs = {**LlavaConfig.sub_configs, "instruction_encoder_config": AutoConfig}

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
    dense_connector_type: str = "dci"
    instruction_encoder_config: dict | PreTrainedConfig | None = None
    instruction_pooling: str = "mean"
    instruction_embedding_normalize: bool = True

    def __post_init__(self, **kwargs):
        self._warn_misspelt_fields(kwargs)
        if SubConfigSpec is None and isinstance(self.instruction_encoder_config, dict):
            encoder_kwargs = dict(self.instruction_encoder_config)
            model_type = encoder_kwargs.pop("model_type", _INSTRUCTION_ENCODER_DEFAULT_TYPE)
            self.instruction_encoder_config = CONFIG_MAPPING[model_type](**encoder_kwargs)
        super().__post_init__(**kwargs)
        fuser = fuser_class(self.fuser_type)
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
        self._check_select_strategy()
        fuser.check_config(self)
        if fuser.reads_instruction:
            self._check_instruction_encoder()
        if self.balance_loss_weight < 0:
            raise ValueError(f"balance_loss_weight must be >= 0, got {self.balance_loss_weight}.")

    @property
    def base_layer(self) -> int:
        """`vision_feature_layer` as a non-negative hidden-state index."""
        return self.vision_feature_layer % (self.vision_config.num_hidden_layers + 1)

    @property
    def vision_layers_needed(self) -> list[int]:
        """The hidden-state indices the fuser reads, sorted; the vision tower is asked for these only."""
        return sorted(fuser_class(self.fuser_type).layers_read(self))

    def _warn_misspelt_fields(self, kwargs: dict) -> None:
        fields = [name for name in self.__dataclass_fields__ if name.startswith(_FUSER_FIELD_PREFIXES)]
        for key in kwargs:
            if key.startswith(_FUSER_FIELD_PREFIXES) and key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else f" Fuser fields: {', '.join(fields)}."
                warnings.warn(f"FusedLlavaConfig got an unknown keyword {key!r}, which no fuser reads.{hint}")

    def _normalise_layer(self, layer, field: str) -> int:
        num_hidden_states = self.vision_config.num_hidden_layers + 1
        if not isinstance(layer, int) or isinstance(layer, bool) or not -num_hidden_states <= layer < num_hidden_states:
            raise ValueError(
                f"{field} holds {layer!r}, outside the vision tower's hidden states: with "
                f"{num_hidden_states - 1} layers valid indices are 0..{num_hidden_states - 1} "
                f"(or -{num_hidden_states}..-1 from the end)."
            )
        return layer % num_hidden_states

    def _check_select_strategy(self):
        tower = self.vision_config.model_type
        if self.vision_feature_select_strategy == "default" and tower in TOWERS_WITHOUT_CLASS_TOKEN:
            raise ValueError(
                f"The {tower} vision tower has no class token, so vision_feature_select_strategy='default' would drop "
                "a real patch: set vision_feature_select_strategy='full'."
            )

    def _check_instruction_encoder(self):
        if self.instruction_encoder_config is None:
            raise ValueError(
                f"fuser_type={self.fuser_type!r} needs instruction_encoder_config (the config of the sentence encoder, "
                "e.g. AutoConfig.from_pretrained('sentence-transformers/all-mpnet-base-v2'))."
            )
        if self.instruction_pooling not in INSTRUCTION_POOLINGS:
            raise ValueError(
                f"Unknown instruction_pooling {self.instruction_pooling!r}: choose one of "
                f"{', '.join(INSTRUCTION_POOLINGS)} (sentence-transformers' pooling_mode_mean_tokens, "
                "pooling_mode_cls_token, pooling_mode_max_tokens)."
            )


__all__ = ["FusedLlavaConfig"]
