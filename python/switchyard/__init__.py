"""switchyard: Mixture-of-Experts layers computed by a C++ core, with Tutel's Python API.

    from switchyard import moe            # a Tutel user changes only this import
    layer = moe.moe_layer(gate_type={'type': 'top', 'k': 2}, model_dim=512,
                          experts={'type': 'ffn', 'num_experts_per_device': 8,
                                   'hidden_size_per_expert': 1024})
"""

from . import moe
from .moe import Error, MOELayer, moe_layer

__all__ = ["moe", "moe_layer", "MOELayer", "Error"]
__version__ = "0.1.0"
