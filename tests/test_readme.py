"""Every command in README.md and docs/ runs as written.

A document's code blocks are fenced and labelled: ```python and ```bash blocks are run, ```text blocks are output.
A block that cannot run here (it needs the network, a GPU, vLLM's or lmms-eval's environment, or changes the calling
shell) is marked by the line `<!-- not run: REASON -->` right above it. Every other block runs, in order, in one
fresh folder per document that holds links to the repository's `examples/`, `conversion/` and `benchmarks/`, with the
test environment's commands (`fusedvlm-convert`, ...) on PATH and `HF_HUB_OFFLINE=1`; a Python block runs in a fresh
interpreter. The checks below then look at what the blocks printed and wrote."""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT


DOCUMENTS = ["README.md", *sorted(path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "docs").glob("*.md"))]
# Documents whose commands are checked elsewhere: the experiment's commands run for about an hour
# (tests/test_evidence.py runs the same script with --quick).
CHECKED_ELSEWHERE = {"docs/evidence.md"}
RUN = {"python": [sys.executable, "-c"], "bash": ["bash", "-euo", "pipefail", "-c"]}
LABELS = {*RUN, "text"}
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>\S.*?) -->")
LINKED = ("examples", "conversion", "benchmarks")


@dataclass
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    label: str
    code: str
    not_run: str | None  # the reason given by a `<!-- not run: ... -->` line right above the block


def code_blocks(document: str) -> list[Block]:
    """The fenced blocks of `document`, in order."""
    lines = (REPO_ROOT / document).read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        end = next(end for end in range(index + 1, len(lines)) if lines[end].startswith("```"))
        marker = NOT_RUN.fullmatch(lines[index - 1].strip()) if index else None
        code = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append(Block(document, index + 1, fence.group(1), code, marker and marker.group("reason")))
        index = end + 1
    return blocks


def indented_code_lines(document: str) -> list[int]:
    """Lines that start an indented (unfenced, unlabelled) code block: four spaces after a blank line, outside
    fences."""
    found, fenced, previous = [], False, ""
    for number, line in enumerate((REPO_ROOT / document).read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("    ") and not previous.strip() and line.strip():
            found.append(number)
        previous = line if not fenced else "x"
    return found


@dataclass
class Run:
    block: Block
    result: subprocess.CompletedProcess


def run_document(document: str, folder: Path) -> list[Run]:
    """Run the blocks of `document` not marked `not run`, in order, in `folder`; stops at the first that fails."""
    for name in LINKED:
        (folder / name).symlink_to(REPO_ROOT / name)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    runs = []
    for block in code_blocks(document):
        if block.label not in RUN or block.not_run:
            continue
        result = subprocess.run(
            [*RUN[block.label], block.code], cwd=folder, env=env, capture_output=True, text=True, timeout=900
        )
        runs.append(Run(block, result))
        if result.returncode != 0:
            break
    return runs


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """`ran(document)` -> (its runs, its folder); each document runs once per test module."""
    cache = {}

    def run(document: str) -> tuple[list[Run], Path]:
        if document not in cache:
            folder = tmp_path_factory.mktemp(Path(document).stem)
            cache[document] = run_document(document, folder), folder
        return cache[document]

    return run


def output_of(runs: list[Run], needle: str) -> str:
    """The stdout of the run whose code contains `needle`."""
    return next(run.result.stdout for run in runs if needle in run.block.code)


@pytest.mark.parametrize("document", [name for name in DOCUMENTS if name not in CHECKED_ELSEWHERE])
def test_every_unmarked_block_runs(document, ran):
    runs, _ = ran(document)
    for run in runs:
        assert run.result.returncode == 0, (
            f"{document}:{run.block.line} failed ({run.result.returncode}):\n{run.block.code}\n"
            f"{run.result.stdout[-2000:]}\n{run.result.stderr[-3000:]}"
        )
    expected = [block.line for block in code_blocks(document) if block.label in RUN and not block.not_run]
    assert [run.block.line for run in runs] == expected
    for run in runs:  # a plain run prints no library's warning
        assert not re.search(r"warn", run.result.stderr, flags=re.I), (
            f"{document}:{run.block.line}: {run.result.stderr}"
        )


@pytest.mark.parametrize("document", DOCUMENTS)
def test_blocks_are_labelled_and_markers_precede_runnable_blocks(document):
    blocks = code_blocks(document)
    for block in blocks:
        assert block.label in LABELS, f"{document}:{block.line}: label the block ```python, ```bash or ```text"
        assert not (block.not_run and block.label == "text"), f"{document}:{block.line}: output is never run"
    markers = [
        number
        for number, line in enumerate((REPO_ROOT / document).read_text().splitlines(), start=1)
        if "<!-- not run" in line
    ]
    marked = [block.line - 1 for block in blocks if block.not_run]
    assert markers == marked, f"{document}: a `<!-- not run: REASON -->` line must stand right above a block"
    if document not in CHECKED_ELSEWHERE:
        assert not indented_code_lines(document), f"{document}: fence and label indented code blocks"


def test_readme_stays_short():
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 240


def test_quick_start_answers_correctly_and_saves_a_fused_model(ran):
    runs, folder = ran("README.md")
    answer, truth = re.search(r"answer: (\w+) \| truth: (\w+)", output_of(runs, "make_sample(seed=3000")).groups()
    assert answer == truth
    assert "-> mmfuser fuser, saved and loaded as FusedLlavaForConditionalGeneration" in output_of(
        runs, "fused_from_llava"
    )
    assert (folder / "my-fused-llava" / "config.json").exists()


def test_toy_model_demo_answers_as_shown(ran):
    runs, folder = ran("README.md")
    shown = re.search(r"```text\n(question: .*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S).group(1)
    printed = output_of(runs, "examples/ask_toy.py").splitlines()
    assert all(line in printed for line in shown.strip().splitlines()), printed
    assert (folder / "toy_question.png").read_bytes().startswith(b"\x89PNG")


def test_training_guide_trains_the_converted_tiny_model(ran):
    runs, folder = ran("docs/training.md")
    assert (folder / "synthetic" / "data.json").exists()
    assert (folder / "tiny-trained" / "config.json").exists() and (
        folder / "tiny-trained" / "model.safetensors"
    ).exists()
    assert "Stage stage1: trainable parameters per part" in output_of(runs, "fusedvlm-train")


def test_interpretability_guide_writes_its_figures(ran):
    runs, folder = ran("docs/interpretability.md")
    code = "\n".join(run.block.code for run in runs)
    figures = re.findall(r'"(\w+\.png)"', code)
    assert figures
    for figure in figures:
        assert (folder / figure).stat().st_size > 1000, figure
