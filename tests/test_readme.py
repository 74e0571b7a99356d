"""The README's Python examples run as written (in a fresh interpreter, from a folder that has the repository's
`examples/`), and print what the README says they print."""

import os
import re
import subprocess
import sys

from conftest import REPO_ROOT


README = (REPO_ROOT / "README.md").read_text()


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section whose heading is `section`."""
    match = re.search(rf"^##+ {re.escape(section)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README has no section {section!r}"
    return re.findall(r"```python\n(.*?)```", match.group(1), flags=re.S)


def run_block(code: str, cwd) -> subprocess.CompletedProcess:
    os.symlink(REPO_ROOT / "examples", cwd / "examples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_quick_start_runs_and_answers_correctly(tmp_path):
    blocks = python_blocks("Quick start")
    assert blocks
    result = run_block("\n".join(blocks), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answer, truth = re.search(r"answer: (\w+) \| truth: (\w+)", result.stdout).groups()
    assert answer == truth
    assert (tmp_path / "my-fused-llava" / "config.json").exists()


def test_interpretability_example_runs_and_writes_its_figures(tmp_path):
    blocks = python_blocks("Interpretability")
    assert blocks
    result = run_block("\n".join(blocks), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for figure in re.findall(r'"(\w+\.png)"', "\n".join(blocks)):
        assert (tmp_path / figure).stat().st_size > 1000, figure

