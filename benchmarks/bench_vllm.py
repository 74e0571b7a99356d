"""Serving throughput in vLLM (through the package's plugin): each fuser against plain LLaVA, interleaved in one run.

Plain LLaVA is the `none` fuser served by the same plugin (one layer, the source model's projector): the same tower,
language model and kernels, so the ratios isolate what fusion costs. `--vllm-llava` also serves the plain source
checkpoint (the same weights) through vLLM's own `LlavaForConditionalGeneration`, to show that the plugin's baseline is
not itself slow; that class imports torchvision, whose PyPI wheels are CUDA builds that do not import beside a CPU
torch, so it runs on a CUDA machine (`gpu_check.sh` passes it) and is refused up front elsewhere.

Method. For every fuser a checkpoint of the chosen shape (random weights, float32) is written and served by its own
worker process holding an `LLM` (vLLM runs one engine per process); all workers stay alive for the whole run and take
orders over pipes. After one warm-up batch each, the run goes in rounds: in every round each fuser serves one timed
batch of `--requests` prompts (each with its own, never repeated image; `--max-tokens` output tokens, EOS ignored), one
worker at a time, in an order shuffled anew per round. The ratio fused / plain (throughput, i.e. plain's batch time
over the fuser's) is computed within each round against that round's `none` batch, so slow drifts of the machine
cancel; the table gives per fuser the median of these per-round ratios with a bootstrap 95 % interval of the median
(and the IQR). A second engine serving the `none` checkpoint (`none-again`, the A/A control) is timed the same way:
its ratio would be 1 if the engines differed only in what they compute, so its distance from 1 is the resolution of
every fuser's ratio. Every `--profile-every` rounds each fuser also serves a batch of 1 output token (prefill only).
One engine can stay a few points faster or slower than another for its whole life (where its memory and threads
landed): with `--engine-starts N` every engine is stopped and started anew N times, the rounds split among the
starts, so that the per-round ratios pool over N placements instead of one.

FLOP ratio. `serving_flops.py` counts one request's FLOPs by part: tower (to the deepest layer the fuser reads, as the
plugin runs it), fuser (IGVA's instruction encoder included), projector, prefill over the image and text tokens, and
decode of `--max-tokens - 1` steps. The FLOP ratio is plain's total over the fuser's: the throughput ratio a machine
bound by arithmetic would show, printed beside the measured one.

Per-stage profile. Tower (truncated to the deepest layer read), fuser and projector are timed in this process on the
transformers model of the same checkpoint (the modules `fuse_and_project` calls, same batch of images), median of
`--profile-repeats`; prefill is the served 1-token batch minus those three, decode the full batch minus the 1-token
batch (both medians over the rounds). Seconds per batch.

Shapes. `small` (default): a 12-layer, 256-wide CLIP at 224 px (256 patches) and a 4-layer, 512-wide Llama (head size
64), IGVA with a 4-layer, 256-wide BERT sentence encoder. Its tower is heavy beside its language model (tower /
LLM-prefill FLOPs about 0.8), so fusion costs more here than at 7B scale. `llava7b-ratio`: the same tower and a
1024-wide Llama (head size 64) whose depth is chosen so that tower FLOPs / LLM prefill FLOPs equals LLaVA-1.5-7B's:
CLIP-L/336 run to layer 23 (plain LLaVA reads the second-to-last of its 24 layers) over 577 tokens against a 32-layer,
4096-wide Llama prefilling 640 tokens (576 image tokens and about 64 of text), about 0.045; the depth is the integer
that brings the small tower over the benchmark's real prompt closest to that (printed with both ratios at the start).
`--quick`: the tiny test model, a smoke run (4 requests of 4 tokens, 2 rounds).

    python benchmarks/bench_vllm.py [--quick] [--shape small|llava7b-ratio] [--fusers none,mmfuser,igva,concat,average]
        [--vllm-llava] [--requests 16] [--max-tokens 32] [--rounds 40] [--minutes M] [--engine-starts 1] [--profile-every 4] [--json bench_vllm.json]
"""

