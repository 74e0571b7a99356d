"""An unreachable Hub is reported at once, in one line, by both commands: no retries of a connection that cannot open.

The Hub is played by a local port nothing listens on (connection refused) and by a local server whose queue of
connections is full (the connection neither opens nor is refused: it times out)."""

import os
import socket
import subprocess
import sys

import pytest
from huggingface_hub import constants

from hf_fusedvlm.publishing.hub import hub_connection_error

from conftest import REPO_ROOT


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def online_hub(monkeypatch):
    """Hub settings as without HF_HUB_OFFLINE (the test suite sets it) and without proxies."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)


def test_a_refused_connection_is_reported(online_hub, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert "could not be reached (Connection refused)" in hub_connection_error()


def test_a_connection_that_never_opens_is_reported_after_the_timeout(online_hub, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)  # a queue of one; nothing is ever accepted
        address = server.getsockname()
        waiting = []
        for _ in range(2):  # the first fills the queue; the kernel drops the next connections' SYNs
            client = socket.socket()
            client.settimeout(0.2)
            try:
                client.connect(address)
            except TimeoutError:
                pass
            waiting.append(client)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{address[1]}")
        try:
            assert hub_connection_error(timeout=0.5).endswith("could not be reached (timed out)")
        finally:
            for client in waiting:
                client.close()


def test_no_check_offline_or_behind_a_proxy(online_hub, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert hub_connection_error() is None
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_connection_error() is None


def test_a_reachable_endpoint_passes(online_hub, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_connection_error() is None


@pytest.mark.parametrize(
    "command",
    [
        "-m conversion.convert_llava_to_fused --input someone/llava --output out --fuser mmfuser".split(),
        "-m hf_fusedvlm.training --model_name_or_path someone/fused-llava --data_path data.json --output_dir out".split(),
    ],
    ids=["fusedvlm-convert", "fusedvlm-train"],
)
def test_commands_fail_in_one_line_without_retrying(command, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE" and "proxy" not in key.lower()}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # huggingface_hub logs each retry; none may happen
    assert "could not be reached (Connection refused)" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
