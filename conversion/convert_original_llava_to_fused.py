"""The earlier name of `convert_llava_to_fused` for original-format checkpoints (haotian-liu/LLaVA layout); the
command recognises both formats.

    python -m conversion.convert_original_llava_to_fused --input liuhaotian/llava-v1.5-7b \
        --output ./llava-1.5-7b-fused --vision-tower openai/clip-vit-large-patch14-336 --verify

Same command as the installed `fusedvlm-convert-original` (an alias of `fusedvlm-convert`).
"""

import sys

from hf_fusedvlm.conversion import main_original


if __name__ == "__main__":
    sys.exit(main_original())