import argparse
import json
import multiprocessing
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from serving_flops import layers_for_ratio, request_flops, tower_to_llm_ratio

from llava_shapes import CLIP_L_336, LLAMA_7B, llava_1_5_config


LLAVA_7B_PROMPT_TOKENS = 640
# Reference engines, timed like the fusers but not fusers: ratio = plain's (`none`'s) batch time over theirs.
CONTROL = "none-again"  # the `none` checkpoint in a second engine: what the benchmark reads where nothing differs
VLLM_LLAVA = "vllm-llava"  # the plain source served by vLLM's own LLaVA class (`--vllm-llava`)
SMALL_VISION = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=12,
    num_attention_heads=4,
    image_size=224,
    patch_size=14,
    projection_dim=256,
)
SMALL_TEXT = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)
SMALL_ENCODER = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)


def build_small_llava(text_fields: dict = SMALL_TEXT):
    """A plain LLaVA of the `small` tower and `text_fields`' Llama (random weights, seed 0) and its processor, from the
    tiny LLM tokenizer: the source every fused checkpoint of the benchmark is converted from."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaImageProcessorPil, LlavaProcessor

    from hf_fusedvlm.tiny import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tiny_llm_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_llm_tokenizer()
    tokenizer.model_max_length = text_fields["max_position_embeddings"]
    text = dict(
        text_fields,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = llava_1_5_config(SMALL_VISION, text)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    llava = LlavaForConditionalGeneration(config).eval()
    size = SMALL_VISION["image_size"]
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_pad=True, do_convert_rgb=True
    )
    llava_processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=SMALL_VISION["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return llava, llava_processor


def build_small(fuser_type: str, text_fields: dict = SMALL_TEXT):
    """A fused LLaVA converted from `build_small_llava(text_fields)` and its processor; IGVA's instruction encoder is
    a random BERT of `SMALL_ENCODER` with the tiny instruction tokenizer."""
    from transformers import AutoConfig, AutoModel

    from hf_fusedvlm import FusedLlavaProcessor
    from hf_fusedvlm.conversion import fused_from_llava
    from hf_fusedvlm.tiny import build_tiny_instruction_tokenizer

    llava, llava_processor = build_small_llava(text_fields)
    encoder = instruction_tokenizer = None
    if fuser_type == "igva":
        instruction_tokenizer = build_tiny_instruction_tokenizer()
        encoder_config = AutoConfig.for_model(
            "bert",
            vocab_size=len(instruction_tokenizer),
            max_position_embeddings=64,
            pad_token_id=instruction_tokenizer.pad_token_id,
            **SMALL_ENCODER,
        )
        encoder = AutoModel.from_config(encoder_config).eval()
    model = fused_from_llava(llava, fuser_type, instruction_encoder=encoder)
    return model, FusedLlavaProcessor.from_llava_processor(llava_processor, instruction_tokenizer=instruction_tokenizer)


RATIO_TEXT = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=1024,
)


def llava7b_tower_to_llm_ratio() -> float:
    return tower_to_llm_ratio(CLIP_L_336, LLAMA_7B, CLIP_L_336["num_hidden_layers"] - 1, LLAVA_7B_PROMPT_TOKENS)


def text_fields_for(shape: str, prompt_tokens: int) -> dict:
    if shape == "small":
        return SMALL_TEXT
    vocab = dict(RATIO_TEXT, vocab_size=LLAMA_7B["vocab_size"])  # the tiny tokenizer's vocabulary is smaller; minor
    layers = layers_for_ratio(
        SMALL_VISION, vocab, SMALL_VISION["num_hidden_layers"] - 1, prompt_tokens, llava7b_tower_to_llm_ratio()
    )
    return dict(RATIO_TEXT, num_hidden_layers=layers)


def shape_text_fields(shape: str) -> dict | None:
    """The Llama fields of `shape` (None for `tiny`, whose model `build_tiny_fused` makes); `llava7b-ratio`'s depth is
    chosen over the benchmark's real prompt, measured on the small model."""
    if shape == "small":
        return SMALL_TEXT
    if shape == "llava7b-ratio":
        model, processor = build_model("none", "small", SMALL_TEXT)
        prompt_tokens, _ = prompt_lengths(model, processor)
        return text_fields_for(shape, prompt_tokens)
    return None


