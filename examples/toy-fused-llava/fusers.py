"""Multi-layer visual feature fusers.

Every fuser is called the same way: `fuser(vision_hidden_states, instruction_embeds=None)` where
`vision_hidden_states` is the vision tower's `hidden_states` tuple (index 0 = embeddings; entries the fuser does not
read may be `None`), each entry of shape `(num_images, num_tokens, vision_hidden_size)`, and `instruction_embeds` is
`(num_images, instruction_hidden_size)` for fusers that read the instruction. It returns a [`FuserOutput`] whose
`features` of shape `(num_images, num_patches, fuser.output_size)` go to the multimodal projector.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

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


class Fuser(nn.Module):
    """Base class: splits the class token from the patch tokens the way the LLaVA config says."""

    def __init__(self, config: FusedLlavaConfig):
        super().__init__()
        # LLaVA's "default" strategy drops a leading CLS token; "full" keeps every token (towers without CLS).
        self.num_prefix_tokens = 1 if config.vision_feature_select_strategy == "default" else 0
        self.vision_hidden_size = config.vision_config.hidden_size

    def patches(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return hidden_state[:, self.num_prefix_tokens :]


class SingleLayerFuser(Fuser):
    """`none`: the base layer alone, i.e. plain LLaVA."""

    def __init__(self, config: FusedLlavaConfig):
        super().__init__(config)
        self.layer = config.base_layer
        self.output_size = self.vision_hidden_size

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        return FuserOutput(self.patches(vision_hidden_states[self.layer]))


class ConcatFuser(Fuser):
    """`concat`: channel concatenation of `fuser_layers`, in order."""

    def __init__(self, config: FusedLlavaConfig):
        super().__init__(config)
        self.layers = list(config.fuser_layers)
        self.output_size = self.vision_hidden_size * len(self.layers)

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        return FuserOutput(torch.cat([self.patches(vision_hidden_states[layer]) for layer in self.layers], dim=-1))


class AverageFuser(Fuser):
    """`average`: uniform mean of the layer groups' patch features, concatenated after the base layer."""

    def __init__(self, config: FusedLlavaConfig):
        super().__init__(config)
        self.base_layer = config.base_layer
        self.layer_groups = [list(group) for group in config.fuser_layer_groups]
        self.output_size = 2 * self.vision_hidden_size

    def group_means(self, vision_hidden_states) -> torch.Tensor:
        """Per group, the mean over its layers of the full sequence: `(num_images, num_groups, num_tokens, dim)`."""
        return torch.stack(
            [torch.stack([vision_hidden_states[layer] for layer in group]).mean(0) for group in self.layer_groups],
            dim=1,
        )

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


class QueryTransformerBlock(nn.Module):
    """IGVA's block: the instruction token attends to the group tokens; post-norm residuals; ReLU FFN."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.cross_attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        """query `(batch, 1, hidden)`, key_value `(batch, num_groups, hidden)` -> `(batch, 1, hidden)`."""
        attended, _ = self.cross_attention(query, key_value, key_value, need_weights=False)
        hidden = self.norm1(attended + query)
        return self.norm2(self.ffn(hidden) + hidden)


class IGVAFuser(AverageFuser):
    """`igva`: the instruction embedding and the groups' global features pick softmax weights over the groups."""

    def __init__(self, config: FusedLlavaConfig):
        super().__init__(config)
        hidden_size = config.aggregator_hidden_size
        self.sentence_proj = nn.Linear(config.instruction_encoder_config.hidden_size, hidden_size)
        self.cls_proj = nn.Linear(self.vision_hidden_size, hidden_size)
        self.blocks = nn.ModuleList(
            [QueryTransformerBlock(hidden_size, config.aggregator_num_heads) for _ in range(config.aggregator_num_layers)]
        )
        self.linear = nn.Linear(hidden_size, len(self.layer_groups))
        self.balance_loss_weight = config.balance_loss_weight

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
        output.balance_loss = self.balance_loss_weight * (weights * weights.clamp_min(1e-12).log()).sum(-1).mean()
        return output


def reference_points(height: int, width: int, device=None) -> torch.Tensor:
    """Normalised (x, y) centres of a `height x width` grid, row-major: `(height * width, 2)` in float32."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1)


def _axis_taps(coordinate: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear interpolation along one axis as `grid_sample` does it (`align_corners=False`: pixel centres at
    `(i + 0.5) / size`; zeros padding). coordinate `(..., num_levels, num_points)` in [0, 1]; size the levels' common
    size (an int) or their sizes `(num_levels, 1)`. Returns the lower neighbour's pixel index (float, no gradient) and
    the weights of the lower and the upper neighbour, each 0 where that neighbour falls outside its level."""
    pixel = coordinate * size - 0.5
    lower = pixel.detach().floor()
    upper_weight = pixel - lower
    lower_weight = (1 - upper_weight) * ((lower >= 0) & (lower <= size - 1))
    upper_weight = upper_weight * ((lower >= -1) & (lower <= size - 2))
    return lower, lower_weight, upper_weight


