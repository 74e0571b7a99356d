"""`benchmarks/serving_flops.py` (the FLOP ratio `bench_vllm.py` prints) against counts made by hand on tiny shapes."""

import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import serving_flops as flops  # noqa: E402


VISION = dict(image_size=28, patch_size=14, hidden_size=8, intermediate_size=16)  # 4 patches
TEXT = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1)
TEXT["vocab_size"] = 10


def test_tower_by_hand():
    # patch embedding 2*4*(3*14*14)*8; per layer over 5 tokens: projections 4*2*5*8*8, attention 2*2*25*8,
    # MLP 2*2*5*8*16; two layers run
    assert flops.tower_flops(VISION, 2) == 2 * 4 * 588 * 8 + 2 * (2560 + 800 + 2560)


def test_prefill_and_decode_by_hand():
    # 4 prompt tokens, one layer: q k v o 4*2*4*8*8, gated MLP 3*2*4*8*16, causal attention 2*2*8*8, last logits 2*8*10
    assert flops.prefill_flops(TEXT, 4) == 2048 + 3072 + 256 + 160
    # 2 decode steps over 5 then 6 positions: linears 512 + 768 each, attention 4*5*8 and 4*6*8, logits 160 each
    assert flops.decode_flops(TEXT, 4, 3) == 2 * 1280 + 160 + 192 + 2 * 160
    assert flops.decode_flops(TEXT, 4, 1) == 0


def test_projector_by_hand():
    assert flops.projector_flops(VISION, TEXT, 8) == 2 * 4 * 8 * 8 + 2 * 4 * 8 * 8
    assert flops.projector_flops(VISION, TEXT, 40) == 2 * 4 * 40 * 8 + 2 * 4 * 8 * 8


def test_fusers_by_hand():
    assert flops.fuser_flops({"type": "none", "layers": [2]}, VISION) == 0
    assert flops.fuser_flops({"type": "concat", "layers": [1, 2]}, VISION) == 0
    # mmfuser, 2 heads, 1 point, 2 levels: cross attention 768 (offset and weight heads) + 1536 (value projection
    # over 8 tokens, output projection) + 640 (4 taps and the sum over 4 samples of 4 channels per query);
    # self attention 384 + 1024 + 320
    mmfuser = {"type": "mmfuser", "layers": [1, 2, 3], "num_heads": 2, "num_points": 1}
    assert flops.fuser_flops(mmfuser, VISION) == 768 + 1536 + 640 + 384 + 1024 + 320
    # average of groups [1, 2], [3, 4]: means 4*5*8, weighted sum 2*2*4*8
    average = {"type": "average", "layers": [1, 2, 3, 4], "groups": [[1, 2], [3, 4]]}
    assert flops.fuser_flops(average, VISION) == 160 + 128
    # igva adds a 1-layer, 4-wide encoder over 3 tokens (384 + 144 + 384), the sentence and group projections
    # (48 + 192), one aggregator block 6 wide (72 + 288 + 48 + 216) and the group logits (24)
    igva = dict(
        average,
        type="igva",
        aggregator_hidden=6,
        aggregator_layers=1,
        encoder=dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1),
    )
    assert flops.fuser_flops(igva, VISION, instruction_tokens=3) == 288 + 912 + 240 + 624 + 24
    with pytest.raises(ValueError, match="no FLOP count"):
        flops.fuser_flops({"type": "unknown", "layers": [1]}, VISION)


def test_request_total_and_ratio():
    plain = {"type": "none", "layers": [2], "output_size": 8}
    concat = {"type": "concat", "layers": [1, 2], "output_size": 16}
    parts = flops.request_flops(VISION, TEXT, plain, prompt_tokens=4, max_tokens=3)
    assert parts["total"] == sum(value for key, value in parts.items() if key != "total")
    wider = flops.request_flops(VISION, TEXT, concat, prompt_tokens=4, max_tokens=3)
    assert wider["total"] - parts["total"] == 2 * 4 * 8 * 8  # only the projector's first layer widens


def test_llava7b_tower_to_llm_ratio_and_matching_depth():
    from llava_shapes import CLIP_L_336, LLAMA_7B

    ratio = flops.tower_to_llm_ratio(CLIP_L_336, LLAMA_7B, 23, 640)
    assert 0.03 < ratio < 0.06
    text = dict(TEXT, hidden_size=64, intermediate_size=128)
    layers = flops.layers_for_ratio(VISION, text, 2, 16, ratio)
    matched = flops.tower_to_llm_ratio(VISION, dict(text, num_hidden_layers=layers), 2, 16)
    assert abs(matched - ratio) / ratio < 0.5 / layers + 0.01


def test_llava7b_ratio_shape_matches_llava_1_5_7b():
    """`bench_vllm.py --shape llava7b-ratio`: the Llama depth chosen over the benchmark's real prompt brings tower /
    LLM-prefill FLOPs to LLaVA-1.5-7B's within 5 % (the choice counts the logits at Llama-7B's vocabulary)."""
    import bench_vllm

    from llava_shapes import LLAMA_7B

    fields = bench_vllm.shape_text_fields("llava7b-ratio")
    model, processor = bench_vllm.build_model("none", "small", bench_vllm.SMALL_TEXT)
    prompt_tokens, _ = bench_vllm.prompt_lengths(model, processor)
    vision = bench_vllm.SMALL_VISION
    text = dict(fields, vocab_size=LLAMA_7B["vocab_size"])
    ratio = flops.tower_to_llm_ratio(vision, text, vision["num_hidden_layers"] - 1, prompt_tokens)
    assert fields["num_hidden_layers"] > bench_vllm.SMALL_TEXT["num_hidden_layers"]
    assert ratio == pytest.approx(bench_vllm.llava7b_tower_to_llm_ratio(), rel=0.05)
