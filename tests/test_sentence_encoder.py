"""The instruction encoder read from sentence-transformers folders: the folders the installed sentence-transformers
writes (5/6 format) and hand-written ones in the older boolean format. The fused model's instruction embeddings must
equal `SentenceTransformer.encode`."""

import copy
import json

import pytest
import torch
from sentence_transformers import SentenceTransformer, models

from hf_fusedvlm import FusedLlavaForConditionalGeneration
from hf_fusedvlm.conversion import ConversionError, convert_checkpoint, load_sentence_encoder


SENTENCES = ["What colour is the square?", "How many dots are there in the image on the left side?", "Describe it."]
MAX_SEQ_LENGTH = 12  # shorter than the second sentence, so truncation is compared too
EMBEDDING_DIMENSION = 64  # the tiny BERT's hidden size
SMALL_IGVA = {"aggregator_hidden_size": 64, "aggregator_num_layers": 2}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sentence-encoders")


@pytest.fixture(scope="module")
def encoder_and_tokenizer(tiny_instruction_encoder):
    """The tiny encoder with a copy of its tokenizer as a plain encoder folder has it: a processor that saved the
    shared tokenizer in another test has set its processor_class."""
    encoder, tokenizer = tiny_instruction_encoder
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.init_kwargs.pop("processor_class", None)
    tokenizer._processor_class = None
    return encoder, tokenizer


@pytest.fixture(scope="module")
def transformer_dir(workdir, encoder_and_tokenizer):
    encoder, tokenizer = encoder_and_tokenizer
    folder = workdir / "bert"
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_dir(workdir, tiny_llava):
    llava, processor = tiny_llava
    folder = workdir / "llava"
    llava.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_with_sentence_transformers(folder, transformer_dir, pooling, normalize: bool):
    """An encoder folder as the installed sentence-transformers saves it."""
    transformer = models.Transformer(str(transformer_dir), max_seq_length=MAX_SEQ_LENGTH)
    modules = [transformer, models.Pooling(EMBEDDING_DIMENSION, pooling_mode=pooling)]
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


def write_old_format(folder, encoder, tokenizer, pooling: str, normalize: bool):
    """A sentence-transformers <= 4 folder written by hand: boolean pooling modes, max_seq_length in
    sentence_bert_config.json, module types under sentence_transformers.models."""
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    modes = {
        f"pooling_mode_{mode}": mode == pooling
        for mode in (
            "cls_token",
            "mean_tokens",
            "max_tokens",
            "mean_sqrt_len_tokens",
            "weightedmean_tokens",
            "lasttoken",
        )
    }
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": EMBEDDING_DIMENSION, **modes})
    )
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False})
    )
    return folder


def fused_embeddings(llava_dir, encoder_dir, output):
    """Convert to igva with `encoder_dir`, load the result and embed SENTENCES as the processor tokenises them."""
    convert_checkpoint(
        llava_dir, output, "igva", instruction_encoder=encoder_dir, fuser_options=SMALL_IGVA, progress=False
    )
    model = FusedLlavaForConditionalGeneration.from_pretrained(output).eval()
    tokenizer = model_tokenizer(output)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] == MAX_SEQ_LENGTH  # the long sentence was truncated where ST truncates
    with torch.no_grad():
        return model.config, model.model.embed_instructions(batch["input_ids"], batch["attention_mask"])


def model_tokenizer(output):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(output / "instruction_tokenizer")


def encode(folder) -> torch.Tensor:
    return SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_tensor=True)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "no-normalize"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_installed_sentence_transformers_folders(workdir, transformer_dir, llava_dir, pooling, normalize):
    folder = save_with_sentence_transformers(workdir / f"st-{pooling}-{normalize}", transformer_dir, pooling, normalize)
    pooling_config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling_config["pooling_mode"] == pooling  # the 5/6 format, not the old booleans
    assert "pooling_mode_mean_tokens" not in pooling_config
    config, actual = fused_embeddings(llava_dir, folder, workdir / f"fused-{pooling}-{normalize}")
    assert config.instruction_pooling == pooling and config.instruction_embedding_normalize == normalize
    torch.testing.assert_close(actual, encode(folder), rtol=0, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean_tokens", "cls_token", "max_tokens"])
def test_older_format_folders(workdir, encoder_and_tokenizer, llava_dir, pooling):
    folder = write_old_format(workdir / f"old-{pooling}", *encoder_and_tokenizer, pooling, normalize=True)
    encoder = load_sentence_encoder(folder)
    assert (encoder.pooling, encoder.normalize) == (pooling.split("_")[0], True)
    assert encoder.tokenizer.model_max_length == MAX_SEQ_LENGTH
    _, actual = fused_embeddings(llava_dir, folder, workdir / f"fused-old-{pooling}")
    torch.testing.assert_close(actual, encode(folder), rtol=0, atol=1e-5)


def test_plain_transformers_folder_pools_as_sentence_transformers_does(transformer_dir):
    """Mean pooling, no normalisation, as `SentenceTransformer()` builds for such a folder, and said in a warning."""
    with pytest.warns(UserWarning, match="has no modules.json .*mean-pooled without normalisation"):
        encoder = load_sentence_encoder(transformer_dir)
    assert (encoder.pooling, encoder.normalize) == ("mean", False)


@pytest.mark.parametrize("pooling", ["weightedmean", "lasttoken", "mean_sqrt_len_tokens", ("mean", "max")])
def test_pooling_the_model_cannot_compute_is_refused_by_name(workdir, transformer_dir, pooling):
    name = pooling if isinstance(pooling, str) else "-".join(pooling)
    folder = save_with_sentence_transformers(workdir / f"refused-{name}", transformer_dir, pooling, normalize=False)
    with pytest.raises(
        ConversionError, match=r"sets pooling modes \[.*" + (pooling if isinstance(pooling, str) else "max")
    ):
        load_sentence_encoder(folder)


def test_other_modules_and_non_encoders_are_refused(workdir, transformer_dir, llava_dir):
    transformer = models.Transformer(str(transformer_dir))
    dimension = EMBEDDING_DIMENSION
    folder = workdir / "with-dense"
    SentenceTransformer(
        modules=[transformer, models.Pooling(dimension), models.Dense(dimension, 32)], device="cpu"
    ).save(str(folder))
    with pytest.raises(ConversionError, match="module .*Dense.* is not supported"):
        load_sentence_encoder(folder)
    with pytest.raises(ConversionError, match="is a 'llava' model .*not a text encoder"):
        load_sentence_encoder(llava_dir)