def bilinear_taps(
    locations: torch.Tensor, spatial_shapes: list[tuple[int, int]], index_dtype: torch.dtype = torch.int64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The four neighbours of every sampling point and their bilinear weights, as `grid_sample` reads them.

    Args:
        locations: `(..., num_levels, num_points, 2)`, (x, y) in [0, 1] of each level.
        spatial_shapes: `(H_l, W_l)` of each level; the levels are concatenated row-major in this order.
        index_dtype: integer dtype of the returned index.

    Returns:
        index `(..., num_levels, num_points, 4)`: rows of the concatenated levels, in the order top-left, top-right,
        bottom-left, bottom-right (clamped into range: a neighbour outside its level has weight 0), and the weights,
        of the same shape.
    """
    if len(set(spatial_shapes)) == 1:  # ViT layers share one grid: plain numbers broadcast fastest
        height, width = spatial_shapes[0]
        starts = torch.arange(len(spatial_shapes), device=locations.device).view(-1, 1) * (height * width)
    else:
        shapes = torch.tensor(spatial_shapes, device=locations.device, dtype=index_dtype).unsqueeze(1)  # (levels, 1, 2)
        height, width = shapes[..., 0], shapes[..., 1]
        starts = (height * width).cumsum(0) - height * width
    x_lower, left, right = _axis_taps(locations[..., 0], width)
    y_lower, top, bottom = _axis_taps(locations[..., 1], height)
    weights = torch.stack([top * left, top * right, bottom * left, bottom * right], -1)
    # Integer arithmetic in index_dtype: int32 halves the memory traffic where the rows fit.
    top_left = (y_lower * width + x_lower).to(index_dtype) + starts.to(index_dtype)
    index = torch.stack([top_left, top_left + 1, top_left + width, top_left + width + 1], -1)
    return index.clamp_(0, sum(h * w for h, w in spatial_shapes) - 1), weights


def multi_scale_deformable_sampling(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable-DETR's sampling core (bilinear, zero padding, `align_corners=False`).

    Every output row is a weighted sum of `4 * num_levels * num_points` value rows (the bilinear neighbours of each
    sampling point, weighted by attention x bilinear weight), which is exactly one `embedding_bag` call over the value
    rows: no sampled intermediate is materialised, and autograd reaches value, locations and weights.

    Args:
        value: `(batch, sum_l H_l * W_l, num_heads, head_dim)`, the levels concatenated in order.
        spatial_shapes: `(H_l, W_l)` of each level.
        sampling_locations: `(batch, num_queries, num_heads, num_levels, num_points, 2)`, (x, y) in [0, 1].
        attention_weights: `(batch, num_queries, num_heads, num_levels, num_points)`.

    Returns:
        `(batch, num_queries, num_heads * head_dim)`.
    """
    batch, num_values, num_heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    index_dtype = torch.int32 if value.numel() // head_dim < 2**31 else torch.int64
    index, tap_weights = bilinear_taps(sampling_locations, spatial_shapes, index_dtype)
    # One embedding row per (image, value position, head): value's own memory layout, so no copy.
    image = torch.arange(batch, device=value.device, dtype=index_dtype).view(batch, 1, 1, 1, 1, 1) * num_values
    head = torch.arange(num_heads, device=value.device, dtype=index_dtype).view(1, 1, num_heads, 1, 1, 1)
    rows = (index + image) * num_heads + head
    weights = tap_weights * attention_weights.unsqueeze(-1)
    num_bags = batch * num_queries * num_heads
    output = F.embedding_bag(
        rows.view(num_bags, -1),
        value.reshape(-1, head_dim),
        per_sample_weights=weights.reshape(num_bags, -1).to(value.dtype),
        mode="sum",
    )
    return output.view(batch, num_queries, num_heads * head_dim)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable-DETR's MSDeformAttn in pure PyTorch; the sampling runs in float32 whatever the weights' dtype."""

    def __init__(self, hidden_size: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(hidden_size, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(hidden_size, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(hidden_size, hidden_size)
        self.output_proj = nn.Linear(hidden_size, hidden_size)

    def sampling(
        self, query: torch.Tensor, reference: torch.Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each query samples and how much each sample counts, in float32.

        Args:
            query: `(batch, num_queries, hidden)`.
            reference: `(num_queries, 2)`, each query's (x, y) in [0, 1].
            spatial_shapes: `(H_l, W_l)` of each level.

        Returns:
            locations `(batch, num_queries, num_heads, num_levels, num_points, 2)`, (x, y) in [0, 1] of each level,
            and attention weights `(batch, num_queries, num_heads, num_levels, num_points)`, a softmax over levels and
            points per head.
        """
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2).float()
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points).float()
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        # Offsets are in pixels of each level: divide by (W, H).
        normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float32, device=query.device)
        locations = reference[None, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
        return locations, weights

    def forward(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """
        query `(batch, num_queries, hidden)`; reference `(num_queries, 2)` (x, y) in [0, 1];
        value_input `(batch, sum_l H_l * W_l, hidden)` -> `(batch, num_queries, hidden)`.
        """
        batch, _, hidden_size = value_input.shape
        locations, weights = self.sampling(query, reference, spatial_shapes)
        value = self.value_proj(value_input).view(batch, -1, self.num_heads, hidden_size // self.num_heads)
        output = multi_scale_deformable_sampling(value.float(), spatial_shapes, locations, weights)
        return self.output_proj(output.to(self.output_proj.weight.dtype))


class MMFuser(Fuser):
    """`mmfuser`: the deepest selected layer queries the shallower ones through deformable cross-attention, then
    deformable self-attention; layer-scale `gamma1`/`gamma2` start at 0 so the block starts as the identity."""

    def __init__(self, config: FusedLlavaConfig):
        super().__init__(config)
        hidden_size, eps = self.vision_hidden_size, config.fuser_layer_norm_eps
        self.layers = list(config.fuser_layers)
        self.output_size = hidden_size
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

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        *level_layers, query_layer = self.layers
        query = self.patches(vision_hidden_states[query_layer])
        side = math.isqrt(query.shape[1])
        if side * side != query.shape[1]:
            raise ValueError(
                f"mmfuser needs a square grid of patch tokens, got {query.shape[1]}: with a CLS token use "
                "vision_feature_select_strategy='default'."
            )
        grid = (side, side)
        levels = torch.cat([self.patches(vision_hidden_states[layer]) for layer in level_layers], dim=1)
        reference = reference_points(side, side, device=query.device)
        attended = self.cross_attn(self.query_norm(query), reference, self.feat_norm(levels), [grid] * len(level_layers))
        normed = self.norm1(attended)
        attended = attended + self.gamma2 * self.self_attn(normed, reference, normed, [grid])
        return FuserOutput(query + self.gamma1 * attended)


def init_fuser_weights(module: nn.Module) -> None:
    """Fuser-specific initialisation of one module (other modules keep the default Linear/LayerNorm init)."""
    if isinstance(module, MultiScaleDeformableAttention):
        # Deformable-DETR's initialisation: offsets start on a ring of growing radius per head.
        init.constant_(module.sampling_offsets.weight, 0.0)
        thetas = torch.arange(module.num_heads, dtype=torch.float32) * (2.0 * math.pi / module.num_heads)
        ring = torch.stack([thetas.cos(), thetas.sin()], -1)
        ring = (ring / ring.abs().max(-1, keepdim=True)[0]).view(module.num_heads, 1, 1, 2)
        ring = ring.repeat(1, module.num_levels, module.num_points, 1)
        ring = ring * torch.arange(1, module.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        init.copy_(module.sampling_offsets.bias, ring.view(-1))
        init.constant_(module.attention_weights.weight, 0.0)
        init.constant_(module.attention_weights.bias, 0.0)
        init.xavier_uniform_(module.value_proj.weight)
        init.constant_(module.value_proj.bias, 0.0)
        init.xavier_uniform_(module.output_proj.weight)
        init.constant_(module.output_proj.bias, 0.0)
    elif isinstance(module, MMFuser):
        # Layer scales at 0: a fresh MMFuser returns its query layer unchanged.
        init.zeros_(module.gamma1)
        init.zeros_(module.gamma2)


FUSER_CLASSES = {
    "mmfuser": MMFuser,
    "igva": IGVAFuser,
    "concat": ConcatFuser,
    "average": AverageFuser,
    "none": SingleLayerFuser,
}


def build_fuser(config: FusedLlavaConfig) -> Fuser:
    """The fuser of `config.fuser_type`, with default PyTorch init plus `init_fuser_weights` (gammas 0)."""
    fuser = FUSER_CLASSES[config.fuser_type](config)
    fuser.apply(init_fuser_weights)
    return fuser