def build_model(fuser_type: str, shape: str, text_fields: dict | None = None):
    from hf_fusedvlm.tiny import build_tiny_fused

    if shape == "tiny":
        return build_tiny_fused(fuser_type, num_text_heads=2)
    return build_small(fuser_type, text_fields)


def flop_spec(model) -> tuple[dict, dict, dict]:
    """The vision and text fields and the fuser description `serving_flops` reads, from a fused model's config."""
    config = model.config
    vision, text = config.vision_config.to_dict(), config.text_config.to_dict()
    fuser = {
        "type": config.fuser_type,
        "layers": list(config.vision_layers_needed),
        "fuser_layers": list(config.fuser_layers),
        "groups": [list(group) for group in config.fuser_layer_groups],
        "num_heads": config.fuser_num_heads,
        "num_points": config.fuser_num_points,
        "aggregator_hidden": config.aggregator_hidden_size,
        "aggregator_layers": config.aggregator_num_layers,
        "output_size": model.model.multi_modal_projector.linear_1.in_features,
    }
    if config.fuser_type == "igva":
        fuser["encoder"] = config.instruction_encoder_config.to_dict()
    return vision, text, fuser


def batch_prompts(processor, seed: int, requests: int, image_size: int) -> list[dict]:
    """`requests` prompts, each with its own image (set `seed`): vLLM caches encoded images, and a repeated image
    would skip the tower and the fuser."""
    from hf_fusedvlm.synthetic_vqa import make_sample, question_prompt

    samples = [make_sample(seed, index, image_size=image_size) for index in range(requests)]
    return [
        {"prompt": question_prompt(processor, sample.question), "multi_modal_data": {"image": sample.image}}
        for sample in samples
    ]


def worker(checkpoint: str, requests: int, kv_cache_bytes: int, connection) -> None:
    """One engine (a fused checkpoint through the plugin, or a plain one through vLLM's own class): answers
    ("run", seed, max_tokens) with the batch's wall seconds and CPU seconds, ("stop",) by exiting. Once started it
    sends ("ready", the number of processes whose CPU time it counts)."""
    import psutil  # a dependency of vLLM
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    import hf_fusedvlm  # noqa: F401  (registers the fused processor with AutoProcessor)

    processor = AutoProcessor.from_pretrained(checkpoint)
    image_size = processor.image_processor.crop_size["height"]
    llm = LLM(
        model=checkpoint,
        dtype="float32",
        max_num_seqs=requests,
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=kv_cache_bytes,
    )

    engine_processes = [psutil.Process(), *psutil.Process().children(recursive=True)]

    def cpu_seconds() -> float:
        # CPU time of this process and the engine's (front end, engine core, model worker): what the batch cost in
        # compute, measured apart from the wall clock (its threads' spinning still grows with other load)
        return sum(sum(process.cpu_times()[:2]) for process in engine_processes)

    def run(seed: int, max_tokens: int) -> tuple[float, float]:
        prompts = batch_prompts(processor, seed, requests, image_size)
        sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start, start_cpu = time.perf_counter(), cpu_seconds()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
        assert all(len(output.outputs[0].token_ids) == max_tokens for output in outputs)
        return seconds, cpu

    run(0, 2)  # warm-up
    connection.send(("ready", len(engine_processes)))
    while True:
        order = connection.recv()
        if order[0] == "stop":
            break
        connection.send(run(order[1], order[2]))
    # A multiprocessing child ends without running exit handlers: stop the engine's own processes here.
    llm.llm_engine.engine_core.shutdown()


