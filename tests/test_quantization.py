"""bitsandbytes 4-bit / 8-bit loading, dtypes and device placement of saved fused checkpoints (issue 5).

Everything runs on CPU with tiny models whose sizes are multiples of 64 (bitsandbytes' CPU 4-bit kernels need it).
"""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModel, BitsAndBytesConfig, LlavaForConditionalGeneration

from conftest import FUSER_TYPES, instruction_inputs, reads_instruction, run_without_package


bnb = pytest.importorskip("bitsandbytes", reason="the quantization extra is not installed")

PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
INSTRUCTION = "What is shown in the image?"
MAX_NEW_TOKENS = 4
QUANTIZED_LINEARS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
NF4_DOUBLE_QUANT = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
FP4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False)
INT8 = BitsAndBytesConfig(load_in_8bit=True)
# Relative L2 error of the logits against the float32 model, measured on the tiny checkpoints with a non-zero mmfuser
# (gammas 0.5) and igva: bf16 0.020 (sdpa) / 0.023 (eager), fp16 0.0024 / 0.0029. The bounds leave ~2x headroom:
# bf16 keeps 8 significant bits (unit roundoff 2**-8), fp16 11 (2**-11); the error grows through the layers.
LOGITS_TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.01, torch.float32: 0.0}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llava, fused_models):
    """Directories holding the plain tiny LLaVA (`plain`), each fused conversion, and `mmfuser_trained`: mmfuser with
    non-zero gammas so that its deformable attention reaches the output."""
    root = tmp_path_factory.mktemp("quantization")
    trained = copy.deepcopy(fused_models["mmfuser"])
    with torch.no_grad():
        trained.model.fuser.gamma1.fill_(0.5)
        trained.model.fuser.gamma2.fill_(0.5)
    models = {"plain": tiny_llava[0], **fused_models, "mmfuser_trained": trained}
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: root / name for name in models}


@pytest.fixture(scope="module")
def prompt_inputs(tiny_llava, tiny_instruction_encoder, image):
    """`(inputs, instruction_inputs)`: the processor's tensors for one image and prompt, and the igva instruction."""
    _, processor = tiny_llava
    _, instruction_tokenizer = tiny_instruction_encoder
    return processor(images=image, text=PROMPT, return_tensors="pt"), instruction_inputs(
        instruction_tokenizer, [INSTRUCTION]
    )


def model_inputs(prompt_inputs, fuser_type: str) -> dict:
    inputs, instruction = prompt_inputs
    return {**inputs, **(instruction if reads_instruction(fuser_type) else {})}


def greedy_tokens(model, inputs: dict) -> list[int]:
    output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def quantized_module_names(model) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, QUANTIZED_LINEARS)}


def assert_fusion_in_float32(model):
    """Every Linear of the fuser and the instruction encoder is torch's own (no bitsandbytes class) with a plain
    float32 weight, and every fuser parameter is float32."""
    fused = model.model
    for part in (fused.fuser, fused.instruction_encoder):
        for name, module in part.named_modules() if part is not None else ():
            if isinstance(module, nn.Linear):
                assert type(module).__module__.startswith("torch.nn"), f"{name} became {type(module)}"
                assert type(module.weight) is nn.Parameter and module.weight.dtype == torch.float32, name
    assert {param.dtype for param in fused.fuser.parameters()} <= {torch.float32}


def test_quantized_generate_keeps_fusion_in_float32(checkpoints, prompt_inputs):
    """4-bit (nf4 + double quant, fp4 without) and 8-bit: generate() runs for every fuser, the fuser and the
    instruction encoder stay float32, and the vision tower, projector and LLM are quantised."""
    for fuser_type in FUSER_TYPES:
        for quantization_config in (NF4_DOUBLE_QUANT, FP4, INT8):
            model = AutoModel.from_pretrained(checkpoints[fuser_type], quantization_config=quantization_config)
            assert_fusion_in_float32(model)
            for part in ("vision_tower", "multi_modal_projector", "language_model"):
                assert any(name.startswith(f"model.{part}.") for name in quantized_module_names(model)), part
            tokens = greedy_tokens(model, model_inputs(prompt_inputs, fuser_type))
            assert len(tokens) == MAX_NEW_TOKENS


