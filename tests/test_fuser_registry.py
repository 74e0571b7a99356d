"""The fuser registry: a fuser defined outside the package, registered, converts with parity, saves, loads through
remote code and generates; and checkpoints saved by earlier releases still load."""

import inspect
import json

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoModel

import hf_fusedvlm
from hf_fusedvlm import FUSERS, FusedLlavaConfig, FusedLlavaProcessor, fusers
from hf_fusedvlm.conversion import ConversionError, fused_from_llava
from hf_fusedvlm.conversion.cli import build_parser, parse_fuser_options
from hf_fusedvlm.conversion.request import check_fuser_choice
from hf_fusedvlm.publishing.model_card import render_model_card

from conftest import REPO_ROOT, run_without_package


PROMPT = "USER: <image>\nWhat colour is the square? ASSISTANT:"


def define_weighted_sum_fuser(fusers, torch):
    """A fuser in a few lines, given the fusers module (the package's, or a checkpoint's remote code): the base layer,
    then a learned softmax-weighted sum of `fuser_layers`, sharpened by a config field of its own."""

    @fusers.register_fuser("weighted_sum")
    class WeightedSumFuser(fusers.Fuser):
        layer_fields = ("fuser_layers",)
        config_fields = {
            "weighted_sum_temperature": fusers.FuserField(1.0, float, "Softmax temperature of the layer weights."),
        }
        title, description, parity = "a learned weighted sum", "Softmax-weighted sum of layers.", "new columns 0"

        def __init__(self, config):
            super().__init__(config)
            self.base_layer, self.layers = config.base_layer, list(config.fuser_layers)
            self.temperature = config.weighted_sum_temperature
            self.layer_logits = torch.nn.Parameter(torch.zeros(len(self.layers)))

        @classmethod
        def check_config(cls, config):
            if not config.fuser_layers:
                raise ValueError("weighted_sum needs fuser_layers.")
            if not config.weighted_sum_temperature > 0:
                raise ValueError(f"weighted_sum_temperature must be > 0, got {config.weighted_sum_temperature}.")

        @classmethod
        def layers_read(cls, config):
            return set(config.fuser_layers) | {config.base_layer}

        @classmethod
        def projector_slots(cls, config):
            return 0, 2

        def forward(self, vision_hidden_states, instruction_embeds=None):
            layers = torch.stack([self.patches(vision_hidden_states[layer]) for layer in self.layers], 1)
            weights = (self.layer_logits / self.temperature).softmax(0).expand(layers.shape[0], -1)
            fused = torch.einsum("bk,bkpd->bpd", weights, layers)
            base = self.patches(vision_hidden_states[self.base_layer])
            return fusers.FuserOutput(torch.cat([base, fused], -1), fusion_weights=weights)

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
fuser = define_weighted_sum_fuser(fusers, torch)
config_package = code_package("configuration_fused_llava.FusedLlavaConfig")
sys.modules[config_package + ".fuser_registry"].register_fuser("weighted_sum")(fuser)
assert config_package + ".fusers" not in sys.modules  # the configuration's code holds no fuser module
model = AutoModel.from_pretrained("saved", trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(model.model.fuser).__name__ == "WeightedSumFuser"
inputs = torch.load("inputs.pt")
print("RESULT" + json.dumps(model.generate(**inputs, max_new_tokens=6, do_sample=False).tolist()))
""" % inspect.getsource(define_weighted_sum_fuser)


@pytest.fixture(scope="module")
def weighted_sum_fuser():
    fuser = define_weighted_sum_fuser(fusers, torch)
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
    assert json.loads(line[len("RESULT") :]) == trained.tolist()


def test_the_registry_drives_config_checks_and_vision_layers(tiny_llava):
    vision_config = tiny_llava[0].config.vision_config.to_dict()  # a copy: configs adopt the object they are given
    with pytest.raises(ValueError, match="Unknown fuser_type 'nonexistent': choose one of .*mmfuser"):
        FusedLlavaConfig(vision_config=vision_config, fuser_type="nonexistent")
    expected = {"none": [5], "concat": [1, 3, 5], "mmfuser": [1, 3, 5], "average": [1, 2, 3, 4, 5, 6]}
    for fuser_type, layers in expected.items():
        config = FusedLlavaConfig(
            vision_config=vision_config,
            vision_feature_layer=-2,
            fuser_type=fuser_type,
            fuser_layers=[1, 3, 5],
            fuser_layer_groups=[[1, 2, 3], [4, 5, 6]],
        )
        assert config.vision_layers_needed == layers, fuser_type


@pytest.fixture
def guided_sum_fuser(weighted_sum_fuser):
    """weighted_sum that also reads the instruction, registered for one test."""

    @fusers.register_fuser("guided_sum")
    class GuidedSumFuser(weighted_sum_fuser):
        reads_instruction = True

    yield GuidedSumFuser
    del FUSERS["guided_sum"]


def test_a_fuser_defined_in_a_test_reaches_config_cli_processor_and_card(
    weighted_sum_fuser, guided_sum_fuser, tiny_llava, tmp_path
):
    """Registering a class is the whole of adding a fuser: its new config field, its checks, the converter's choices
    and options, the processor's need for an instruction tokenizer and the model card follow from the class."""
    llava, llava_processor = tiny_llava
    fields = {"vision_config": llava.config.vision_config.to_dict(), "vision_feature_layer": -2}

    # Configuration: the new field is a config field, with its default, its type and the fuser's own check.
    config = FusedLlavaConfig(**fields, fuser_type="weighted_sum", fuser_layers=[1, 3])
    assert config.weighted_sum_temperature == 1.0 and config.vision_layers_needed == [1, 3, 5]
    sharper = FusedLlavaConfig(**fields, fuser_type="weighted_sum", weighted_sum_temperature=0.5)
    assert sharper.weighted_sum_temperature == 0.5 and sharper != config
    assert sharper == FusedLlavaConfig(**fields, fuser_type="weighted_sum", weighted_sum_temperature=0.5)
    assert FusedLlavaConfig(**fields).to_dict()["weighted_sum_temperature"] == 1.0  # every config carries it
    with pytest.raises(ValueError, match="weighted_sum_temperature must be > 0, got 0.0"):
        FusedLlavaConfig(**fields, fuser_type="weighted_sum", weighted_sum_temperature=0.0)
    with pytest.raises(StrictDataclassFieldValidationError, match="expected float, got str"):
        FusedLlavaConfig(**fields, fuser_type="weighted_sum", weighted_sum_temperature="hot")
    with pytest.raises(ValueError, match="unknown keyword 'weighted_sum_temprature'.*'weighted_sum_temperature'"):
        FusedLlavaConfig(**fields, fuser_type="weighted_sum", weighted_sum_temprature=2.0)
    with pytest.raises(ValueError, match="fuser_type='guided_sum' needs instruction_encoder_config"):
        FusedLlavaConfig(**fields, fuser_type="guided_sum")

    # Converter: --fuser choices, --fuser-option names and help, and the instruction encoder rule.
    help_text = " ".join(build_parser().format_help().split())
    assert "weighted_sum_temperature (weighted_sum: Softmax temperature of the layer weights.)" in help_text
    assert "weighted_sum,guided_sum" in help_text.replace(", ", ",")  # --fuser {...} choices
    assert build_parser().parse_args(["--fuser", "guided_sum"]).fuser == "guided_sum"
    assert parse_fuser_options(["weighted_sum_temperature=2.5"]) == {"weighted_sum_temperature": 2.5}
    with pytest.raises(ConversionError, match="--fuser guided_sum embeds the user's instruction"):
        check_fuser_choice("guided_sum", None)
    with pytest.raises(ConversionError, match="only used by --fuser igva, guided_sum, not weighted_sum"):
        check_fuser_choice("weighted_sum", "an-encoder")

    # Processor: a checkpoint of a fuser that reads the instruction needs the instruction tokenizer.
    FusedLlavaProcessor.from_llava_processor(llava_processor).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "fused_llava", "fuser_type": "guided_sum"}))
    with pytest.raises(OSError, match="holds a guided_sum model, whose fuser reads the user's instruction"):
        FusedLlavaProcessor.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "fused_llava", "fuser_type": "weighted_sum"}))
    assert FusedLlavaProcessor.from_pretrained(tmp_path).instruction_tokenizer is None

    # Model card: the class's title, description, parity reason, layer fields and its own field.
    card = render_model_card(
        FusedLlavaConfig(**fields, fuser_type="weighted_sum", fuser_layers=[1, 3], weighted_sum_temperature=0.5),
        model_id="tiny-weighted-sum",
        base_model=None,
        license=None,
        license_link=None,
        instruction_encoder=None,
        new_parameters=2,
        convert_command="fusedvlm-convert --fuser weighted_sum",
    ).text
    for text in (
        "**a learned weighted sum**",
        "Softmax-weighted sum of layers.",
        "(new columns 0)",
        "| fused layers (`fuser_layers`) | [1, 3] |",
        "| `weighted_sum_temperature` | 0.5 |",
    ):
        assert text in card, text


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
