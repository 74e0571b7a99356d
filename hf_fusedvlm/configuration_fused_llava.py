"""FusedLlava model configuration."""

import dataclasses
import difflib
import functools
import warnings

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import CONFIG_MAPPING, AutoConfig, LlavaConfig, PreTrainedConfig


try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.20 declares sub-configs as a plain mapping and builds them in __post_init__
    SubConfigSpec = None

from .fuser_registry import fuser_class, fuser_fields


# The fuser of a config that names none and whose vision_feature_layer is one layer.
DEFAULT_FUSER_TYPE = "mmfuser"
# The fuser LLaVA's list-valued vision_feature_layer (its layers concatenated on channels) maps to, and the fusers that
# a list may be combined with: `none` means plain LLaVA, whose list is exactly that concatenation.
LIST_FUSER_TYPE = "concat"
LIST_COMPATIBLE_FUSER_TYPES = ("none", LIST_FUSER_TYPE)
# How the instruction encoder's token states become one sentence embedding (sentence-transformers' pooling modes).
INSTRUCTION_POOLINGS = ("mean", "cls", "max")

# Vision towers whose hidden states have no class token: LLaVA's "default" strategy would drop a real patch.
TOWERS_WITHOUT_CLASS_TOKEN = ("siglip_vision_model", "siglip2_vision_model", "siglip", "siglip2")

# Reference layouts for a 24-layer CLIP-L tower (hidden-state indices, 0 = embeddings).
_REFERENCE_DEPTH = 24
_REFERENCE_MMFUSER_LAYERS = (3, 8, 13, 18, 23)
_REFERENCE_NUM_GROUPS = 4
# all-mpnet-base-v2, IGVA's sentence encoder: the model type of an instruction encoder config that names none.
_INSTRUCTION_ENCODER_DEFAULT_TYPE = "mpnet"


