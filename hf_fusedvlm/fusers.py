"""Multi-layer visual feature fusers and their registry.

Every fuser is called the same way: `fuser(vision_hidden_states, instruction_embeds=None)` where
`vision_hidden_states` is the vision tower's `hidden_states` tuple (index 0 = embeddings; entries the fuser does not
read may be `None`), each entry of shape `(num_images, num_tokens, vision_hidden_size)`, and `instruction_embeds` is
`(num_images, instruction_hidden_size)` for fusers that read the instruction. It returns a [`FuserOutput`] whose
`features` of shape `(num_images, num_patches, fuser.output_size)` go to the multimodal projector. A fuser that reads
a group of layers only through their mean (`FuserSpec.layer_means_read`) takes it from `Fuser.layer_mean`: the fusion
step passes a [`VisionHiddenStates`] that carries the means it added up while the tower ran (and not those layers);
given every hidden state instead, `layer_mean` computes the mean itself.

A fuser class describes itself to the rest of the package (configuration fields and checks, the layers the vision
tower records, the projector's width, parity conversion, converter options, model cards) as
`fuser_registry.FuserSpec` lists, and [`register_fuser`] adds it to [`FUSERS`], the one table every other part
reads. The built-in modules below subclass their descriptions in `fuser_registry` (which the configuration and the
processor read without importing torch) and replace them in the registry.
"""

import contextlib
import contextvars
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .deformable_attention import (
    MultiScaleDeformableAttention,
    init_deformable_attention,
    init_sampling_offsets,
    reference_points,
)
from .fuser_registry import (
    FUSERS,
    MMFUSER_OFFSET_INITS,
    AverageFuserSpec,
    ConcatFuserSpec,
    DenseConnectorSpec,
    FuserField,
    FuserSpec,
    IGVAFuserSpec,
    MMFuserSpec,
    SingleLayerFuserSpec,
    fuser_class,
    register_fuser,
)


if TYPE_CHECKING:
    from .configuration_fused_llava import FusedLlavaConfig


@dataclass
class FuserOutput:
    """
    features (`torch.Tensor` of shape `(num_images, num_patches, output_size)`):
        Fused visual features, the projector's input.
    fusion_weights (`torch.Tensor` of shape `(num_images, num_groups)`, *optional*):
        Weights over the layer groups (`igva`, and the uniform ones of `average`).
    balance_loss (`torch.Tensor` of shape `()`, *optional*):
        `balance_loss_weight * mean(sum_k w_k log w_k)`, the negative mean entropy of the weights (`igva`).
    """

    features: torch.Tensor
    fusion_weights: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


class VisionHiddenStates(tuple):
    """The vision tower's hidden states as the fusion step hands them to a fuser: a tuple indexed by hidden-state index
    (`None` for the layers not kept) that also carries `layer_means`, `{group: mean}` with `group` a tuple of
    hidden-state indices and `mean` `(num_images, num_tokens, vision_hidden_size)` the mean of those hidden states."""

    layer_means: dict[tuple[int, ...], torch.Tensor]

    def __new__(cls, states, layer_means: dict | None = None):
        hidden_states = super().__new__(cls, states)
        hidden_states.layer_means = dict(layer_means or {})
        return hidden_states

    def to(self, dtype: torch.dtype) -> "VisionHiddenStates":
        """A copy with every tensor, kept layers and means, cast to `dtype`."""
        means = {group: mean.to(dtype) for group, mean in self.layer_means.items()}
        return VisionHiddenStates((None if state is None else state.to(dtype) for state in self), means)


_ACTIVE_COLLECTOR = contextvars.ContextVar("hf_fusedvlm_hidden_state_collector", default=None)


