"""switchyard: Mixture-of-Experts layers computed by a C++ core, with Tutel's Python API.

    from switchyard import moe            # a Tutel user changes only this import
    layer = moe.moe_layer(gate_type={'type': 'top', 'k': 2}, model_dim=512,
                          experts={'type': 'ffn', 'num_experts_per_device': 8,
                                   'hidden_size_per_expert': 1024})
"""

import torch

from . import _C, moe
from .moe import Error, MOELayer, moe_layer

__all__ = ["moe", "moe_layer", "MOELayer", "Error", "memory_stats", "reset_peak_memory"]


def memory_stats(device="cpu"):
    """Switchyard's own allocator on `device`: {'current_bytes', 'peak_bytes'} (the most held
    since the last reset_peak_memory). The layers' internal buffers (routing plans, expert
    buffers, activations saved for backward) live there, outside torch.cuda's statistics."""
    return _C.memory_stats(_device_name(device))


def reset_peak_memory(device="cpu"):
    """Starts memory_stats(device)['peak_bytes'] over from the bytes held now."""
    _C.reset_peak_memory(_device_name(device))


def _device_name(device):
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)
__version__ = "0.1.0"
