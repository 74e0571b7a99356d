"""The fuser registry: a fuser defined outside the package, registered, converts with parity, saves, loads through
remote code and generates; and checkpoints saved by earlier releases still load."""

import inspect
import json

import pytest
import torch
from transformers import AutoModel

import hf_fusedvlm
from hf_fusedvlm import FUSERS, FusedLlavaConfig, Fuser, FuserOutput, register_fuser
from hf_fusedvlm.conversion import fused_from_llava

from conftest import REPO_ROOT, run_without_package


PROMPT = "USER: <image>\nWhat colour is the square? ASSISTANT:"


def define_weighted_sum_fuser(Fuser, FuserOutput, register_fuser, torch):
    """A fuser in a dozen lines, given the registry's names (from the package, or from a checkpoint's remote code):
    the base layer, then a learned softmax-weighted sum of `fuser_layers`."""

    @register_fuser("weighted_sum")
    class WeightedSumFuser(Fuser):
        layer_fields = ("fuser_layers",)
        title, description, parity = "a learned weighted sum", "Softmax-weighted sum of layers.", "new columns 0"

        def __init__(self, config):
            super().__init__(config)
            self.base_layer, self.layers = config.base_layer, list(config.fuser_layers)
            self.layer_logits = torch.nn.Parameter(torch.zeros(len(self.layers)))

        @classmethod
        def check_config(cls, config):
            if not config.fuser_layers:
                raise ValueError("weighted_sum needs fuser_layers.")

        @classmethod
        def layers_read(cls, config):
            return set(config.fuser_layers) | {config.base_layer}

        @classmethod
        def projector_slots(cls, config):
            return 0, 2

        def forward(self, vision_hidden_states, instruction_embeds=None):
            layers = torch.stack([self.patches(vision_hidden_states[layer]) for layer in self.layers], 1)
            weights = self.layer_logits.softmax(0).expand(layers.shape[0], -1)
            fused = torch.einsum("bk,bkpd->bpd", weights, layers)
            base = self.patches(vision_hidden_states[self.base_layer])
            return FuserOutput(torch.cat([base, fused], -1), fusion_weights=weights)

    return WeightedSumFuser


REMOTE_LOAD = """
import json, sys, torch
from transformers import AutoModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module
%s
# The fuser is registered in the checkpoint's own code before loading: its module in the modeling file's fusers.py,
# and in the registry the configuration reads (a module tree of its own, which holds no fuser modules).
def code_package(reference):
    return get_class_from_dynamic_module(reference, "saved").__module__.rsplit(".", 1)[0]
fusers = sys.modules[code_package("modeling_fused_llava.FusedLlavaForConditionalGeneration") + ".fusers"]
fuser = define_weighted_sum_fuser(fusers.Fuser, fusers.FuserOutput, fusers.register_fuser, torch)
config_registry = sys.modules[code_package("configuration_fused_llava.FusedLlavaConfig") + ".fuser_registry"]
config_registry.register_fuser("weighted_sum")(fuser)
print("TREES", config_registry is sys.modules[fusers.__name__.rsplit(".", 1)[0] + ".fuser_registry"])
model = AutoModel.from_pretrained("saved", trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(model.model.fuser).__name__ == "WeightedSumFuser"
inputs = torch.load("inputs.pt")
print("RESULT" + json.dumps(model.generate(**inputs, max_new_tokens=6, do_sample=False).tolist()))
""" % inspect.getsource(define_weighted_sum_fuser)


@pytest.fixture(scope="module")
def weighted_sum_fuser():
    fuser = define_weighted_sum_fuser(Fuser, FuserOutput, register_fuser, torch)
    yield fuser
    del FUSERS["weighted_sum"]


