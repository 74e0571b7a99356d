"""Analytic FLOP counts of one served LLaVA request, part by part, for `bench_vllm.py`'s FLOP ratio.

A multiply-add counts as 2 FLOPs. Counted: matrix products (linear layers, convolutions, attention scores and
values), the deformable sampling (bilinear taps) and the fusers' weighted sums; not counted: norms, activations,
softmaxes, residual adds (small beside the matrix products at every shape here). Attention in the language model is
causal: prefill scores cover half the square. The language model computes logits for the last prompt token and every
decoded token only (as vLLM does).

One function per part: `tower_flops`, `fuser_flops` (the instruction encoder included, for IGVA), `projector_flops`,
`prefill_flops`, `decode_flops`; `request_flops` adds them for one fused model config.
"""


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def encoder_layer_flops(tokens: int, hidden: int, intermediate: int) -> int:
    """One bidirectional transformer layer (CLIP, BERT): q, k, v, out projections, full attention, a 2-matrix MLP."""
    projections = 4 * linear_flops(tokens, hidden, hidden)
    attention = 2 * 2 * tokens * tokens * hidden  # scores and weighted values
    mlp = linear_flops(tokens, hidden, intermediate) + linear_flops(tokens, intermediate, hidden)
    return projections + attention + mlp


def tower_flops(vision: dict, layers_run: int) -> int:
    """The CLIP tower on one image, run to hidden-state index `layers_run` (the deepest layer read): patch embedding
    and `layers_run` encoder layers over the patches and the class token."""
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    hidden = vision["hidden_size"]
    embedding = linear_flops(patches, 3 * vision["patch_size"] ** 2, hidden)
    return embedding + layers_run * encoder_layer_flops(patches + 1, hidden, vision["intermediate_size"])