@functools.cache
def _keys_every_config_writes() -> frozenset[str]:
    """The keys transformers writes into every config.json (`_name_or_path`, `dtype`, ...)."""
    return frozenset(PreTrainedConfig().to_dict())


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

        As in LLaVA, `vision_feature_layer` may also be a list of layers, concatenated on channels in that order: that is
        the `concat` fuser over those layers, so the config sets `fuser_type="concat"` and `fuser_layers` to them (when
        the config is built, and when a list is assigned later). It is kept as given; a one-layer list is that layer.
        A list cannot be combined with the fusers other than `none` and `concat`, nor with other `fuser_layers`.

        fuser_type (`str`, *optional*):
            A registered fuser (`hf_fusedvlm.fusers.FUSERS`): `"mmfuser"`, `"igva"`, `"dense_connector"`, `"concat"`,
            `"average"`, `"none"`. Defaults to `"mmfuser"`, or `"concat"` when `vision_feature_layer` lists several layers.
        fuser_layers (`list[int]`, *optional*):
            Layers fused by `mmfuser` (the last one is the query, so it must equal `vision_feature_layer`) and `concat`
            (concatenated along channels in this order). Defaults to MMFuser's CLIP-L layers 3, 8, 13, 18, 23 scaled to the
            tower's depth.
        fuser_layer_groups (`list[list[int]]`, *optional*):
            Groups of layers averaged by `igva` and `average`. Defaults to the tower's layers 1..L split into four
            contiguous groups (IGVA's `[[1..6], [7..12], [13..18], [19..24]]` on CLIP-L).
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

        Each registered fuser adds the fields of its class's `config_fields` ([`~fuser_registry.FuserField`]); every
        config carries those of all registered fusers, with their defaults unless given. The built-in ones:

    FUSER_FIELDS_DOC
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

    fuser_type: str | None = None
    fuser_layers: list[int] | None = None
    fuser_layer_groups: list[list[int]] | None = None
    instruction_encoder_config: dict | PreTrainedConfig | None = None
    instruction_pooling: str = "mean"
    instruction_embedding_normalize: bool = True

    def __post_init__(self, **kwargs):
        self._warn_misspelt_fields(kwargs)
        for name, field in fuser_fields().items():
            setattr(self, name, kwargs.pop(name, field.default))
        if SubConfigSpec is None and isinstance(self.instruction_encoder_config, dict):
            encoder_kwargs = dict(self.instruction_encoder_config)
            model_type = encoder_kwargs.pop("model_type", _INSTRUCTION_ENCODER_DEFAULT_TYPE)
            self.instruction_encoder_config = CONFIG_MAPPING[model_type](**encoder_kwargs)
        super().__post_init__(**kwargs)
        fuser_layers_given = self.fuser_layers is not None
        if self.fuser_type is None:
            several_layers = isinstance(self.vision_feature_layer, list) and len(self.vision_feature_layer) > 1
            self.fuser_type = LIST_FUSER_TYPE if several_layers else DEFAULT_FUSER_TYPE
        fuser_class(self.fuser_type)  # an unknown fuser_type is reported first
        self._map_layer_list(keep_fuser_layers=fuser_layers_given)
        fuser = fuser_class(self.fuser_type)
        depth = self.vision_config.num_hidden_layers
        if self.fuser_layers is None:
            self.fuser_layers = default_fuser_layers(depth)
        if self.fuser_layer_groups is None:
            self.fuser_layer_groups = default_fuser_layer_groups(depth)
        self.fuser_layers = [self._normalise_layer(layer, "fuser_layers") for layer in self.fuser_layers]
        self.fuser_layer_groups = [
            [self._normalise_layer(layer, "fuser_layer_groups") for layer in group] for group in self.fuser_layer_groups
        ]
        for number, group in enumerate(self.fuser_layer_groups, start=1):
            repeated = sorted({layer for layer in group if group.count(layer) > 1})
            if repeated:
                raise ValueError(
                    f"fuser_layer_groups group {number} {group} repeats hidden state(s) {repeated} (after negative "
                    "indices are counted from the end), which would weigh them more in the group's mean: list each "
                    "layer of a group once."
                )
        self._check_select_strategy()
        fuser.check_config(self)
        if fuser.reads_instruction:
            self._check_instruction_encoder()
        for name, field in fuser_fields().items():
            field.check_value(name, getattr(self, name))

    def __eq__(self, other):
        # The dataclass comparison this replaces covers the declared fields only; the fusers' fields count as well.
        if other.__class__ is not self.__class__:
            return NotImplemented
        names = [field.name for field in dataclasses.fields(self) if field.compare] + list(fuser_fields())
        return all(getattr(self, name, None) == getattr(other, name, None) for name in names)

    def __setattr__(self, key, value):
        # The fusers' fields are no dataclass fields (fusers registered after this class exists add theirs), so they
        # get the type check `@strict` gives the declared ones here.
        field = fuser_fields().get(key)
        if field is not None:
            try:
                field.check_type(key, value)
            except TypeError as error:
                raise StrictDataclassFieldValidationError(field=key, cause=error) from error
        # A list assigned to a built config keeps LLaVA's meaning (those layers concatenated); a refused one leaves the
        # config as it was. While `__init__` sets vision_feature_layer the fuser fields are not set yet:
        # `__post_init__` maps the list then.
        if key != "vision_feature_layer" or not isinstance(value, list) or "fuser_layers" not in vars(self):
            return super().__setattr__(key, value)
        previous = {name: getattr(self, name) for name in ("vision_feature_layer", "fuser_type", "fuser_layers")}
        super().__setattr__(key, value)
        try:
            self._map_layer_list(keep_fuser_layers=False)
            fuser_class(self.fuser_type).check_config(self)
        except ValueError:
            vars(self).update(previous)
            raise

    def _map_layer_list(self, keep_fuser_layers: bool) -> None:
        """A list-valued `vision_feature_layer` as the `concat` fuser over its layers (a one-layer list as that layer);
        `keep_fuser_layers`: `fuser_layers` were given, and must then name the same layers."""
        layers = self.vision_feature_layer
        if not isinstance(layers, list):
            return
        if len(layers) == 1:
            self.vision_feature_layer = layers[0]
            return
        if self.fuser_type not in LIST_COMPATIBLE_FUSER_TYPES:
            raise ValueError(
                f"vision_feature_layer={layers!r} lists several layers, which LLaVA concatenates (the "
                f"{LIST_FUSER_TYPE!r} fuser), but fuser_type={self.fuser_type!r} reads one base layer: set "
                "vision_feature_layer to that layer (an int) and the layers to fuse in fuser_layers."
            )
        normalised = self.normalised_feature_layer(layers)
        if keep_fuser_layers and self.fuser_type == LIST_FUSER_TYPE:
            fuser_layers = [self._normalise_layer(layer, "fuser_layers") for layer in self.fuser_layers]
            if fuser_layers != normalised:
                raise ValueError(
                    f"vision_feature_layer={layers!r} and fuser_layers={self.fuser_layers!r} name different layers "
                    f"for the {LIST_FUSER_TYPE!r} fuser: give the layers once, in fuser_layers."
                )
        self.fuser_type, self.fuser_layers = LIST_FUSER_TYPE, normalised

    def normalised_feature_layer(self, layer: int | list[int]) -> int | list[int]:
        """A `vision_feature_layer` value (the config's or a call's) as non-negative hidden-state indices; a one-layer
        list is that layer, as in LLaVA."""
        if isinstance(layer, list):
            normalised = [self._normalise_layer(index, "vision_feature_layer") for index in layer]
            return normalised[0] if len(normalised) == 1 else normalised
        return self._normalise_layer(layer, "vision_feature_layer")

    @property
    def base_layer(self) -> int:
        """`vision_feature_layer` as a non-negative hidden-state index; the last listed layer when it lists several."""
        layers = self.normalised_feature_layer(self.vision_feature_layer)
        return layers[-1] if isinstance(layers, list) else layers

    @property
    def vision_layers_needed(self) -> list[int]:
        """Every hidden-state index the fuser reads (alone or through a group's mean), sorted; the vision tower need
        not run past the last one."""
        groups = self.vision_layer_means
        return sorted(set(self.vision_layers_kept).union(*groups))

    @property
    def vision_layers_kept(self) -> list[int]:
        """The hidden-state indices the fuser reads one by one, sorted: the fusion step keeps these layers whole."""
        return sorted(fuser_class(self.fuser_type).layers_read(self))

    @property
    def vision_layer_means(self) -> list[list[int]]:
        """The groups of hidden-state indices the fuser reads only through their mean: the fusion step adds each group
        up while the vision tower runs instead of keeping its layers."""
        return [list(group) for group in fuser_class(self.fuser_type).layer_means_read(self)]

    @classmethod
    def fuser_field_names(cls) -> list[str]:
        """This config's own fields beyond [`LlavaConfig`]'s, then the registered fusers' fields."""
        own = [name for name in cls.__dataclass_fields__ if name not in LlavaConfig.__dataclass_fields__]
        return own + list(fuser_fields())

    def _warn_misspelt_fields(self, kwargs: dict) -> None:
        """Refuse an unknown keyword that is a near miss of one of this config's fields (`fusertype`,
        `vision_feature_layers`): ignored, it would leave the model built with the default. Other unknown keywords
        are kept, as transformers keeps them (a config may carry keys of its own); one that starts like a fuser field
        (`fuser_`, `instruction_`, ...) but resembles none gets a warning."""
        own = FusedLlavaConfig.fuser_field_names()
        known = set(own) | set(self.__dataclass_fields__) | set(self.attribute_map) | _keys_every_config_writes()
        # This config's fields beyond those every config has (which transformers writes and reads itself): LLaVA's,
        # the fuser's and a subclass's own (LLaVA-NeXT's `image_grid_pinpoints`).
        fields = own + [
            name
            for name in self.__dataclass_fields__
            if name not in PreTrainedConfig.__dataclass_fields__ and name not in own and not name.startswith("_")
        ]
        prefixes = tuple({name.split("_", 1)[0] + "_" for name in own})
        for key in kwargs:
            if key in known:
                continue
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.85)
            if close:
                raise ValueError(
                    f"{type(self).__name__} got an unknown keyword {key!r}, which would be ignored: did you mean "
                    f"{close[0]!r}? Rename it (in config.json too, if it comes from there)."
                )
            if key.startswith(prefixes):
                warnings.warn(
                    f"{type(self).__name__} got an unknown keyword {key!r}, which no fuser reads. Fuser fields: "
                    f"{', '.join(own)}.",
                    stacklevel=2,
                )

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


def _fields_doc() -> str:
    """The docstring entries of the registered fusers' fields, in the style of the config's own."""
    entries = []
    for name, field in fuser_fields().items():
        types = field.type if isinstance(field.type, tuple) else (field.type,)
        entries.append(
            f"    {name} (`{' | '.join(accepted.__name__ for accepted in types)}`, defaults to {field.default!r}):\n"
            f"        {field.help}\n"
        )
    return "".join(entries)


FusedLlavaConfig.__doc__ = FusedLlavaConfig.__doc__.replace("FUSER_FIELDS_DOC\n", _fields_doc() + "\n")


__all__ = ["FusedLlavaConfig"]