class HiddenStateCollector:
    """What a fuser reads of a vision tower's hidden states, gathered while the tower runs (hidden state 0 is the
    input of its first layer, hidden state i the output of layer i): the layers in `kept`, whole, and for each group
    of `means` one running sum, turned into the group's mean once its last layer has passed; no other layer is held.
    The sums run in `dtype` (the fuser's; `None`: the hidden states' own), in float32 for half precision, and add
    the layers in the order the tower makes them: for groups of up to 17 ascending layers this is bit for bit
    `torch.stack(layers).mean(0)` on CPU (longer groups round differently, within 1e-6)."""

    def __init__(self, kept, means, dtype: torch.dtype | None = None):
        self.kept, self.dtype, self.count = set(kept), dtype, 0
        self.groups = [tuple(group) for group in means]
        self.states, self.sums, self.means = {}, {}, {}

    def add(self, state: torch.Tensor) -> None:
        index, self.count = self.count, self.count + 1
        if index in self.kept:
            self.states[index] = state
        if self.dtype is None:
            self.dtype = state.dtype
        for group in self.groups:
            for _ in range(group.count(index)):
                value = state.to(self.dtype)
                if group in self.sums:
                    self.sums[group].add_(value)
                else:  # float32 sums for half precision, as `mean` computes them
                    self.sums[group] = value.to(torch.promote_types(self.dtype, torch.float32), copy=True)
            if index == max(group):
                self.means[group] = self.sums.pop(group).div_(len(group)).to(self.dtype)

    def hidden_states(self) -> VisionHiddenStates:
        """The kept layers (indexed by hidden-state index, `None` elsewhere) and the groups' means."""
        if self.sums or len(self.means) < len(set(self.groups)) or any(i >= self.count for i in self.kept):
            raise RuntimeError(
                f"The vision tower made {self.count} hidden states, fewer than the fuser reads "
                f"(layers {sorted(self.kept)}, means of {self.groups})."
            )
        return VisionHiddenStates([self.states.get(i) for i in range(self.count)], self.means)


@contextlib.contextmanager
def collecting_hidden_states(layers: Sequence[nn.Module], kept, means, dtype: torch.dtype | None = None):
    """Within the block, a [`HiddenStateCollector`] gathers from the tower's encoder `layers` (forward hooks, active
    only in this context, so concurrent calls on the same model stay apart) the layers `kept` and the `means`."""
    collector = HiddenStateCollector(kept, means, dtype)

    def hook(module, args, kwargs, output):
        if _ACTIVE_COLLECTOR.get() is collector:
            if collector.count == 0:  # hidden state 0: the first layer's input
                collector.add(args[0] if args else kwargs["hidden_states"])
            collector.add(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    token = _ACTIVE_COLLECTOR.set(collector)
    try:
        yield collector
    finally:
        _ACTIVE_COLLECTOR.reset(token)
        for handle in handles:
            handle.remove()


class Fuser(FuserSpec, nn.Module):
    """Base class of the fuser modules: splits the class token from the patch tokens the way the LLaVA config says.

    A subclass states what `fuser_registry.FuserSpec` lists, defines `forward`, and, when PyTorch's default
    initialisation of its own parameters would break parity, `init_weights`.
    """

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__()
        # LLaVA's "default" strategy drops a leading CLS token; "full" keeps every token (towers without CLS).
        self.num_prefix_tokens = 1 if config.vision_feature_select_strategy == "default" else 0
        self.vision_hidden_size = config.vision_config.hidden_size
        self.output_size = self.vision_hidden_size * self.projector_slots(config)[1]

    def init_weights(self) -> None:
        """Fuser-specific initialisation of this module's own parameters (its submodules are initialised on their
        own); use `transformers.initialization`, which leaves loaded tensors untouched."""

    def patches(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return hidden_state[:, self.num_prefix_tokens :]

    @staticmethod
    def layer_mean(vision_hidden_states, group) -> torch.Tensor:
        """The mean over the hidden states of `group` (indices): the one `vision_hidden_states` carries when the
        fusion step added the group up while the tower ran, else computed from those hidden states."""
        mean = getattr(vision_hidden_states, "layer_means", {}).get(tuple(group))
        if mean is not None:
            return mean
        missing = [layer for layer in group if vision_hidden_states[layer] is None]
        if missing:
            raise ValueError(
                f"The fuser reads the mean of hidden states {list(group)}, but hidden states {missing} were not kept: "
                "list the group in the fuser's `layer_means_read` (or its layers in `layers_read`)."
            )
        return torch.stack([vision_hidden_states[layer] for layer in group]).mean(0)


@register_fuser("none")
class SingleLayerFuser(SingleLayerFuserSpec, Fuser):
    """`none`: the base layer alone, i.e. plain LLaVA."""

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        self.layer = config.base_layer

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        return FuserOutput(self.patches(vision_hidden_states[self.layer]))


@register_fuser("concat")
class ConcatFuser(ConcatFuserSpec, Fuser):
    """`concat`: channel concatenation of `fuser_layers`, in order."""

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        self.layers = list(config.fuser_layers)

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        return FuserOutput(torch.cat([self.patches(vision_hidden_states[layer]) for layer in self.layers], dim=-1))


@register_fuser("average")
class AverageFuser(AverageFuserSpec, Fuser):
    """`average`: uniform mean of the layer groups' patch features, concatenated after the base layer."""

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        self.base_layer = config.base_layer
        self.layer_groups = [list(group) for group in config.fuser_layer_groups]

    def group_means(self, vision_hidden_states) -> torch.Tensor:
        """Per group, the mean over its layers of the full sequence: `(num_images, num_groups, num_tokens, dim)`."""
        return torch.stack([self.layer_mean(vision_hidden_states, group) for group in self.layer_groups], dim=1)

    def group_weights(self, groups: torch.Tensor, instruction_embeds) -> torch.Tensor:
        num_images, num_groups = groups.shape[:2]
        return groups.new_full((num_images, num_groups), 1.0 / num_groups)

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        groups = self.group_means(vision_hidden_states)
        weights = self.group_weights(groups, instruction_embeds)
        group_patches = groups[:, :, self.num_prefix_tokens :]
        fused = torch.einsum("bk,bkpd->bpd", weights.to(group_patches.dtype), group_patches)
        base = self.patches(vision_hidden_states[self.base_layer])
        return FuserOutput(torch.cat([base, fused], dim=-1), fusion_weights=weights)


class GroupCrossAttention(nn.Module):
    """Multi-head cross-attention with `nn.MultiheadAttention`'s parameters and math (packed `in_proj_weight` /
    `in_proj_bias`, `out_proj`), so official IGVA weights load unchanged and give the same results.

    Written out because `nn.MultiheadAttention` reads `out_proj.weight` directly, which breaks under runtimes that
    replace linear layers (vLLM packs them and empties `.weight` on CPU): here `out_proj` is only ever called.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _reset_parameters(self) -> None:
        """`nn.MultiheadAttention`'s own initialisation (same name, so code that resets modules treats both alike)."""
        init.xavier_uniform_(self.in_proj_weight)
        init.zeros_(self.in_proj_bias)
        init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        """query `(batch, num_queries, hidden)`, key_value `(batch, num_keys, hidden)` -> `(batch, num_queries, hidden)`."""
        batch, num_queries, hidden = query.shape
        weight_q, weight_k, weight_v = self.in_proj_weight.chunk(3)
        bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)

        def heads(states: torch.Tensor) -> torch.Tensor:
            return states.view(batch, -1, self.num_heads, hidden // self.num_heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(F.linear(query, weight_q, bias_q)),
            heads(F.linear(key_value, weight_k, bias_k)),
            heads(F.linear(key_value, weight_v, bias_v)),
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, num_queries, hidden))


