"""Smoke test of the benchmark scripts: each runs with --quick, prints its table with ratios and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FUSER_TYPES, REPO_ROOT


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# script -> (what its table prints, the JSON's top-level keys, extra arguments given a temporary folder)
CASES = {
    "bench_fuser.py": (
        ["| deformable sampling core | ms | vs per-level |", "share of vision tower", "LLaVA-7B prefill"],
        {"sampling_core_s", "fuser_overhead", "prefill_parts", "prefill_estimate_s", "ratios", "goals"},
        lambda tmp: [],
    ),
    "bench_decode.py": (
        ["| shape | precision |", "decode ratio", "32 LLM layers (meta)"],
        {"fuser", "results", "full_depth_footprint_bytes"},
        lambda tmp: [],
    ),
    "bench_llava_next.py": (
        ["| variant | median s | ratio to plain | peak RSS rise (MiB) | ratio to plain |", "| mmfuser |"],
        {"seconds", "time_ratio", "peak_rss_rise_bytes", "image_tokens"},
        lambda tmp: [],
    ),
    "bench_conversion.py": (
        ["| step    | median wall (s) | ratio to copy |", "goal wall <= 1.5 x copy"],
        {"checkpoint", "summary", "wall_ratio", "goals"},
        lambda tmp: ["--workdir", str(tmp / "work")],
    ),
}


@pytest.mark.parametrize("script", list(CASES))
def test_benchmark_quick_mode_prints_ratios_and_writes_json(script, tmp_path):
    if script == "bench_decode.py":
        pytest.importorskip("bitsandbytes", reason="the quantization extra is not installed")
    printed, keys, extra = CASES[script]
    json_path = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--json", str(json_path), *extra(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    for text in printed:
        assert text in completed.stdout, f"{text!r} not in:\n{completed.stdout}"
    results = json.loads(json_path.read_text())
    assert keys <= results.keys()
    if script == "bench_fuser.py":
        assert set(results["ratios"]["fuser_share_of_tower"]) == set(FUSER_TYPES) - {"none"}
        assert results["ratios"]["sampling_core_vs_per_level"] > 0
    elif script == "bench_decode.py":
        precisions = results["results"]["tiny"]["precisions"]
        assert set(precisions) == {"4bit", "fp32"}
        assert all(entry["decode_ratio"] > 0 and entry["first_token_ratio"] > 0 for entry in precisions.values())
        full = results["full_depth_footprint_bytes"]
        assert full["4bit"]["fused"] > full["4bit"]["plain"] and full["fp32"]["plain"] > 6 * full["4bit"]["plain"]
    elif script == "bench_llava_next.py":
        assert set(results["time_ratio"]) == {"plain", *FUSER_TYPES} and results["time_ratio"]["plain"] == 1
        assert all(rise > 0 for rise in results["peak_rss_rise_bytes"].values())
    else:
        assert results["wall_ratio"] > 0 and results["summary"]["convert"]["max_peak_rss_bytes"] > 0


def test_gpu_check_stops_with_one_line_where_torch_sees_no_gpu(tmp_path):
    """The prepared CUDA run (benchmarks/gpu_check.sh) checks for a GPU before it writes or installs anything."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: benchmarks/gpu_check.sh runs in full there")
    output = tmp_path / "gpu-check"
    completed = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "GPU_CHECK_OUTPUT": str(output)},
        timeout=120,
    )
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines()[-1].startswith("gpu_check.sh: torch ")
    assert "sees no CUDA GPU" in completed.stderr and not output.exists()


@pytest.mark.parametrize("starts", [["--engine-starts", "0"], ["--rounds", "3", "--engine-starts", "4"]])
def test_serving_benchmark_refuses_engine_starts_it_cannot_split_rounds_among(starts):
    """Stopped at its arguments, before any model is built or engine started (the run itself is in tests_vllm)."""
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_vllm.py"), *starts],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "--engine-starts must be between 1 and --rounds" in completed.stderr
    assert "Traceback" not in completed.stderr