def test_fresh_mmfuser_quantized_matches_plain_llava(checkpoints, prompt_inputs):
    """A freshly converted mmfuser (gammas 0) loaded with the same BitsAndBytesConfig as the source LLaVA quantises
    exactly the same modules into identical tensors, and generates the same greedy tokens."""
    inputs = model_inputs(prompt_inputs, "mmfuser")
    configs = [
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant)
        for quant_type in ("nf4", "fp4")
        for double_quant in (True, False)
    ] + [INT8]
    for quantization_config in configs:
        plain = LlavaForConditionalGeneration.from_pretrained(
            checkpoints["plain"], quantization_config=quantization_config
        )
        fused = AutoModel.from_pretrained(checkpoints["mmfuser"], quantization_config=quantization_config)
        assert quantized_module_names(fused) == quantized_module_names(plain)
        fused_state = fused.state_dict()
        for name, tensor in plain.state_dict().items():
            assert torch.equal(fused_state[name], tensor), name
        assert greedy_tokens(fused, inputs) == greedy_tokens(plain, inputs), quantization_config.to_dict()


def test_user_skip_modules_keep_fuser_protected(checkpoints, prompt_inputs):
    """A user's llm_int8_skip_modules replaces transformers' default skips (lm_head) but not the fused model's
    `_keep_in_fp32_modules`: the listed modules stay float, the fuser and instruction encoder too, and everything
    else is quantised exactly as in a plain LLaVA loaded with the same list. (transformers 5 matches the patterns from
    the start of the full module name, or as a suffix of a Linear's own name: `model.multi_modal_projector`.)"""
    skip = ["model.multi_modal_projector"]
    for quantization_config in (
        BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip),
        BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip),
    ):
        plain = LlavaForConditionalGeneration.from_pretrained(
            checkpoints["plain"], quantization_config=quantization_config
        )
        model = AutoModel.from_pretrained(checkpoints["igva"], quantization_config=quantization_config)
        assert_fusion_in_float32(model)
        assert type(model.model.multi_modal_projector.linear_1) is nn.Linear
        assert quantized_module_names(model) == quantized_module_names(plain)
        assert len(greedy_tokens(model, model_inputs(prompt_inputs, "igva"))) == MAX_NEW_TOKENS


def test_dtypes_device_maps_and_attention(checkpoints, prompt_inputs):
    """bf16 / fp16 / auto with device_map cpu / auto and sdpa / eager: the fuser stays float32, generate() runs and
    the logits stay within LOGITS_TOLERANCE of float32. A fresh mmfuser in bf16 equals the plain LLaVA in bf16."""
    cases = [
        ("mmfuser_trained", {"dtype": "bfloat16"}),
        ("mmfuser_trained", {"dtype": "float16", "device_map": "auto", "attn_implementation": "eager"}),
        ("mmfuser_trained", {"dtype": "auto", "device_map": "cpu", "attn_implementation": "sdpa"}),
        ("igva", {"dtype": "bfloat16", "device_map": "cpu", "attn_implementation": "eager"}),
    ]
    for checkpoint, load_kwargs in cases:
        inputs = model_inputs(prompt_inputs, "igva" if checkpoint == "igva" else "mmfuser")
        reference = AutoModel.from_pretrained(checkpoints[checkpoint], dtype=torch.float32)
        model = AutoModel.from_pretrained(checkpoints[checkpoint], **load_kwargs)
        assert {param.dtype for param in model.model.fuser.parameters()} == {torch.float32}
        with torch.no_grad():
            expected = reference(**inputs).logits
            logits = model(**inputs).logits.float()
        error = ((logits - expected).norm() / expected.norm()).item()
        assert error <= LOGITS_TOLERANCE[model.dtype], (load_kwargs, error)
        assert len(greedy_tokens(model, inputs)) == MAX_NEW_TOKENS

    inputs = model_inputs(prompt_inputs, "mmfuser")
    plain = LlavaForConditionalGeneration.from_pretrained(checkpoints["plain"], dtype=torch.bfloat16)
    fused = AutoModel.from_pretrained(checkpoints["mmfuser"], dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fused(**inputs).logits, plain(**inputs).logits)


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it on one)"
)


