"""`python -m hf_fusedvlm.training` (and `accelerate launch -m hf_fusedvlm.training`): the `fusedvlm-train` command."""

from .cli import console_main


raise SystemExit(console_main())
