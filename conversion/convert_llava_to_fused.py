"""Convert a llava-hf LLaVA checkpoint into a fused LLaVA (MMFuser, IGVA, concat, average or none).

    python -m conversion.convert_llava_to_fused --demo
        converts the built-in tiny LLaVA (no download), loads the result with AutoModel + AutoProcessor
        (trust_remote_code=True) and answers a question about an image.

    python -m conversion.convert_llava_to_fused --input llava-hf/llava-1.5-7b-hf --output ./llava-1.5-7b-mmfuser \
        --fuser mmfuser --verify [--push-to-hub USER/llava-1.5-7b-mmfuser]

Same command as the installed `fusedvlm-convert`; see `--help` and `hf_fusedvlm/convert_llava.py`.
"""

import sys

from hf_fusedvlm.convert_llava import main


if __name__ == "__main__":
    sys.exit(main())
