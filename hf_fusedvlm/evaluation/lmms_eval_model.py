"""The `fused_llava` model of lmms-eval: evaluates a fused LLaVA checkpoint with the package's model and processor.

    lmms-eval --model fused_llava --model_args pretrained=PATH,dtype=float32 --tasks TASK --batch_size 8

lmms-eval finds the model through the `lmms_eval.models` entry point (`hf_fusedvlm.evaluation.lmms_eval_models`).
Two classes share one implementation: `FusedLlava`, the chat model lmms-eval picks by default, reads each request's
conversation from the task's `doc_to_messages`; `FusedLlavaSimple` (`--force_simple`) builds it from `doc_to_text`
and `doc_to_visual`, and also scores log-likelihood (multiple-choice) tasks. Both render the conversation with the
checkpoint's chat template and pass the prompts to the checkpoint's processor, which takes each sample's instruction
for fusers that read one (`igva`) from its prompt: the text of the last user turn, i.e. the question. Generation is
greedy, batched with left padding.

This module imports lmms-eval: it is loaded only by lmms-eval, never by `import hf_fusedvlm`.
"""

import json

import torch
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.image_utils import load_image
from transformers.utils import cached_file

from ..configuration_fused_llava import FusedLlavaConfig


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = 1024


def _checkpoint_class(pretrained: str, revision: str | None, file_name: str, auto_class: str):
    """The class the checkpoint's own code defines for `auto_class` (its `auto_map` in `file_name`), or `None`.

    transformers prefers a class registered in the running process over a checkpoint's code even with
    `trust_remote_code=True`, and this module's import registers the installed package's classes; loading the
    checkpoint's class directly is what makes `trust_remote_code=True` run the code the checkpoint ships."""
    path = cached_file(pretrained, file_name, revision=revision, _raise_exceptions_for_missing_entries=False)
    if path is None:
        return None
    with open(path, encoding="utf-8") as file:
        class_reference = json.load(file).get("auto_map", {}).get(auto_class)
    if class_reference is None:
        return None
    return get_class_from_dynamic_module(class_reference, pretrained, revision=revision)


def _image(url):
    """A PIL image from a message's image block (`url` holds a PIL image, a path or a URL), in RGB."""
    image = url if isinstance(url, Image.Image) else load_image(url)
    return image.convert("RGB")