@needs_cuda
def test_cuda_4bit_and_bf16_generate_as_plain_llava(checkpoints, prompt_inputs):
    """On a CUDA GPU, loaded as users load a 7B (`device_map="cuda"`): a fresh mmfuser in nf4 and in bf16 generates
    the greedy tokens of the plain LLaVA loaded the same way (bf16: identical logits) with its fuser on the GPU in
    float32; a trained mmfuser and igva in bf16 stay within LOGITS_TOLERANCE of their float32 logits on the GPU."""

    def on_gpu(inputs: dict) -> dict:
        return {name: tensor.to("cuda") for name, tensor in inputs.items()}

    inputs = on_gpu(model_inputs(prompt_inputs, "mmfuser"))
    for load_kwargs in ({"quantization_config": NF4_DOUBLE_QUANT}, {"dtype": torch.bfloat16}):
        plain = LlavaForConditionalGeneration.from_pretrained(checkpoints["plain"], device_map="cuda", **load_kwargs)
        fused = AutoModel.from_pretrained(checkpoints["mmfuser"], device_map="cuda", **load_kwargs)
        assert {(p.device.type, p.dtype) for p in fused.model.fuser.parameters()} == {("cuda", torch.float32)}
        assert greedy_tokens(fused, inputs) == greedy_tokens(plain, inputs), load_kwargs
    with torch.no_grad():
        assert torch.equal(fused(**inputs).logits, plain(**inputs).logits)
    for checkpoint, fuser_type in (("mmfuser_trained", "mmfuser"), ("igva", "igva")):
        inputs = on_gpu(model_inputs(prompt_inputs, fuser_type))
        reference = AutoModel.from_pretrained(checkpoints[checkpoint], dtype=torch.float32, device_map="cuda")
        model = AutoModel.from_pretrained(checkpoints[checkpoint], dtype=torch.bfloat16, device_map="cuda")
        with torch.no_grad():
            expected = reference(**inputs).logits
            logits = model(**inputs).logits.float()
        error = ((logits - expected).norm() / expected.norm()).item()
        assert error <= LOGITS_TOLERANCE[torch.bfloat16], (checkpoint, error)
        assert len(greedy_tokens(model, inputs)) == MAX_NEW_TOKENS


def test_fuser_memory_footprint(checkpoints):
    """The footprint split: fuser bytes are its float32 parameters, and the 4-bit fused model minus its fuser weighs
    what the 4-bit plain LLaVA weighs (mmfuser keeps the projector's shape)."""
    plain = LlavaForConditionalGeneration.from_pretrained(checkpoints["plain"], quantization_config=NF4_DOUBLE_QUANT)
    fused = AutoModel.from_pretrained(checkpoints["mmfuser"], quantization_config=NF4_DOUBLE_QUANT)
    footprint = fused.fuser_memory_footprint()
    assert footprint["total"] == fused.get_memory_footprint()
    assert footprint["fuser"] == 4 * sum(param.numel() for param in fused.model.fuser.parameters())
    assert footprint["instruction_encoder"] == 0
    assert footprint["total"] - footprint["fuser"] == plain.get_memory_footprint()
    assert footprint["share"] == pytest.approx(footprint["fuser"] / footprint["total"])

    igva = AutoModel.from_pretrained(checkpoints["igva"], quantization_config=NF4_DOUBLE_QUANT).fuser_memory_footprint()
    assert igva["instruction_encoder"] > 0
    assert igva["share"] == pytest.approx((igva["fuser"] + igva["instruction_encoder"]) / igva["total"])


