"""Import an original-format LLaVA checkpoint (haotian-liu/LLaVA layout: plain LLaVA-1.5, or trained with the
official MMFuser or IGVA code) as a fused LLaVA.

    python -m conversion.convert_original_llava_to_fused --input liuhaotian/llava-v1.5-7b \
        --output ./llava-1.5-7b-fused --vision-tower openai/clip-vit-large-patch14-336 --verify

Same command as the installed `fusedvlm-convert-original`; see `--help` and `hf_fusedvlm/convert_original_llava.py`.
"""

import sys

from hf_fusedvlm.convert_original_llava import main


if __name__ == "__main__":
    sys.exit(main())