def _stop_at(text: str, until) -> str:
    """`text` cut at the first of the stop strings `until` (a string, a list of strings or `None`)."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class FusedLlava(lmms):
    """lmms-eval chat model for fused LLaVA checkpoints (requests carry `doc_to_messages`).

    Model arguments (`--model_args key=value,...`):
        pretrained (`str`): the checkpoint, a local folder or a Hub repo id.
        dtype (`str`, defaults to `"auto"`): `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`. Fusers the
            model class keeps in float32 stay in float32.
        device (`str`, *optional*): `cpu`, `cuda`, `cuda:1`, ...; defaults to `cuda` when one is available, else `cpu`.
            lmms-eval's `--device` sets it too.
        batch_size (`int`, defaults to 1): requests per `generate()` call (lmms-eval's `--batch_size`).
        trust_remote_code (`bool`, defaults to `False`): load the model and processor classes the checkpoint ships.
        revision (`str`, *optional*): the Hub revision.
        attn_implementation (`str`, *optional*): passed to `from_pretrained` (`eager`, `sdpa`, ...).
        max_new_tokens (`int`, defaults to 1024): the limit for tasks whose `generation_kwargs` set none.
    """

    is_simple = False
    _generation_kwargs_index = 2  # where the generation kwargs sit in a generate_until request's args

    def __init__(
        self,
        pretrained: str,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        trust_remote_code: bool = False,
        revision: str | None = None,
        attn_implementation: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_batch_size: int | None = None,  # lmms-eval passes it for `--batch_size auto`, which is not supported
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"Unknown fused_llava model arguments {sorted(kwargs)}: use pretrained, dtype, device, batch_size, "
                "trust_remote_code, revision, attn_implementation, max_new_tokens."
            )
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype={dtype} is not supported: choose one of {', '.join(DTYPES)}.")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size} is not supported: give a positive integer, e.g. --batch_size 8.")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={device} was asked for, but torch sees no CUDA device: pass device=cpu.")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError(
                "fused_llava evaluates in one process: launch lmms-eval without accelerate/torchrun data parallelism."
            )

        config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
        if config.model_type != FusedLlavaConfig.model_type:
            raise ValueError(
                f"{pretrained} is a {config.model_type!r} checkpoint, not a fused LLaVA: convert it with "
                "fusedvlm-convert, or evaluate it with lmms-eval's llava_hf model."
            )
        load_kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        model_kwargs = {"dtype": DTYPES[str(dtype)], "device_map": str(device)}
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        model_class = processor_class = None
        if trust_remote_code:
            model_class = _checkpoint_class(pretrained, revision, "config.json", "AutoModel")
            processor_class = _checkpoint_class(pretrained, revision, "processor_config.json", "AutoProcessor")
        self._model = (model_class or AutoModel).from_pretrained(pretrained, **load_kwargs, **model_kwargs).eval()
        if not self._model.can_generate():
            raise ValueError(
                f"{pretrained}'s AutoModel class {type(self._model).__name__} cannot generate: its config's auto_map "
                "must map AutoModel to FusedLlavaForConditionalGeneration."
            )
        self.processor = (processor_class or AutoProcessor).from_pretrained(pretrained, **load_kwargs)
        self._device = self._model.device
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._warned_sampling = False

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # Requests -> conversations

    def _conversation(self, request_args) -> list[dict]:
        """The request's conversation, from the task's `doc_to_messages` (args: context, doc_to_messages,
        generation kwargs, doc id, task, split)."""
        _, doc_to_messages, _, doc_id, task, split = request_args
        return doc_to_messages(self.task_dict[task][split][doc_id])

    @staticmethod
    def _generation_kwargs(request_args) -> dict:
        return request_args[2]

    def _prompts_and_images(self, conversations: list[list[dict]]) -> tuple[list[str], list[Image.Image]]:
        """The chat-template prompt of each conversation (ending where the answer starts) and their images in order.

        Image blocks become the template's image placeholders with the text blocks kept as they are, so the processor
        takes the instruction of each prompt from its last user turn."""
        prompts, images = [], []
        for conversation in conversations:
            messages = []
            for message in conversation:
                content = message["content"]
                if isinstance(content, str):
                    content = [{"type": "text", "text": content}]
                blocks = []
                for block in content:
                    if block["type"] == "image":
                        images.append(_image(block.get("url", block.get("image"))))
                        blocks.append({"type": "image"})
                    elif block["type"] == "text":
                        blocks.append({"type": "text", "text": block["text"]})
                    else:
                        raise ValueError(
                            f"fused_llava reads images and text only; the task gives a {block['type']!r} block."
                        )
                messages.append({"role": message["role"], "content": blocks})
            prompts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True))
        return prompts, images

    def _inputs(self, prompts: list[str], images: list[Image.Image]):
        """Processor outputs for a batch, left-padded, on the model's device; pixel values in the model's dtype."""
        inputs = self.processor(
            images=images or None, text=prompts, padding=True, padding_side="left", return_tensors="pt"
        )
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs.to(self.device)

    # Generation

    def _batches(self, requests, group_index: int):
        """`(indices, args)` batches of at most `batch_size` requests with equal generation kwargs, in doc order."""
        collator = utils.Collator(
            [request.args for request in requests],
            lambda args: (args[-3], args[-2], args[-1]),  # doc id, task, split
            group_fn=lambda args: args[group_index],
            grouping=group_index is not None,
        )
        return collator, collator.get_batched(n=self.batch_size, batch_fn=None)

    def _generate(self, conversations: list[list[dict]], generation_kwargs: dict) -> list[str]:
        """Greedy answers to a batch of conversations, each cut at the task's stop strings (`until`)."""
        if (generation_kwargs.get("do_sample") or (generation_kwargs.get("temperature") or 0) > 0) and not (
            self._warned_sampling
        ):
            eval_logger.warning("fused_llava generates greedily: the task's sampling settings are ignored.")
            self._warned_sampling = True
        prompts, images = self._prompts_and_images(conversations)
        inputs = self._inputs(prompts, images)
        tokenizer = self.tokenizer
        with torch.inference_mode():
            sequences = self.model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=int(generation_kwargs.get("max_new_tokens") or self.max_new_tokens),
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        answers = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [_stop_at(answer, generation_kwargs.get("until")) for answer in answers]

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, one per request, in the order of `requests`."""
        collator, batches = self._batches(requests, group_index=self._generation_kwargs_index)
        answers = []
        for batch in batches:
            generation_kwargs = self._generation_kwargs(batch[0])
            batch_answers = self._generate([self._conversation(args) for args in batch], generation_kwargs)
            for args, answer in zip(batch, batch_answers):
                self.cache_hook.add_partial("generate_until", (args[0], generation_kwargs), answer)
            answers += batch_answers
        return collator.get_original(answers)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("fused_llava does not run multi-round tasks.")

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "Log-likelihood tasks need lmms-eval's simple model interface: add --force_simple to the command."
        )


class FusedLlavaSimple(FusedLlava):
    """lmms-eval simple model for fused LLaVA checkpoints (`--force_simple`): the conversation is one user turn with
    the images of the task's `doc_to_visual` followed by its `doc_to_text` prompt. Also scores log-likelihood tasks.
    Model arguments as for [`FusedLlava`]."""

    is_simple = True
    _generation_kwargs_index = 1

    def _conversation(self, request_args) -> list[dict]:
        # generate_until args: context, generation kwargs, doc_to_visual, doc id, task, split;
        # loglikelihood args: context, continuation (or doc_to_target), doc_to_visual, doc id, task, split.
        context, _, doc_to_visual, doc_id, task, split = request_args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        # The chat template writes one image placeholder per image block; one written in the prompt would be extra.
        text = context.replace(self.processor.image_token, "").strip()
        content = [{"type": "image", "url": visual} for visual in visuals] + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    @staticmethod
    def _generation_kwargs(request_args) -> dict:
        return request_args[1]

    def loglikelihood(self, requests) -> list[GenerationResult]:
        """`(negative log-likelihood of the continuation after the prompt, whether greedy decoding gives it)` per
        request.

        lmms-eval's multiple-choice scorer picks the choice with the *smallest* value (its models return a loss), so
        the value is the continuation's summed negative log-probability, not lm-eval's log-probability. The prompt is
        the chat-template prompt of the request's conversation (ending where the answer starts); the continuation's
        tokens follow its tokens, tokenised on their own (no special tokens) as lm-eval does.

        Each pair is returned as the `text` of a `GenerationResult`: lmms-eval (0.7.3) turns every other model output
        that is not a string into its `str()` before scoring, which breaks multiple-choice scoring; the result's
        `text` it passes on unchanged."""
        collator, batches = self._batches(requests, group_index=None)
        results = []
        for batch in batches:
            prompts, images = self._prompts_and_images([self._conversation(args) for args in batch])
            inputs = self._inputs(prompts, images)
            continuations = []
            for _context, target, _, doc_id, task, split in batch:
                text = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                continuations.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            # Prompts are left-padded; continuations go after them, right-padded, so that every row's prompt ends
            # at the same position and the positions follow the attention mask.
            width = max(len(tokens) for tokens in continuations)
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            extra_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            extra_mask = torch.zeros((len(batch), width), dtype=inputs["attention_mask"].dtype)
            for row, tokens in enumerate(continuations):
                extra_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                extra_mask[row, : len(tokens)] = 1
            prompt_length = inputs["input_ids"].shape[1]
            inputs["input_ids"] = torch.cat([inputs["input_ids"], extra_ids.to(self.device)], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], extra_mask.to(self.device)], dim=1)
            position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(**inputs, position_ids=position_ids).logits
            # Logits at position t predict token t + 1.
            log_probs = torch.log_softmax(logits[:, prompt_length - 1 : -1].float(), dim=-1)
            for row, tokens in enumerate(continuations):
                target = torch.tensor(tokens, device=log_probs.device)
                row_log_probs = log_probs[row, : len(tokens)]
                negative_log_likelihood = -row_log_probs.gather(-1, target[:, None]).sum().item()
                greedy = bool((row_log_probs.argmax(-1) == target).all())
                results.append(GenerationResult(text=(negative_log_likelihood, greedy)))
        return collator.get_original(results)


__all__ = ["FusedLlava", "FusedLlavaSimple"]