class QueryTransformerBlock(nn.Module):
    """IGVA's block: the instruction token attends to the group tokens; post-norm residuals; ReLU FFN."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.cross_attention = GroupCrossAttention(hidden_size, num_heads)
        self.ffn = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        """query `(batch, 1, hidden)`, key_value `(batch, num_groups, hidden)` -> `(batch, 1, hidden)`."""
        attended = self.cross_attention(query, key_value)
        hidden = self.norm1(attended + query)
        return self.norm2(self.ffn(hidden) + hidden)


@register_fuser("igva")
class IGVAFuser(IGVAFuserSpec, AverageFuser):
    """`igva`: the instruction embedding and the groups' global features pick softmax weights over the groups."""

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        hidden_size = config.aggregator_hidden_size
        self.sentence_proj = nn.Linear(config.instruction_encoder_config.hidden_size, hidden_size)
        self.cls_proj = nn.Linear(self.vision_hidden_size, hidden_size)
        self.blocks = nn.ModuleList(
            [
                QueryTransformerBlock(hidden_size, config.aggregator_num_heads)
                for _ in range(config.aggregator_num_layers)
            ]
        )
        self.linear = nn.Linear(hidden_size, len(self.layer_groups))
        self.balance_loss_weight = config.balance_loss_weight
        self.balance_loss_type = config.balance_loss_type

    def group_weights(self, groups: torch.Tensor, instruction_embeds) -> torch.Tensor:
        if instruction_embeds is None:
            raise ValueError(
                "The igva fuser needs instruction embeddings: pass instruction_input_ids (and "
                "instruction_attention_mask), as FusedLlavaProcessor produces them."
            )
        # Towers without a CLS token (SigLIP) use the mean patch feature as the group's global feature.
        global_features = groups[:, :, 0] if self.num_prefix_tokens else groups.mean(2)
        key_value = self.cls_proj(global_features)
        query = self.sentence_proj(instruction_embeds.to(self.sentence_proj.weight.dtype)).unsqueeze(1)
        for block in self.blocks:
            query = block(query, key_value)
        return self.linear(query.squeeze(1)).softmax(-1)

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        output = super().forward(vision_hidden_states, instruction_embeds)
        weights = output.fusion_weights
        if self.balance_loss_type == "batch_entropy":
            weights = weights.mean(0, keepdim=True)  # the entropy of the batch's mean weights
        output.balance_loss = self.balance_loss_weight * (weights * weights.clamp_min(1e-12).log()).sum(-1).mean()
        return output


