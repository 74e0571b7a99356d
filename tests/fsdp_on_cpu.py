"""Run `python -m hf_fusedvlm.training ARGS` under accelerate's FSDP on CPU processes (launch it with
`accelerate launch --config_file FSDP_CONFIG tests/fsdp_on_cpu.py ARGS`).

accelerate (1.x) turns FSDP on only for accelerator device types (CUDA, XPU, NPU, ...): with CPU processes the state
stays MULTI_CPU and the FSDP config is dropped, so the run would silently be DDP. This launcher lets the state take the
FSDP plugin anyway; everything else (FSDP2 sharding over gloo, Trainer's full-state-dict gather, the save) is the
real code path a GPU run takes.
"""

import runpy
import sys

import accelerate.state
from accelerate.utils import DistributedType


_accelerator_state_init = accelerate.state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
sys.argv = ["hf_fusedvlm.training", *sys.argv[1:]]
runpy.run_module("hf_fusedvlm.training", run_name="__main__")
