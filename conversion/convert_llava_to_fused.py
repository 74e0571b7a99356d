"""Convert a LLaVA checkpoint, llava-hf or original format, into a fused LLaVA (MMFuser, IGVA, concat, average, none).

    python -m conversion.convert_llava_to_fused --demo
        converts the built-in tiny LLaVA (no download), loads the result with AutoModel + AutoProcessor
        (trust_remote_code=True) and answers a question about an image.

    python -m conversion.convert_llava_to_fused --input llava-hf/llava-1.5-7b-hf --output ./llava-1.5-7b-mmfuser \
        --fuser mmfuser --verify [--push-to-hub USER/llava-1.5-7b-mmfuser]

    python -m conversion.convert_llava_to_fused --input liuhaotian/llava-v1.5-7b --output ./llava-1.5-7b-fused \
        --vision-tower openai/clip-vit-large-patch14-336 --fuser mmfuser --verify

Same command as the installed `fusedvlm-convert`; see `--help` and `hf_fusedvlm/conversion/`.
"""

import sys

from hf_fusedvlm.conversion import main


if __name__ == "__main__":
    sys.exit(main())
