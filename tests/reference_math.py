"""Independent float64 references of the two published fusers' math (DESIGN.md), written from the formulas with
explicit loops and gathers rather than the package's batched calls, to check the package against."""

import math

import torch


def bilinear_sample(feature_map: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample `feature_map (H, W, C)` at normalised points `x, y (...)` in [0, 1]: bilinear, zeros outside,
    `align_corners=False` (pixel centres at (i + 0.5) / size). Returns `(..., C)`."""
    height, width, channels = feature_map.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = torch.floor(px), torch.floor(py)
    result = torch.zeros(*x.shape, channels, dtype=feature_map.dtype)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - (px - xi).abs()) * (1 - (py - yi).abs())
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            xc, yc = xi.clamp(0, width - 1).long(), yi.clamp(0, height - 1).long()
            result += (weight * inside)[..., None] * feature_map[yc, xc]
    return result


def linear(x, layer):
    return x @ layer.weight.double().T + layer.bias.double()


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def deformable_attention(module, query, value_input, num_levels, side):
    """MSDeformAttn over `num_levels` square `side x side` levels. query `(Q, D)`, value_input `(L*side*side, D)`."""
    heads, points = module.num_heads, module.num_points
    num_queries, hidden = query.shape
    head_dim = hidden // heads
    value = linear(value_input, module.value_proj).view(num_levels, side, side, heads, head_dim)
    offsets = linear(query, module.sampling_offsets).view(num_queries, heads, num_levels, points, 2)
    logits = linear(query, module.attention_weights).view(num_queries, heads, num_levels * points)
    weights = torch.softmax(logits, -1).view(num_queries, heads, num_levels, points)
    index = torch.arange(num_queries, dtype=torch.float64)
    rows, cols = torch.div(index, side, rounding_mode="floor"), torch.remainder(index, side)
    ref_x, ref_y = (cols + 0.5) / side, (rows + 0.5) / side
    output = torch.zeros(num_queries, heads, head_dim, dtype=torch.float64)
    for head in range(heads):
        for level in range(num_levels):
            for point in range(points):
                x = ref_x + offsets[:, head, level, point, 0] / side
                y = ref_y + offsets[:, head, level, point, 1] / side
                sampled = bilinear_sample(value[level, :, :, head], x, y)
                output[:, head] += weights[:, head, level, point, None] * sampled
    return linear(output.reshape(num_queries, hidden), module.output_proj)


def mmfuser_reference(fuser, patch_states: list[torch.Tensor]) -> torch.Tensor:
    """MMFuser block for one image. `patch_states`: the selected layers' patch tokens `(P, D)`, query last."""
    *levels, query = [state.double() for state in patch_states]
    side = math.isqrt(query.shape[0])
    feat = layer_norm(torch.cat(levels), fuser.feat_norm)
    attn = deformable_attention(fuser.cross_attn, layer_norm(query, fuser.query_norm), feat, len(levels), side)
    attn1 = layer_norm(attn, fuser.norm1)
    attn = attn + fuser.gamma2.double() * deformable_attention(fuser.self_attn, attn1, attn1, 1, side)
    return query + fuser.gamma1.double() * attn


def multihead_attention(module, query, key_value):
    """nn.MultiheadAttention for one sample: query `(1, E)`, key_value `(K, E)`."""
    embed = query.shape[-1]
    heads = module.num_heads
    w_q, w_k, w_v = module.in_proj_weight.double().split(embed)
    b_q, b_k, b_v = module.in_proj_bias.double().split(embed)
    q = (query @ w_q.T + b_q).view(1, heads, -1).transpose(0, 1)
    k = (key_value @ w_k.T + b_k).view(-1, heads, embed // heads).transpose(0, 1)
    v = (key_value @ w_v.T + b_v).view(-1, heads, embed // heads).transpose(0, 1)
    attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(embed // heads), -1)
    return linear((attention @ v).transpose(0, 1).reshape(1, embed), module.out_proj)


def igva_reference(fuser, hidden_states, instruction_embed, groups, base_layer, has_cls=True):
    """IGVA for one image: returns (weights `(K,)`, projector input `(P, 2D)`). `hidden_states[i]`: `(T, D)`."""
    group_means = [torch.stack([hidden_states[layer].double() for layer in group]).mean(0) for group in groups]
    global_features = torch.stack([g[0] if has_cls else g.mean(0) for g in group_means])
    x = linear(instruction_embed.double()[None], fuser.sentence_proj)
    key_value = linear(global_features, fuser.cls_proj)
    for block in fuser.blocks:
        x = layer_norm(multihead_attention(block.cross_attention, x, key_value) + x, block.norm1)
        ffn = linear(torch.relu(linear(x, block.ffn[0])), block.ffn[2])
        x = layer_norm(ffn + x, block.norm2)
    weights = torch.softmax(linear(x, fuser.linear)[0], -1)
    start = 1 if has_cls else 0
    fused = sum(w * g[start:] for w, g in zip(weights, group_means))
    return weights, torch.cat([hidden_states[base_layer].double()[start:], fused], -1)


def gelu(x):
    """Exact (erf) GELU, `nn.GELU()`'s default, as LLaVA's mlp2x_gelu projector uses it."""
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def mlp_projector_reference(features, first, second):
    """LLaVA's mlp2x_gelu projector: `second(gelu(first(features)))` in float64."""
    return linear(gelu(linear(features.double(), first)), second)


class StateView:
    """The tensors under `prefix` of a state dict, addressed like the module that saved them (`view.ffn[0].weight`,
    `view.cross_attn.value_proj.bias`, `for block in view.transformers`), with fixed `attributes` (`num_heads`,
    `eps`, ...) that every sub-view inherits. It lets the references above read a checkpoint by its own key names."""

    def __init__(self, state_dict: dict, prefix: str = "", **attributes):
        self._state, self._prefix, self._attributes = state_dict, prefix, attributes

    def _child(self, name: str):
        key = self._prefix + name
        if key in self._state:
            return self._state[key]
        if any(other.startswith(key + ".") for other in self._state):
            return StateView(self._state, key + ".", **self._attributes)
        raise AttributeError(f"the state dict has no {key!r}")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._attributes:
            return self._attributes[name]
        return self._child(name)

    def __getitem__(self, index: int):
        return self._child(str(index))

    def __iter__(self):
        index = 0
        while any(key.startswith(f"{self._prefix}{index}.") for key in self._state):
            yield self[index]
            index += 1


def dense_connector_reference(hidden_states, variant: str, is_siglip: bool) -> torch.Tensor:
    """Dense Connector's projector input for one image, following the official `encode_images` and
    `dense_connector_dci` / `dense_connector_sci` step by step, with their hard-coded indices (CLIP-L: 24 layers;
    SigLIP-so400m: 27 layers, of which the official tower deletes the last).

    `hidden_states`: the hidden states of the tower as the official code runs it (SigLIP: without its last layer),
    each `(tokens, D)`. The main features are `hidden_states[-1]` on SigLIP (its tower reads its last layer) and
    `hidden_states[-2]` without the class token on CLIP (`mm_vision_select_layer = -2`, `patch`). Returns
    `(patches, 3 * D)` in float64."""
    start = 0 if is_siglip else 1  # `[:, :]` on SigLIP, `[:, 1:]` on CLIP
    main = hidden_states[-1] if is_siglip else hidden_states[-2][start:]
    if variant == "sci":
        added = [hidden_states[7][start:], hidden_states[15][start:]]
    else:
        count = 13 if is_siglip else 12
        added = []
        for first in (0, count):
            total = hidden_states[first][start:].double()
            for index in range(first + 1, first + count):
                total = total + hidden_states[index][start:].double()
            added.append(total / count)
    return torch.cat([main.double(), *[feature.double() for feature in added]], dim=-1)
