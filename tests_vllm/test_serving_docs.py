"""The CPU recipe of docs/serving.md, run as written: its commands are read from the page, not copied here.

Run by `.ci/vllm` in `.venv-vllm/`, the environment the recipe's install step makes (`./dev.sh setup-vllm`, which
`.ci/vllm` runs itself). The other steps run in a scratch folder that holds the checkout's `examples/`, with this
environment first on PATH (what `source .venv-vllm/bin/activate` does); the only change is the server's port, 8000 in
the page, replaced by a free one.
"""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "serving.md"
RECIPE_HEADING = "## A first server on a CPU machine"
DOCUMENTED_PORT = "8000"
START_SECONDS = 600  # about 100 s on 2 idle cores; CI machines may be busier


def recipe_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the recipe's section, in order (its ### subsections included)."""
    text = PAGE.read_text()
    start = text.index(RECIPE_HEADING) + len(RECIPE_HEADING)
    following = re.search(r"^## ", text[start:], flags=re.MULTILINE)
    section = text[start : start + following.start()] if following else text[start:]
    return re.findall(r"^```(\w*)\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)


def steps() -> dict[str, list[str]]:
    """The recipe's blocks by role: install, checkpoint (other shell commands), serve, request (curl), python."""
    roles: dict[str, list[str]] = {"install": [], "checkpoint": [], "serve": [], "request": [], "python": []}
    for language, code in recipe_blocks():
        if language == "python":
            roles["python"].append(code)
        elif language != "bash":
            continue
        elif "dev.sh setup-vllm" in code:
            roles["install"].append(code)
        elif "api_server" in code:
            roles["serve"].append(code)
        elif "curl" in code:
            roles["request"].append(code)
        else:
            roles["checkpoint"].append(code)
    return roles


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def run_bash(code: str, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_recipe_has_every_step_and_ci_installs_as_it_says():
    roles = steps()
    assert [len(roles[role]) for role in ("install", "checkpoint", "serve", "python")] == [1, 1, 1, 1], roles
    assert len(roles["request"]) == 2, roles["request"]
    install = roles["install"][0]
    assert "source .venv-vllm/bin/activate" in install
    # CI builds its environment with the documented command, so the install step is what CI tests.
    assert "bash dev.sh setup-vllm" in (REPO / ".ci" / "vllm").read_text()
    assert all('"temperature": 0' in request for request in roles["request"])
    assert "mm_processor_kwargs" in roles["request"][1] and "--trust-request-mm-kwargs" in roles["serve"][0]
    assert 'if __name__ == "__main__":' in roles["python"][0] and "temperature=0.0" in roles["python"][0]


@pytest.fixture(scope="module")
def recipe_folder(tmp_path_factory):
    """A scratch folder with the checkout's examples/ and the recipe's checkpoint, made by its own command."""
    folder = tmp_path_factory.mktemp("recipe")
    (folder / "examples").symlink_to(REPO / "examples")
    env = recipe_env()
    for code in steps()["checkpoint"]:
        completed = run_bash(code, folder, env)
        assert completed.returncode == 0, f"{code}\n{completed.stdout[-3000:]}{completed.stderr[-3000:]}"
    return folder


def recipe_env() -> dict:
    """This environment's scripts first on PATH, as after `source .venv-vllm/bin/activate`; no Hub access."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"}


def test_the_documented_server_answers_the_documented_requests(recipe_folder):
    port = free_port()
    serve, requests = ([code.replace(DOCUMENTED_PORT, port) for code in steps()[role]] for role in ("serve", "request"))
    log_path = recipe_folder / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            ["bash", "-c", "exec " + serve[0].strip()],
            cwd=recipe_folder,
            env=recipe_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert server.poll() is None, log_path.read_text()[-6000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, f"the documented server did not come up in {START_SECONDS} s"
                time.sleep(2)
        answers = []
        for code in requests:
            completed = run_bash(code, recipe_folder, recipe_env(), timeout=300)
            assert completed.returncode == 0, f"{code}\n{completed.stdout[-3000:]}{completed.stderr[-3000:]}"
            answers.append(json.loads(completed.stdout)["choices"][0]["message"]["content"])
        assert all(answers), answers
        # Bad requests get HTTP 400 with the reason, and the server stays up.
        chat_url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for options, reason in (
            ({"mm_processor_kwargs": {"instructons": "Count."}}, "Unknown mm_processor_kwargs ['instructons']"),
            ({"text": None}, "the request has none"),
        ):
            status, message = post_image_chat(chat_url, **options)
            assert status == 400 and reason in message, (status, message)
        assert server.poll() is None, "the server exited after answering"
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """Stops the server and its engine processes (its own process group); a server still starting may ignore
    SIGTERM, so it gets SIGKILL after a minute."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)


def post_image_chat(url: str, text: str | None = "Which colour?", **options) -> tuple[int, str]:
    """(HTTP status, body) of a chat request about the toy image, with `text` as its question (none if `None`)."""
    image = "data:image/png;base64," + base64.b64encode((REPO / "examples" / "toy_question.png").read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": image}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    body = {"model": "toy-igva", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **options}
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_documented_python_script_runs(recipe_folder):
    script = recipe_folder / "offline.py"
    script.write_text(steps()["python"][0])
    completed = subprocess.run(
        [sys.executable, script.name], cwd=recipe_folder, env=recipe_env(), capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    printed = [line for line in completed.stdout.splitlines() if line.startswith("'")]
    assert len(printed) == 2, completed.stdout[-3000:]
