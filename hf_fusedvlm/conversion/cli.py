"""`fusedvlm-convert` (alias `fusedvlm-convert-original`): one command for llava-hf and original-format checkpoints,
one parser, the report, and the exit statuses (1 verification failed, 2 bad input, 130 interrupted).

The parser imports neither torch nor transformers (`--help` answers at once); the pipeline is imported to run."""

import argparse
import json
import signal
import sys

from ..fuser_registry import FUSERS, fuser_fields, instruction_fusers
from .errors import DTYPES, ConversionError, VerificationError
from .options import INSTRUCTION_ENCODER_EXAMPLE, known_fuser_options


# Flags whose value may start with '-' (negative layer indices): argparse would take `-5,-3,-2` for an option.
NEGATIVE_VALUE_FLAGS = ("--fuser-layers", "--fuser-groups")


def parse_layers(text: str | None) -> list[int] | None:
    """`"3,8,13,18,23"` -> `[3, 8, 13, 18, 23]` (negative indices count from the end)."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        layers = [int(part) for part in parts]
    except ValueError:
        raise ConversionError(
            f"--fuser-layers must be comma-separated integers such as 3,8,13,18,23, got {text!r}."
        ) from None
    return layers


def parse_groups(text: str | None) -> list[list[int]] | None:
    """`"1,2,3;4,5,6"` -> `[[1, 2, 3], [4, 5, 6]]`; an empty group is refused, not dropped."""
    if text is None:
        return None
    groups = []
    for number, group in enumerate(text.split(";"), start=1):
        parts = [part.strip() for part in group.split(",")]
        if not any(parts):
            raise ConversionError(
                f"--fuser-groups {text!r}: group {number} is empty; give non-empty groups separated by ';' such as "
                "\"1,2,3;4,5,6\" (no trailing ';')."
            )
        try:
            groups.append([int(part) for part in parts])
        except ValueError:
            raise ConversionError(
                f"--fuser-groups must be groups of comma-separated integers separated by ';' such as "
                f'"1,2,3;4,5,6", got {text!r}.'
            ) from None
    return groups


def parse_fuser_options(items: list[str] | None) -> dict:
    """`["aggregator_hidden_size=256", "fuser_num_heads=8"]` -> `{"aggregator_hidden_size": 256, ...}` (values are
    parsed as JSON; a field that takes a `str` also takes a bare word, `dense_connector_type=sci`)."""
    options, known, fields = {}, known_fuser_options(), fuser_fields()
    for item in items or []:
        name, separator, value = item.partition("=")
        if not separator or name not in known:
            raise ConversionError(f"--fuser-option takes NAME=VALUE with NAME one of {', '.join(known)}, got {item!r}.")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            if name in fields and str in fields[name].types:
                options[name] = value
                continue
            raise ConversionError(f"--fuser-option {name} needs a number or true/false, got {value!r}.") from None
    return options


def join_negative_values(argv: list[str]) -> list[str]:
    """`--fuser-layers -5,-3,-2` -> `--fuser-layers=-5,-3,-2`, so that negative indices need no `=`."""
    joined, index = [], 0
    while index < len(argv):
        item = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if item in NEGATIVE_VALUE_FLAGS and following[:1] == "-" and following[1:2].isdigit():
            joined.append(f"{item}={following}")
            index += 2
        else:
            joined.append(item)
            index += 1
    return joined


def build_parser(prog: str = "fusedvlm-convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Convert a LLaVA checkpoint into a fused LLaVA loadable with trust_remote_code=True. Both formats are "
            "recognised from config.json: llava-hf (LlavaForConditionalGeneration, e.g. llava-hf/llava-1.5-7b-hf; "
            "needs --fuser) and original (haotian-liu/LLaVA layout, e.g. liuhaotian/llava-v1.5-7b, or trained with "
            "the official MMFuser, IGVA or Dense Connector code; needs --vision-tower). A new fuser starts so that "
            "the result computes exactly what the source computes. With --demo and no --input it converts a built-in "
            "tiny LLaVA (no download), loads the result and answers a question about an image."
        ),
        epilog=(
            "Examples: fusedvlm-convert --input llava-hf/llava-1.5-7b-hf --output ./llava-1.5-7b-mmfuser --fuser "
            "mmfuser --verify;  fusedvlm-convert --input liuhaotian/llava-v1.5-7b --output ./llava-1.5-7b-fused "
            "--vision-tower openai/clip-vit-large-patch14-336 --fuser mmfuser --verify"
        ),
    )
    parser.add_argument("--input", help="LLaVA checkpoint folder or Hub repo id, llava-hf or original format")
    parser.add_argument("--output", help="folder to create (a temporary one with --demo when omitted)")
    parser.add_argument(
        "--fuser",
        choices=list(FUSERS),
        default=None,
        help="fuser to add (llava-hf: required; original plain LLaVA: default none; fixed for trained "
        "MMFuser / IGVA checkpoints; --demo: default mmfuser)",
    )
    parser.add_argument("--fuser-layers", help="vision hidden-state indices, e.g. 3,8,13,18,23 or -22,-17,-12,-7,-2")
    parser.add_argument("--fuser-groups", help='layer groups, e.g. "1,2,3;4,5,6"')
    parser.add_argument(
        "--fuser-option",
        action="append",
        metavar="NAME=VALUE",
        # argparse formats help with %, which a field's help may contain.
        help="other fuser config fields, repeatable: "
        + "; ".join(f"{name} ({help})" for name, help in known_fuser_options().items()).replace("%", "%%"),
    )
    parser.add_argument(
        "--instruction-encoder",
        help=f"sentence-transformers folder or Hub repo id, e.g. {INSTRUCTION_ENCODER_EXAMPLE} "
        f"({', '.join(instruction_fusers())})",
    )
    parser.add_argument(
        "--vision-tower",
        help="original format: the CLIP model named by mm_vision_tower (Dense Connector's released models: SigLIP, "
        "google/siglip-so400m-patch14-384)",
    )
    parser.add_argument("--dtype", choices=DTYPES, help="cast floating weights (default: keep the source's)")
    parser.add_argument("--verify", action="store_true", help="check the result computes what the source does")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output, only if it is an earlier fused LLaVA output",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the result to this Hub repo in one commit")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private (with --push-to-hub)")
    parser.add_argument("--base-model", metavar="REPO_ID", help="Hub id of a local --input, for the model card")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo = parser.add_argument_group("demo")
    demo.add_argument(
        "--demo", action="store_true", help="convert (the built-in tiny LLaVA without --input), then load and generate"
    )
    demo.add_argument("--image", help="image file for --demo (default: a generated test image)")
    demo.add_argument("--question", default="What is shown in the image?", help="question for --demo")
    demo.add_argument("--max-new-tokens", type=int, default=12, help="tokens to generate in --demo")
    return parser


def conversion_options(args) -> dict:
    """The keyword arguments of `convert_checkpoint` shared by the command and the demo."""
    return dict(
        fuser_layers=parse_layers(args.fuser_layers),
        fuser_layer_groups=parse_groups(args.fuser_groups),
        fuser_options=parse_fuser_options(args.fuser_option),
        instruction_encoder=args.instruction_encoder,
        dtype=args.dtype,
        overwrite=args.overwrite,
        base_model=args.base_model,
        progress=not args.no_progress,
    )


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_conversion_command(convert) -> int:
    """Run `convert()` as a command: report the `ConversionResult` it returns (if any), or print the error and return
    the exit status (1 verification failed, 2 bad input, 130 interrupted, also by SIGTERM)."""
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        result = convert()
        if result is not None:
            print(result.summary())
        return 0
    except VerificationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to --output.", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None, prog: str = "fusedvlm-convert") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    if args.private and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub")
    if args.demo:
        from .demo import run_demo

        return run_conversion_command(lambda: run_demo(args, conversion_options(args)))
    missing = [flag for flag, value in (("--input", args.input), ("--output", args.output)) if value is None]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --demo for the built-in example)")
    from .pipeline import convert_checkpoint

    return run_conversion_command(
        lambda: convert_checkpoint(
            args.input,
            args.output,
            args.fuser,
            vision_tower=args.vision_tower,
            verify=args.verify,
            push_to_hub=args.push_to_hub,
            private=args.private,
            **conversion_options(args),
        )
    )


def main_original(argv: list[str] | None = None) -> int:
    """`fusedvlm-convert-original`: the same command under its earlier name."""
    return main(argv, prog="fusedvlm-convert-original")


if __name__ == "__main__":
    sys.exit(main())
