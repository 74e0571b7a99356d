"""Deformable-DETR's multi-scale deformable attention in pure PyTorch, as MMFuser uses it.

The sampling core is one `embedding_bag` over the value rows (see [`multi_scale_deformable_sampling`]); it computes
what `grid_sample` with bilinear interpolation, zeros padding and `align_corners=False` computes, in float32.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init


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


def init_deformable_attention(module: MultiScaleDeformableAttention, first_radius: int = 1) -> None:
    """Deformable-DETR's initialisation: zero offset weights, offset biases on a ring of growing radius per head,
    uniform attention over levels and points, Xavier value and output projections.

    Point p of every head starts `p + first_radius` pixels of its level from the reference, in the head's direction
    (Deformable DETR: `first_radius=1`, so no point starts on the reference; 0 puts every head's first point on it)."""
    init.constant_(module.sampling_offsets.weight, 0.0)
    init_sampling_offsets(module, first_radius)
    init.constant_(module.attention_weights.weight, 0.0)
    init.constant_(module.attention_weights.bias, 0.0)
    init.xavier_uniform_(module.value_proj.weight)
    init.constant_(module.value_proj.bias, 0.0)
    init.xavier_uniform_(module.output_proj.weight)
    init.constant_(module.output_proj.bias, 0.0)


def init_sampling_offsets(module: MultiScaleDeformableAttention, first_radius: int = 1) -> None:
    """The offset biases of [`init_deformable_attention`]: point p of head h at `p + first_radius` pixels in the
    direction `2 pi h / num_heads` (scaled so that its larger coordinate is whole)."""
    thetas = torch.arange(module.num_heads, dtype=torch.float32) * (2.0 * math.pi / module.num_heads)
    ring = torch.stack([thetas.cos(), thetas.sin()], -1)
    ring = (ring / ring.abs().max(-1, keepdim=True)[0]).view(module.num_heads, 1, 1, 2)
    ring = ring.repeat(1, module.num_levels, module.num_points, 1)
    radii = torch.arange(first_radius, module.num_points + first_radius, dtype=torch.float32)
    ring = ring * radii.view(1, 1, -1, 1)
    init.copy_(module.sampling_offsets.bias, ring.view(-1))


__all__ = [
    "MultiScaleDeformableAttention",
    "init_deformable_attention",
    "init_sampling_offsets",
    "multi_scale_deformable_sampling",
]