def deformable_attention_flops(queries: int, values: int, hidden: int, heads: int, levels: int, points: int) -> int:
    """Multi-scale deformable attention: value and output projections, the offset and weight heads, then per query,
    head, level and point 4 bilinear taps of `hidden / heads` channels and the weighted sum."""
    samples = heads * levels * points
    heads_flops = linear_flops(queries, hidden, 2 * samples) + linear_flops(queries, hidden, samples)
    projections = linear_flops(values, hidden, hidden) + linear_flops(queries, hidden, hidden)
    sampling = queries * samples * (hidden // heads) * (2 * 4 + 2)
    return heads_flops + projections + sampling


def fuser_flops(fuser: dict, vision: dict, instruction_tokens: int = 0) -> int:
    """The fuser on one image. `fuser` holds `type`, `layers` (the hidden-state indices read), and per type:
    `fuser_layers` (mmfuser: the query layer last), `groups` (average, igva), `num_heads`, `num_points` (mmfuser), `aggregator_hidden`, `aggregator_layers`,
    `encoder` (a dict: hidden_size, intermediate_size, num_hidden_layers) (igva)."""
    kind = fuser["type"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    hidden = vision["hidden_size"]
    if kind in ("none", "concat"):
        return 0  # a selection and a copy
    if kind == "mmfuser":
        levels = len(fuser.get("fuser_layers", fuser["layers"])) - 1
        heads, points = fuser["num_heads"], fuser["num_points"]
        cross = deformable_attention_flops(patches, levels * patches, hidden, heads, levels, points)
        return cross + deformable_attention_flops(patches, patches, hidden, heads, 1, points)
    if kind in ("average", "igva"):
        groups = fuser["groups"]
        # group means over the full sequence, then the weighted sum of the groups' patches
        flops = sum(len(group) for group in groups) * (patches + 1) * hidden + 2 * len(groups) * patches * hidden
        if kind == "average":
            return flops
        encoder, width = fuser["encoder"], fuser["aggregator_hidden"]
        flops += encoder["num_hidden_layers"] * encoder_layer_flops(
            instruction_tokens, encoder["hidden_size"], encoder["intermediate_size"]
        )
        flops += linear_flops(1, encoder["hidden_size"], width) + linear_flops(len(groups), hidden, width)
        block = (
            linear_flops(1, width, width)  # query projection
            + 2 * linear_flops(len(groups), width, width)  # key and value projections
            + 2 * 2 * len(groups) * width  # scores and weighted values of the one query
            + 3 * linear_flops(1, width, width)  # output projection and the 2-layer FFN
        )
        return flops + fuser["aggregator_layers"] * block + linear_flops(1, width, len(groups))
    raise ValueError(f"no FLOP count for fuser {kind!r}")


def projector_flops(vision: dict, text: dict, fuser_output_size: int) -> int:
    """LLaVA's two-layer MLP projector on one image's patches, reading the fuser's output channels."""
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return linear_flops(patches, fuser_output_size, text["hidden_size"]) + linear_flops(
        patches, text["hidden_size"], text["hidden_size"]
    )


def llama_layer_linear_flops(tokens: int, text: dict) -> int:
    hidden = text["hidden_size"]
    kv_hidden = hidden * text.get("num_key_value_heads", text["num_attention_heads"]) // text["num_attention_heads"]
    attention = 2 * linear_flops(tokens, hidden, hidden) + 2 * linear_flops(tokens, hidden, kv_hidden)
    return attention + 3 * linear_flops(tokens, hidden, text["intermediate_size"])  # gated MLP


def prefill_flops(text: dict, prompt_tokens: int) -> int:
    """Llama prefill of `prompt_tokens` (image and text): every layer's projections and causal attention, and the
    logits of the last token."""
    hidden = text["hidden_size"]
    attention = 2 * 2 * (prompt_tokens * prompt_tokens // 2) * hidden
    per_layer = llama_layer_linear_flops(prompt_tokens, text) + attention
    return text["num_hidden_layers"] * per_layer + linear_flops(1, hidden, text["vocab_size"])


def decode_flops(text: dict, prompt_tokens: int, max_tokens: int) -> int:
    """Decoding after the prefill: `max_tokens - 1` steps (the prefill gives the first token), step `i` attending over
    `prompt_tokens + i` positions."""
    hidden = text["hidden_size"]
    flops = 0
    for step in range(1, max_tokens):
        context = prompt_tokens + step
        per_layer = llama_layer_linear_flops(1, text) + 2 * 2 * context * hidden
        flops += text["num_hidden_layers"] * per_layer + linear_flops(1, hidden, text["vocab_size"])
    return flops


def request_flops(
    vision: dict, text: dict, fuser: dict, prompt_tokens: int, max_tokens: int, instruction_tokens: int = 0
) -> dict[str, int]:
    """FLOPs of one request, by part (`tower`, `fuser`, `projector`, `prefill`, `decode`) and in `total`. `fuser`
    also carries `output_size` (the projector's input width)."""
    parts = {
        "tower": tower_flops(vision, max(fuser["layers"])),
        "fuser": fuser_flops(fuser, vision, instruction_tokens),
        "projector": projector_flops(vision, text, fuser["output_size"]),
        "prefill": prefill_flops(text, prompt_tokens),
        "decode": decode_flops(text, prompt_tokens, max_tokens),
    }
    parts["total"] = sum(parts.values())
    return parts


def tower_to_llm_ratio(vision: dict, text: dict, layers_run: int, prompt_tokens: int) -> float:
    """The tower's FLOPs over the language model's prefill FLOPs, the quantity `--shape llava7b-ratio` matches."""
    return tower_flops(vision, layers_run) / prefill_flops(text, prompt_tokens)


def layers_for_ratio(vision: dict, text: dict, layers_run: int, prompt_tokens: int, target: float) -> int:
    """The number of language-model layers (of `text`'s width) that brings `tower_to_llm_ratio` closest to
    `target`."""
    per_layer = prefill_flops({**text, "num_hidden_layers": 1}, prompt_tokens) - linear_flops(
        1, text["hidden_size"], text["vocab_size"]
    )
    return max(1, round(tower_flops(vision, layers_run) / target / per_layer))