REMOTE_QUANTIZED_GENERATE = """
import json, torch
from torch import nn
from transformers import AutoModel, BitsAndBytesConfig
inputs = torch.load(INPUTS)
configs = {"4bit": BitsAndBytesConfig(load_in_4bit=True), "8bit": BitsAndBytesConfig(load_in_8bit=True)}
results = {}
for fuser_type, path in CHECKPOINTS.items():
    for name, config in configs.items():
        model = AutoModel.from_pretrained(path, trust_remote_code=True, quantization_config=config)
        assert not type(model).__module__.startswith("hf_fusedvlm"), type(model).__module__
        for part in (model.model.fuser, model.model.instruction_encoder):
            for module in (part.modules() if part is not None else ()):
                if isinstance(module, nn.Linear):
                    assert type(module).__module__.startswith("torch.nn"), type(module)
                    assert type(module.weight) is nn.Parameter and module.weight.dtype == torch.float32
        sample = {key: value for key, value in inputs.items() if fuser_type == "igva" or "instruction" not in key}
        output = model.generate(**sample, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        results[f"{fuser_type}/{name}"] = output[0, sample["input_ids"].shape[1]:].tolist()
print(json.dumps(results))
"""


def test_remote_code_quantized_generate(checkpoints, prompt_inputs, tmp_path):
    """Through trust_remote_code, with hf_fusedvlm not importable: 4-bit and 8-bit loads keep the fusion float32 and
    generate the same tokens as the installed package."""
    fuser_types = ("mmfuser", "igva")
    inputs = model_inputs(prompt_inputs, "igva")
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    paths = {fuser_type: str(checkpoints[fuser_type]) for fuser_type in fuser_types}
    constants = (
        f"CHECKPOINTS = {paths!r}\nINPUTS = {str(tmp_path / 'inputs.pt')!r}\nMAX_NEW_TOKENS = {MAX_NEW_TOKENS}\n"
    )
    result = run_without_package(constants + REMOTE_QUANTIZED_GENERATE, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    for fuser_type in fuser_types:
        for name, config in (("4bit", BitsAndBytesConfig(load_in_4bit=True)), ("8bit", INT8)):
            model = AutoModel.from_pretrained(checkpoints[fuser_type], quantization_config=config)
            assert remote[f"{fuser_type}/{name}"] == greedy_tokens(model, model_inputs(prompt_inputs, fuser_type))


MISSING_BITSANDBYTES = """
import importlib.metadata, json, sys
from transformers import AutoModel, BitsAndBytesConfig
def load_error():
    try:
        AutoModel.from_pretrained(PATH, trust_remote_code=True, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    except ImportError as error:
        return str(error)
    return None
sys.modules["bitsandbytes"] = None  # what an interpreter without bitsandbytes sees
missing = load_error()
del sys.modules["bitsandbytes"]
real_version = importlib.metadata.version
importlib.metadata.version = lambda name: "0.45.0" if name == "bitsandbytes" else real_version(name)
print(json.dumps({"missing": missing, "old": load_error()}))
"""


def test_missing_or_old_bitsandbytes_error(checkpoints, tmp_path):
    """Without bitsandbytes, or with one older than the CPU-capable 0.48, loading in 4-bit names the extra to install
    (simulated in a fresh interpreter through remote code, bitsandbytes stays installed)."""
    result = run_without_package(f"PATH = {str(checkpoints['mmfuser'])!r}\n" + MISSING_BITSANDBYTES, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    for error in errors.values():
        assert (
            error is not None and 'pip install "hf-fusedvlm[quantization]"' in error and "bitsandbytes>=0.48" in error
        )
    assert "bitsandbytes is not installed" in errors["missing"]
    assert "bitsandbytes 0.45.0 is installed" in errors["old"]