@register_fuser("mmfuser")
class MMFuser(MMFuserSpec, Fuser):
    """`mmfuser`: the deepest selected layer queries the shallower ones through deformable cross-attention, then
    deformable self-attention; layer-scale `gamma1`/`gamma2` start at 0 so the block starts as the identity."""

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        hidden_size, eps = self.vision_hidden_size, config.fuser_layer_norm_eps
        self.layers = list(config.fuser_layers)
        num_levels = len(self.layers) - 1
        self.cross_attn = MultiScaleDeformableAttention(
            hidden_size, config.fuser_num_heads, num_levels, config.fuser_num_points
        )
        self.query_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.feat_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.gamma1 = nn.Parameter(torch.zeros(hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = MultiScaleDeformableAttention(hidden_size, config.fuser_num_heads, 1, config.fuser_num_points)
        self.gamma2 = nn.Parameter(torch.zeros(hidden_size))
        self.offset_init = config.fuser_offset_init

    def init_weights(self) -> None:
        # Layer scales at 0: a fresh MMFuser returns its query layer unchanged.
        init.zeros_(self.gamma1)
        init.zeros_(self.gamma2)
        # Runs after the deformable attentions' own (Deformable DETR's) initialisation: moves their starting points.
        first_radius = MMFUSER_OFFSET_INITS[self.offset_init]
        if first_radius != MMFUSER_OFFSET_INITS["deformable_detr"]:
            init_sampling_offsets(self.cross_attn, first_radius)
            init_sampling_offsets(self.self_attn, first_radius)

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        *level_layers, query_layer = self.layers
        query = self.patches(vision_hidden_states[query_layer])
        side = math.isqrt(query.shape[1])
        if side * side != query.shape[1]:
            raise ValueError(
                f"mmfuser needs a square grid of patch tokens, got {query.shape[1]} tokens per image: with a CLS token "
                "use vision_feature_select_strategy='default', without one 'full'."
            )
        grid = (side, side)
        levels = torch.cat([self.patches(vision_hidden_states[layer]) for layer in level_layers], dim=1)
        reference = reference_points(side, side, device=query.device)
        attended = self.cross_attn(
            self.query_norm(query), reference, self.feat_norm(levels), [grid] * len(level_layers)
        )
        normed = self.norm1(attended)
        attended = attended + self.gamma2 * self.self_attn(normed, reference, normed, [grid])
        return FuserOutput(query + self.gamma1 * attended)


@register_fuser("dense_connector")
class DenseConnectorFuser(DenseConnectorSpec, Fuser):
    """`dense_connector`: the base layer's patch features concatenated on channels with the means of the
    `dense_layer_groups` (one hidden state each for `sci`). No weights."""

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        self.base_layer = config.base_layer
        self.layer_groups = self.dense_layer_groups(config)

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        added = [self.patches(self.layer_mean(vision_hidden_states, group)) for group in self.layer_groups]
        return FuserOutput(torch.cat([self.patches(vision_hidden_states[self.base_layer]), *added], dim=-1))


def init_fuser_weights(module: nn.Module) -> None:
    """Fuser-specific initialisation of one module (other modules keep the default Linear/LayerNorm init)."""
    if isinstance(module, MultiScaleDeformableAttention):
        init_deformable_attention(module)
    elif isinstance(module, GroupCrossAttention):
        module._reset_parameters()
    elif isinstance(module, Fuser):
        module.init_weights()


def build_fuser(config: "FusedLlavaConfig") -> Fuser:
    """The fuser of `config.fuser_type`, with default PyTorch init plus `init_fuser_weights` (gammas 0)."""
    module_class = fuser_class(config.fuser_type)
    if not issubclass(module_class, Fuser):
        raise ValueError(
            f"fuser_type {config.fuser_type!r} is registered as {module_class.__name__}, a description without a "
            "module: register a subclass of hf_fusedvlm.fusers.Fuser under that name."
        )
    fuser = module_class(config)
    fuser.apply(init_fuser_weights)
    return fuser


# The registry's names are part of this module's interface: fusers defined elsewhere (also in a checkpoint's remote
# code, which has no hf_fusedvlm package) import them from here.
__all__ = [
    "FUSERS",
    "Fuser",
    "FuserField",
    "FuserOutput",
    "FuserSpec",
    "VisionHiddenStates",
    "build_fuser",
    "collecting_hidden_states",
    "fuser_class",
    "init_fuser_weights",
    "register_fuser",
]
