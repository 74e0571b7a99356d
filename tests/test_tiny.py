"""The tiny models are the same in every process: tests in other engines' environments rebuild them and compare."""

import subprocess
import sys

from conftest import REPO_ROOT


FINGERPRINT = """
import hashlib, json
from hf_fusedvlm.tiny import build_tiny_fused
model, processor = build_tiny_fused("igva", num_text_heads=2, trained=True)
digest = hashlib.sha256()
for tokenizer in (processor.tokenizer, processor.instruction_tokenizer):
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode() + tensor.numpy().tobytes())
print(digest.hexdigest())
"""


def test_tiny_fused_model_and_tokenizers_are_identical_across_processes():
    runs = [
        subprocess.run([sys.executable, "-c", FINGERPRINT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert runs[0].stdout.strip() == runs[1].stdout.strip()