def test_a_registered_fuser_converts_saves_loads_and_generates(weighted_sum_fuser, tiny_llava, image, tmp_path):
    llava, processor = tiny_llava
    inputs = dict(processor(images=image, text=PROMPT, return_tensors="pt"))
    fused = fused_from_llava(llava, "weighted_sum", fuser_layers=[2, 4, 5])
    assert type(fused.model.fuser) is weighted_sum_fuser
    assert fused.config.vision_layers_needed == [2, 4, 5]  # the base layer (5) is among them
    assert fused.model.multi_modal_projector.linear_1.in_features == 2 * llava.config.vision_config.hidden_size
    with torch.no_grad():
        assert (fused(**inputs).logits - llava(**inputs).logits).abs().max() <= 1e-6
    expected = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(fused.generate(**inputs, max_new_tokens=6, do_sample=False), expected)

    with torch.no_grad():  # as after training: the fused half now matters
        fused.model.fuser.layer_logits.copy_(torch.tensor([1.0, -1.0, 0.5]))
        fused.model.multi_modal_projector.linear_1.weight[:, 64:].normal_(generator=torch.Generator().manual_seed(0))
    trained = fused.generate(**inputs, max_new_tokens=6, do_sample=False)
    fused.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["fuser_type"] == "weighted_sum"

    in_process = AutoModel.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert torch.equal(in_process.model.fuser.layer_logits, fused.model.fuser.layer_logits)
    assert torch.equal(in_process.generate(**inputs, max_new_tokens=6, do_sample=False), trained)

    torch.save(inputs, tmp_path / "inputs.pt")
    result = run_without_package(REMOTE_LOAD, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    assert json.loads(line[len("RESULT"):]) == trained.tolist()


def test_the_registry_drives_config_checks_and_vision_layers(tiny_llava):
    vision_config = tiny_llava[0].config.vision_config.to_dict()  # a copy: configs adopt the object they are given
    with pytest.raises(ValueError, match="Unknown fuser_type 'nonexistent': choose one of .*mmfuser"):
        FusedLlavaConfig(vision_config=vision_config, fuser_type="nonexistent")
    expected = {"none": [5], "concat": [1, 3, 5], "mmfuser": [1, 3, 5], "average": [1, 2, 3, 4, 5, 6]}
    for fuser_type, layers in expected.items():
        config = FusedLlavaConfig(
            vision_config=vision_config, vision_feature_layer=-2, fuser_type=fuser_type, fuser_layers=[1, 3, 5],
            fuser_layer_groups=[[1, 2, 3], [4, 5, 6]],
        )
        assert config.vision_layers_needed == layers, fuser_type


OLD_CHECKPOINT = REPO_ROOT / "examples" / "toy-fused-llava"
LOGITS_OF_SAVED_CODE = """
import json, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(%r, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
inputs = torch.load("inputs.pt")
with torch.no_grad():
    torch.save(model(**inputs).logits, "logits.pt")
""" % str(OLD_CHECKPOINT)


def test_a_checkpoint_saved_by_the_first_release_loads_with_its_code_and_with_this_one(tmp_path):
    """examples/toy-fused-llava was saved before the registry: its own remote code (without this package) and this
    package's code compute the same logits from it."""
    from transformers import AutoProcessor

    from hf_fusedvlm.synthetic_vqa import generate_samples

    assert "register_fuser" not in (OLD_CHECKPOINT / "fusers.py").read_text()  # it really is the old code
    processor = AutoProcessor.from_pretrained(OLD_CHECKPOINT, trust_remote_code=True)
    sample = generate_samples(1, seed=5)[0]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}],
        add_generation_prompt=True,
    )
    inputs = dict(processor(images=sample.image, text=prompt, return_tensors="pt"))
    torch.save(inputs, tmp_path / "inputs.pt")
    result = run_without_package(LOGITS_OF_SAVED_CODE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModel.from_pretrained(OLD_CHECKPOINT, trust_remote_code=True)
    assert type(model) is hf_fusedvlm.FusedLlavaForConditionalGeneration  # the installed package wins in-process
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.allclose(logits, torch.load(tmp_path / "logits.pt"), atol=1e-5, rtol=0)
