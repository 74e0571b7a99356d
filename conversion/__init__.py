"""Command-line converters (thin entry points; the logic lives in `hf_fusedvlm.conversion`).

Run them from the repository root, e.g. `python -m conversion.convert_llava_to_fused --help`; the installed console
script `fusedvlm-convert` is the same command.
"""