def start_worker(context, folder: Path, requests: int, kv_cache_bytes: int):
    parent, child = context.Pipe()
    process = context.Process(target=worker, args=(str(folder), requests, kv_cache_bytes, child))
    process.start()
    return process, parent


def bootstrap_median_interval(values: list[float], resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the median."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[min(resamples - 1, int(0.975 * resamples))]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def profile_encoding(model, processor, requests: int, repeats: int) -> dict[str, float]:
    """Seconds per batch of `requests` images for the tower (run to the deepest layer read), the fuser (IGVA's
    instruction encoder included) and the projector, on the transformers model, as `fuse_and_project` runs them."""
    import torch

    from hf_fusedvlm.synthetic_vqa import make_sample

    inner = model.model
    image_size = processor.image_processor.crop_size["height"]
    samples = [make_sample(1, index, image_size=image_size) for index in range(requests)]
    pixel_values = processor.image_processor([sample.image for sample in samples], return_tensors="pt")["pixel_values"]
    needed = sorted(model.config.vision_layers_needed)
    encoder = next(module for name, module in inner.vision_tower.named_modules() if name.endswith("encoder"))
    all_layers = encoder.layers
    encoder.layers = all_layers[: needed[-1]]
    try:
        with torch.inference_mode():
            tower = median_seconds(lambda: inner.vision_tower(pixel_values, output_hidden_states=True), repeats)
            recorded = inner.vision_tower(pixel_values, output_hidden_states=True).hidden_states
            states = tuple(state if index in needed else None for index, state in enumerate(recorded))
            instruction = None
            if model.config.fuser_type == "igva":
                tokens = processor.instruction_tokenizer(
                    [sample.question for sample in samples], return_tensors="pt", padding=True
                )

                def fuse():
                    embeds = inner.embed_instructions(tokens["input_ids"], tokens["attention_mask"])
                    return inner.fuser(states, embeds)

                instruction = inner.embed_instructions(tokens["input_ids"], tokens["attention_mask"])
            else:

                def fuse():
                    return inner.fuser(states, None)

            fuser = median_seconds(fuse, repeats)
            features = inner.fuser(states, instruction).features
            projector = median_seconds(lambda: inner.multi_modal_projector(features), repeats)
    finally:
        encoder.layers = all_layers
    return {"tower": tower, "fuser": fuser, "projector": projector}


def prompt_lengths(model, processor) -> tuple[int, int]:
    """Prompt tokens (image and text) and instruction tokens of the benchmark's first request."""
    from hf_fusedvlm.synthetic_vqa import make_sample, question_prompt

    sample = make_sample(1, 0, image_size=processor.image_processor.crop_size["height"])
    inputs = processor(text=question_prompt(processor, sample.question), images=sample.image, return_tensors="pt")
    instruction = 0
    if getattr(processor, "instruction_tokenizer", None) is not None:
        instruction = len(processor.instruction_tokenizer(sample.question)["input_ids"])
    return inputs["input_ids"].shape[1], instruction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 requests of 4 tokens, 2 rounds")
    parser.add_argument("--shape", choices=("small", "llava7b-ratio"), default="small")
    parser.add_argument("--fusers", default="none,mmfuser,igva,concat,average")
    parser.add_argument(
        "--vllm-llava",
        action="store_true",
        help="also serve the plain source through vLLM's own LLaVA class (needs an importable torchvision)",
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--minutes", type=float, help="stop after the round that passes this many minutes")
    parser.add_argument(
        "--engine-starts",
        type=int,
        default=1,
        help="start every engine anew this many times, splitting the rounds among the starts (what one start leaves "
        "behind, such as where an engine's memory lands, then averages out)",
    )
    parser.add_argument("--profile-every", type=int, default=4)
    parser.add_argument("--profile-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.rounds, args.profile_every, args.profile_repeats = 4, 4, 2, 1, 2
    if not 1 <= args.engine_starts <= args.rounds:
        parser.error(f"--engine-starts must be between 1 and --rounds ({args.rounds}), got {args.engine_starts}")
    shape = "tiny" if args.quick else args.shape
    fusers = args.fusers.split(",")
    if "none" not in fusers:
        fusers.insert(0, "none")
    if args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2 (decode is timed against 1-token batches)")
    if args.vllm_llava and args.quick:
        parser.error("--vllm-llava needs a shape of the benchmark (small or llava7b-ratio), not --quick's tiny model")
    if args.vllm_llava:
        try:
            import torchvision  # noqa: F401
        except Exception as error:  # a CUDA torchvision beside a CPU torch fails with RuntimeError, not ImportError
            parser.error(
                f"--vllm-llava: vLLM's own LLaVA class imports torchvision, which does not import here ({error!r}); "
                "run it where a torchvision matching torch is installed (a CUDA machine), or leave the option out"
            )

    def stop_engines(workers: dict) -> None:
        for process, connection in workers.values():
            if process.is_alive():
                try:
                    connection.send(("stop",))
                except OSError:
                    process.kill()
        for process, _ in workers.values():
            process.join(60)
            if process.is_alive():
                process.kill()

    def run_rounds(workers: dict, count: int, done: int, seconds_before: float) -> int:
        """`count` rounds on the running `workers` (rounds `done + 1`, ...), fewer when `--minutes` (counting the
        `seconds_before` of earlier starts) runs out; returns the rounds run."""
        rounds_started = time.perf_counter()

        def timed(fuser_type: str, seed: int, max_tokens: int) -> tuple[float, float]:
            process, connection = workers[fuser_type]
            connection.send(("run", seed, max_tokens))
            while not connection.poll(5):
                if not process.is_alive():
                    sys.exit(f"the {fuser_type} engine died (exit code {process.exitcode})")
            return connection.recv()

        for round_index in range(done, done + count):
            order = list(engines)
            rng.shuffle(order)
            seed = 1000 + 2 * round_index
            for fuser_type in order:
                seconds, cpu = timed(fuser_type, seed, args.max_tokens)
                full[fuser_type].append(seconds)
                full_cpu[fuser_type].append(cpu)
            if round_index % args.profile_every == 0:
                order = list(fusers)
                rng.shuffle(order)
                for fuser_type in order:
                    prefill[fuser_type].append(timed(fuser_type, seed + 1, 1)[0])
            ratios = {f: full["none"][-1] / full[f][-1] for f in engines if f != "none"}
            print(
                f"round {round_index + 1}: " + " ".join(f"{f} {ratio:.3f}" for f, ratio in ratios.items()),
                flush=True,
            )
            if args.minutes and seconds_before + time.perf_counter() - rounds_started > 60 * args.minutes:
                return round_index + 1 - done
        return count

    text_fields = shape_text_fields(shape)

    context = multiprocessing.get_context("spawn")
    engine_folders, flops, models, kv_cache_bytes = {}, {}, {}, {}
    references = [CONTROL, VLLM_LLAVA] if args.vllm_llava else [CONTROL]
    engines = fusers + references
    with tempfile.TemporaryDirectory() as root:
        for fuser_type in fusers:
            folder = Path(root) / fuser_type
            model, processor = build_model(fuser_type, shape, text_fields)
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            prompt_tokens, instruction_tokens = prompt_lengths(model, processor)
            vision, text, fuser = flop_spec(model)
            flops[fuser_type] = request_flops(vision, text, fuser, prompt_tokens, args.max_tokens, instruction_tokens)
            # The in-process profile needs the tower, fuser and projector only: the language model (most of the
            # memory at the llava7b-ratio shape) is dropped while the engines run.
            model.model.language_model = model.lm_head = None
            models[fuser_type] = (model, processor)
            if fuser_type == "none":
                layers = max(fuser["layers"])
                shape_ratio = tower_to_llm_ratio(vision, text, layers, prompt_tokens)
                print(
                    f"shape {shape}: tower {layers} layers x {vision['hidden_size']} wide, LLM "
                    f"{text['num_hidden_layers']} layers x {text['hidden_size']} wide, {prompt_tokens} prompt tokens; "
                    f"tower / LLM prefill FLOPs {shape_ratio:.4f} (LLaVA-1.5-7B: {llava7b_tower_to_llm_ratio():.4f})",
                    flush=True,
                )
            # All engines live at once: each gets the KV cache its batch needs (twice over), not vLLM's default.
            kv_cache_bytes[fuser_type] = max(
                128 << 20,
                2
                * 2
                * 4
                * text["num_hidden_layers"]
                * text["hidden_size"]
                * args.requests
                * (prompt_tokens + args.max_tokens),
            )
            engine_folders[fuser_type] = folder
        if args.vllm_llava:
            llava, llava_processor = build_small_llava(text_fields)
            llava.save_pretrained(Path(root) / VLLM_LLAVA)
            llava_processor.save_pretrained(Path(root) / VLLM_LLAVA)
        for name in references:  # the language model of `none`, so the same KV cache
            engine_folders[name] = Path(root) / ("none" if name == CONTROL else name)
            kv_cache_bytes[name] = kv_cache_bytes["none"]

        def start_engines() -> dict:
            began = time.perf_counter()
            workers = {
                name: start_worker(context, folder, args.requests, kv_cache_bytes[name])
                for name, folder in engine_folders.items()
            }
            for name, (_process, connection) in workers.items():
                message = connection.recv() if connection.poll(900) else None
                if not (isinstance(message, tuple) and message[0] == "ready"):
                    stop_engines(workers)
                    sys.exit(f"the {name} engine did not start")
                cpu_processes[name] = message[1]
            print(f"{len(workers)} engines ready after {time.perf_counter() - began:.0f} s", flush=True)
            return workers

        cpu_processes, workers = {}, {}
        rng = random.Random(args.seed)
        full = {fuser_type: [] for fuser_type in engines}
        full_cpu = {fuser_type: [] for fuser_type in engines}
        prefill = {fuser_type: [] for fuser_type in fusers}
        rounds_per_start = -(-args.rounds // args.engine_starts)
        rounds, rounds_seconds, starts = 0, 0.0, 0
        try:
            while starts < args.engine_starts and rounds < args.rounds:
                starts += 1
                workers = start_engines()
                rounds_started = time.perf_counter()
                rounds += run_rounds(workers, min(rounds_per_start, args.rounds - rounds), rounds, rounds_seconds)
                rounds_seconds += time.perf_counter() - rounds_started
                stop_engines(workers)
                if args.minutes and rounds_seconds > 60 * args.minutes:
                    break
        finally:
            stop_engines(workers)

    def against_plain(name: str) -> dict:
        """`name`'s batch times and their per-round ratios to plain's, in wall and in CPU seconds."""
        ratios = [plain / other for plain, other in zip(full["none"], full[name])]
        cpu_ratios = [plain / other for plain, other in zip(full_cpu["none"], full_cpu[name])]
        seconds = statistics.median(full[name])
        return {
            "median_batch_seconds": seconds,
            "requests_per_second": args.requests / seconds,
            "output_tokens_per_second": args.requests * args.max_tokens / seconds,
            "throughput_ratio_to_plain": statistics.median(ratios),
            "ratio_ci95": list(bootstrap_median_interval(ratios)),
            "ratio_iqr": list(quartiles(ratios)),
            "median_batch_cpu_seconds": statistics.median(full_cpu[name]),
            "cpu_ratio_to_plain": statistics.median(cpu_ratios),
            "cpu_ratio_ci95": list(bootstrap_median_interval(cpu_ratios)),
            "cpu_processes": cpu_processes[name],
        }

    results = {}
    for fuser_type in fusers:
        results[fuser_type] = against_plain(fuser_type)
        model, processor = models[fuser_type]
        stages = profile_encoding(model, processor, args.requests, args.profile_repeats)
        one_token = statistics.median(prefill[fuser_type])
        stages["prefill"] = one_token - sum(stages.values())
        stages["decode"] = results[fuser_type]["median_batch_seconds"] - one_token
        results[fuser_type] |= {
            "flop_ratio": flops["none"]["total"] / flops[fuser_type]["total"],
            "flops_per_request": flops[fuser_type],
            "stage_seconds_per_batch": stages,
            "one_token_batch_seconds": one_token,
        }
    for name in references:
        results[name] = against_plain(name)

    machine = platform.processor() or platform.machine()
    print(
        f"\nvLLM throughput, shape {shape}, {args.requests} requests x {args.max_tokens} tokens, {rounds} interleaved "
        f"rounds in {rounds_seconds / 60:.1f} min over {starts} engine start{'s' if starts > 1 else ''} ({machine}); ratio = fused / plain throughput, median of per-round "
        "ratios [bootstrap 95 % interval]"
    )
    print(
        f"{'fuser':<10}{'batch s':>9}{'req/s':>8}{'ratio':>8}{'95 % interval':>18}{'IQR':>16}"
        f"{'CPU ratio':>11}{'95 % interval':>18}{'FLOP ratio':>12}"
    )
    for fuser_type, row in results.items():
        low, high = row["ratio_ci95"]
        q1, q3 = row["ratio_iqr"]
        cpu_low, cpu_high = row["cpu_ratio_ci95"]
        flop_ratio = f"{row['flop_ratio']:>12.3f}" if "flop_ratio" in row else f"{'-':>12}"
        print(
            f"{fuser_type:<10}{row['median_batch_seconds']:>9.3f}{row['requests_per_second']:>8.2f}"
            f"{row['throughput_ratio_to_plain']:>8.3f}{f'[{low:.3f}, {high:.3f}]':>18}{f'[{q1:.3f}, {q3:.3f}]':>16}"
            f"{row['cpu_ratio_to_plain']:>11.3f}{f'[{cpu_low:.3f}, {cpu_high:.3f}]':>18}" + flop_ratio
        )
    print(
        "CPU ratio: the same ratio of CPU seconds per batch (the engine's processes: front end, engine core, model "
        "worker), a second measurement of the same cost; under load it is about as noisy as wall time"
    )
    print(
        f"{CONTROL}: plain in a second engine (what the benchmark reads where nothing differs)"
        + (
            f"; {VLLM_LLAVA}: plain through vLLM's own LLaVA class (above 1: faster than the plugin)"
            if args.vllm_llava
            else ""
        )
    )
    print(
        "\nper-stage profile, seconds per batch (tower, fuser, projector: transformers in-process; prefill, decode: "
        "served batches by difference)"
    )
    names = ("tower", "fuser", "projector", "prefill", "decode")
    print(f"{'fuser':<10}" + "".join(f"{name:>11}" for name in names) + f"{'FLOP fuser+proj %':>19}")
    for fuser_type, row in results.items():
        if fuser_type in references:
            continue
        part = row["flops_per_request"]
        share = 100 * (part["fuser"] + part["projector"]) / part["total"]
        print(
            f"{fuser_type:<10}"
            + "".join(f"{row['stage_seconds_per_batch'][name]:>11.4f}" for name in names)
            + f"{share:>19.2f}"
        )
    if args.json:
        settings = {
            key: getattr(args, key)
            for key in ("requests", "max_tokens", "rounds", "engine_starts", "profile_every", "seed", "vllm_llava")
        }
        args.json.write_text(
            json.dumps(
                {
                    "shape": shape,
                    "settings": settings,
                    "rounds_run": rounds,
                    "engine_starts_run": starts,
                    "rounds_seconds": rounds_seconds,
                    "machine": machine,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
